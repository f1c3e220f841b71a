"""The one path from a config to a ready model, shared by train, eval and compress.

Fresh run:  build the dense model -> load its pretrained weights (``model.pretrained_path``) -> collect
calibration inputs when the layer type is data-aware -> ``compress_`` (each pretrained weight is decomposed
exactly once) -> the task.

From a checkpoint (eval, resume): build the dense skeleton -> re-create the structured layers recorded in the
checkpoint (type, shape, ``config()``; nothing is decomposed) -> the task; Lightning then loads the weights.
:class:`StructureRecord` writes that record into every checkpoint this pipeline's runs save.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .errors import UserInputError
from .typed_config import OptionError
from .callbacks.resume_state import ResumeState
from .io.compressed_format import guard_save_pretrained
from .io.dense_weights import DenseWeights
from .io.save import CompressedWriter
from .io.structure import install_structured_layers, layer_entry, structured_layers
from .modeltree import select_layers
from .sequential import compress_sequential, find_block_stack
from .surgery import CompressionReport, collect_input_gram, collect_output_embedding_gram, compress_
from .utils.checkpoints import load_checkpoint_file

log = logging.getLogger(__name__)

# keys of a model config that the pipeline handles itself (the model factories never see them)
PIPELINE_MODEL_KEYS = ("pretrained_path",)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
STRUCTURE_KEY = "structure"


@dataclass
class Built:
    """What :func:`build` returns: the Lightning task (``task.model`` is the compressed model) and the
    surgery report (``None`` when nothing was replaced)."""

    task: pl.LightningModule
    report: CompressionReport | None
    resumed_step: int | None = None  # global step of the checkpoint the structure came from
    weights: DenseWeights | None = None  # where a meta-device skeleton's blocks are read from (mode=compress)


def dense_model_factory_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved model config the factory receives: what checkpoints and compressed folders record to
    rebuild the model, and what eval compares (``model.pretrained_path`` is not part of the architecture)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return {k: v for k, v in model.items() if k not in PIPELINE_MODEL_KEYS}


def build_dense_model(cfg: DictConfig) -> nn.Module:
    """The model as its config describes it, before any pretrained file or surgery."""
    return instantiate(dense_model_factory_config(cfg))


def read_state_dict(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """A flat state dict from a Lightning ``.ckpt``, a ``.safetensors`` / ``.pth`` / ``.bin`` file or a
    Hugging Face folder (pickled files load safely unless ``trust``); raises ``ValueError`` naming the file when
    it is not readable."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in HF_WEIGHT_FILES if (path / name).exists()]
        if not found:
            raise UserInputError(f"{path} holds none of {HF_WEIGHT_FILES}; point to a weights file or a "
                                    f"Hugging Face model folder")
        path = found[0]
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for a malformed header
            raise UserInputError(f"{path} is not a readable safetensors file ({err}); re-export it") from err
    state = load_checkpoint_file(path, trust=trust)
    state = state.get("state_dict", state)
    if state and all(k.startswith("model.") for k in state):  # a Lightning checkpoint of this project's tasks
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def load_dense_weights(model: nn.Module, path: str | Path, trust: bool = False) -> None:
    """Copy a dense pretrained state dict into ``model``; every key must fit (no layer silently stays random)."""
    state = read_state_dict(path, trust)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        modules = dict(model.named_modules())
        structured = any(k.rpartition(".")[0].rpartition(".")[0] in modules or k.rpartition(".")[0] in modules
                         for k in unexpected)  # tensors of a replaced layer under a dense layer's name
        hint = (" It holds a compressed model's weights: evaluate or resume it with ckpt_path=<that file> instead."
                if structured else " Point model.pretrained_path to weights of this exact architecture.")
        raise UserInputError(f"model.pretrained_path={path} does not fit {type(model).__name__}: "
                             f"{len(missing)} missing keys {missing[:4]}, "
                             f"{len(unexpected)} unexpected {unexpected[:4]}, "
                             f"{len(wrong_shape)} of another shape {wrong_shape[:3]}.{hint}")
    model.load_state_dict(state, strict=True)
    log.info("loaded pretrained weights from %s (%d tensors)", path, len(state))


def _calibrate(task: pl.LightningModule, datamodule: pl.LightningDataModule | None, n_batches: int, collect):
    """``collect(model, batches, forward)`` over the first ``n_batches`` train batches, the model in eval mode."""
    batches = calibration_batches(task, n_batches, datamodule)
    was_training, device = task.model.training, next(task.model.parameters()).device
    task.model.eval()
    try:
        return collect(task.model, batches, lambda m, b: m(task.model_inputs(move_data_to_device(b, device))))
    finally:
        task.model.train(was_training)


def calibration_inputs(task: pl.LightningModule, layer_cfg: dict, datamodule: pl.LightningDataModule | None):
    """Per replaced layer, the inputs data-aware types need (``layer.calibration_batches`` train batches)."""
    n_batches = int(layer_cfg.get("calibration_batches") or 0)
    if n_batches <= 0:
        return None
    names = select_layers(task.model, layer_cfg.get("include"), layer_cfg.get("exclude"))
    return _calibrate(task, datamodule, n_batches,
                      lambda model, batches, forward: collect_input_gram(model, batches, names, forward=forward))


def head_gram_needed(storage: dict | None) -> bool:
    """Whether saving with ``storage`` GPTQ-rounds the embeddings, which runs the whole compressed model."""
    return (bool(storage) and storage.get("embeddings_rounding") == "gptq"
            and storage.get("embeddings", "none") != "none")


def output_embedding_calibration(task: pl.LightningModule, storage: dict | None, n_batches: int,
                                 datamodule: pl.LightningDataModule | None):
    """The LM head's input Gram matrix when ``storage`` GPTQ-rounds the embeddings (else None)."""
    if not head_gram_needed(storage):
        return None
    return _calibrate(task, datamodule, max(n_batches, 1),
                      lambda model, batches, forward: collect_output_embedding_gram(model, batches, forward))


def calibration_batches(task: pl.LightningModule, n_batches: int, datamodule: pl.LightningDataModule | None):
    """The first ``n_batches`` train batches, drawn only when iterated (data-free settings never draw them)."""
    if n_batches <= 0:
        return None
    if datamodule is None:
        raise UserInputError("calibration (layer.calibration_batches > 0, or storage.embeddings_rounding=gptq) needs "
                             "a datamodule to draw calibration batches from")
    datamodule.prepare_data()
    datamodule.setup("fit")
    return itertools.islice(iter(datamodule.train_dataloader()), n_batches)


def compress_task_model(task: pl.LightningModule, layer_cfg: DictConfig,
                        datamodule: pl.LightningDataModule | None = None, device: torch.device | None = None,
                        weights: DenseWeights | None = None,
                        writer: Callable[[int], CompressedWriter] | None = None,
                        release: bool = False) -> CompressionReport:
    """Run the ``layer`` config's surgery on ``task.model`` on ``device``: block by block
    (``sequential.compress_sequential``) where one stack of blocks holds every selected layer and
    ``layer.sequential`` is on, else every layer at once (calibrating first if asked). ``weights``: the dense
    checkpoint a meta-device skeleton reads block by block; ``writer(parts)``: makes the writer each finished
    block's shard goes to. ``release`` (with both): each block leaves memory once its shard is written, the blocks
    are on the meta device afterwards (finish the writer, then load the folder to use the model). A transformers
    model's ``save_pretrained`` then writes the compressed format."""
    cfg = OmegaConf.to_container(layer_cfg, resolve=True)
    model, device = task.model, torch.device(device or "cpu")
    names = list(select_layers(model, cfg.get("include"), cfg.get("exclude")))  # names: no dense module kept
    stack = find_block_stack(model, names) if cfg.get("sequential", True) else None
    was_training = model.training
    try:
        if stack is not None:
            model.eval()
            blocks = len(model.get_submodule(stack))
            log.info("compressing %d layers block by block over %s (%d blocks) on %s", len(names), stack, blocks,
                     device)
            report = compress_sequential(
                model, cfg["name"], cfg.get("budget", 1.0), include=cfg.get("include"), exclude=cfg.get("exclude"),
                options=cfg.get("options"), batches=calibration_batches(task, int(cfg.get("calibration_batches") or 0),
                                                                        datamodule),
                forward=lambda m, batch: m(task.model_inputs(batch)), weights=weights, device=device,
                writer=writer(blocks + 1) if writer is not None else None,
                release=release and weights is not None and writer is not None)
        else:
            if weights is not None:
                weights.load(model)
            model.to(device)
            calibration = calibration_inputs(task, cfg, datamodule)
            report = compress_(model, cfg["name"], cfg.get("budget", 1.0), include=cfg.get("include"),
                               exclude=cfg.get("exclude"), options=cfg.get("options"), calibration=calibration)
    except OptionError as err:  # found only now that the layers' shapes are known: name the config key
        group_level = err.option in ("budget", "budget_of", "calibration_batches")
        raise UserInputError(err.with_prefix("layer." if group_level else "layer.options.")) from None
    finally:
        model.train(was_training)
    guard_save_pretrained(model)
    log.info("layer surgery (%s):\n%s", cfg["name"], report.format_table())
    return report


def lazy_weights_source(cfg: DictConfig) -> Path | None:
    """The safetensors folder a causal LM's skeleton can read block by block in ``mode=compress`` (None where
    the model must load whole: other kinds, a pickled ``pretrained_path``, a baseline test, or
    ``layer.sequential=false``)."""
    model = cfg.model
    if (not cfg.layer.get("sequential", True) or cfg.mode.get("eval_baseline", True)
            or not str(model.get("_target_", "")).endswith("create_hf_model") or model.get("kind") != "causal_lm"):
        return None
    if model.get("pretrained_path"):
        path = Path(model.pretrained_path).expanduser()
        return path if path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors"))) \
            else None
    from .sources import resolve_source

    return Path(resolve_source(model.source))


def build_lazy_task(cfg: DictConfig) -> tuple[pl.LightningModule, DenseWeights] | None:
    """The task around a meta-device skeleton and the checkpoint its blocks will be read from, when the run can
    compress block by block from disk (see :func:`lazy_weights_source`); else None."""
    folder = lazy_weights_source(cfg)
    if folder is None:
        return None
    model = instantiate(dense_model_factory_config(cfg), empty_weights=True)
    names = select_layers(model, cfg.layer.get("include"), cfg.layer.get("exclude"))
    if find_block_stack(model, names) is None:
        return None
    log.info("model skeleton on the meta device; weights are read block by block from %s", folder)
    return instantiate(cfg.task, model=model), DenseWeights(folder)


def build_pretrained_task(cfg: DictConfig) -> pl.LightningModule:
    """The task around the dense model with its pretrained weights, before surgery."""
    model = build_dense_model(cfg)
    if cfg.model.get("pretrained_path"):
        load_dense_weights(model, cfg.model.pretrained_path, trust=bool(cfg.get("trust_checkpoint")))
    return instantiate(cfg.task, model=model)


def build(cfg: DictConfig, datamodule: pl.LightningDataModule | None, checkpoint: str | Path | None = None) -> Built:
    """The task ready to train or test: from ``checkpoint``'s recorded structure when given, else fresh."""
    if checkpoint is not None:
        return restore_structure(cfg, checkpoint)
    task = build_pretrained_task(cfg)
    return Built(task, compress_task_model(task, cfg.layer, datamodule))


def run_callbacks(cfg: DictConfig, report: CompressionReport | None) -> list[pl.Callback]:
    """Callbacks every training run needs to be resumable: the structure record and the RNG states."""
    return [StructureRecord(report, dense_model_factory_config(cfg)), ResumeState()]


# ---------------------------------------------------------------- structure in checkpoints

class StructureRecord(pl.Callback):
    """Adds to every checkpoint what rebuilding the model needs: each structured layer's name, type, shape
    and ``config()``, the surgery report and the model config."""

    def __init__(self, report: CompressionReport | None, model_cfg: dict[str, Any]):
        self.report, self.model_cfg = report, model_cfg

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[STRUCTURE_KEY] = {
            "layers": [layer_entry(name, module) for name, module in structured_layers(pl_module.model).items()],
            "report": self.report.to_dict() if self.report is not None else None,
            "model": self.model_cfg,
        }


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """A Lightning checkpoint (memory-mapped, loaded safely unless ``trust``), with a ``ValueError`` naming the file
    when it is unusable."""
    checkpoint = load_checkpoint_file(path, trust=trust)
    if "state_dict" not in checkpoint:
        raise UserInputError(f"{path} is not a Lightning checkpoint (no state_dict); for dense weights to start "
                             f"from, use model.pretrained_path={path}")
    return checkpoint


def _check_same_model(recorded: dict, current: dict, path: Path) -> None:
    differing = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    if differing:
        shown = ", ".join(f"model.{k}={recorded.get(k)!r} (this run: {current.get(k)!r})" for k in differing[:4])
        raise UserInputError(f"checkpoint {path} was trained with a different model: {shown}; run with the "
                             f"experiment and overrides that produced it")


def restore_structure(cfg: DictConfig, checkpoint_path: str | Path) -> Built:
    """Rebuild the checkpoint's model: dense skeleton + the recorded structured layers (each checked against
    the dense layer it replaces), no decomposition; Lightning loads the weights afterwards."""
    path = Path(checkpoint_path).expanduser()
    checkpoint = read_checkpoint(path, trust=bool(cfg.get("trust_checkpoint")))
    record = checkpoint.get(STRUCTURE_KEY)
    if record is None:
        raise UserInputError(f"checkpoint {path} has no structure record (it was not written by this project's "
                             f"train mode); start from its weights with model.pretrained_path={path}")
    _check_same_model(record["model"], dense_model_factory_config(cfg), path)
    model = build_dense_model(cfg)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    install_structured_layers(model, record["layers"], state, f"checkpoint {path}")
    guard_save_pretrained(model)
    report = CompressionReport.from_dict(record["report"]) if record.get("report") else None
    log.info("rebuilt %d structured layers from %s", len(record["layers"]), path)
    return Built(instantiate(cfg.task, model=model), report, int(checkpoint.get("global_step", 0)))
