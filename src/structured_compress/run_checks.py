"""Compose-time checks of the run-level keys: seed, mode and its ``train`` / ``test`` steps, trainer limits,
datamodule sizes, the task's optimizer and schedule numbers, ``mode.storage``, ``export`` and ``ckpt_path``.

Torch-free, like :mod:`.config_checks`, which calls :func:`check_run`; each problem is one :func:`fail` line.
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any, Mapping

from .errors import did_you_mean, fail
from .tasks.schedule import Schedule
from .typed_config import OptionError

MODES = ("train", "eval", "compress", "export")
EVAL_ONLY_TASKS = ("PooledEmbeddingAgreementTask",)  # no training_step
PRECISIONS = ("64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed",
              "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float, not a bool and not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def short_name(target: Any) -> str:
    """``ClassificationTask`` for ``structured_compress.tasks.classification.ClassificationTask``."""
    return str(target).rsplit(".", 1)[-1] if target else ""


def check_run(cfg: Mapping) -> None:
    """Seed, mode and its steps, trainer limits, datamodule sizes, optimizer, storage and checkpoint path."""
    seed = cfg.get("seed")
    if seed is not None and not is_int(seed):
        fail("seed", seed, "must be an integer (or null for no seeding)", "e.g. seed=42")
    mode = (cfg.get("mode") or {}).get("name")
    if mode not in MODES:
        fail("mode.name", mode, f"must be one of {', '.join(MODES)}", f"{did_you_mean(mode, MODES)}use mode=train")
    check_mode_steps(mode, cfg)
    task = short_name((cfg.get("task") or {}).get("_target_"))
    if mode == "train" and cfg["train"] and task in EVAL_ONLY_TASKS:
        fail("mode.name", mode, f"task {task} only evaluates (it compares a model with its uncompressed copy)",
             "use mode=compress (as experiment=glue/bert-ptq-svdq-cosine does)")
    if cfg.get("optimized_mode") not in ("min", "max"):
        fail("optimized_mode", cfg.get("optimized_mode"), "must be min or max",
             f"{did_you_mean(cfg.get('optimized_mode'), ('min', 'max'))}e.g. optimized_mode=max for accuracy")
    check_trainer(cfg.get("trainer") or {})
    check_datamodule(cfg.get("datamodule") or {})
    check_task_optim(cfg.get("task") or {})
    if mode == "compress":
        check_storage((cfg.get("mode") or {}).get("storage"))
    if not isinstance(cfg.get("trust_checkpoint", False), bool):
        fail("trust_checkpoint", cfg.get("trust_checkpoint"), "must be true or false", "e.g. trust_checkpoint=false")
    ckpt = cfg.get("ckpt_path")
    if mode == "eval" and not ckpt:
        fail("ckpt_path", ckpt, "mode=eval tests a checkpoint but none was given",
             "add ckpt_path=<run dir>/checkpoints/last.ckpt")
    if mode == "export":
        check_export(cfg.get("export"), ckpt)
    elif ckpt:  # training falls back to an earlier checkpoint when this one is torn: only its existence counts
        check_checkpoint_file("ckpt_path", ckpt, content=mode != "train")


def check_mode_steps(mode: str, cfg: Mapping) -> None:
    """``mode`` picks the run; ``train`` / ``test`` (set by the mode's config) can only turn its steps off:
    mode=train fits and tests, mode=eval tests, mode=compress compresses and tests."""
    for flag in ("train", "test"):
        if not isinstance(cfg.get(flag), bool):
            fail(flag, cfg.get(flag), "must be true or false", f"e.g. {flag}=false to skip that step")
    if cfg["train"] and mode != "train":
        fail("train", True, f"mode={mode} does not train (train/test only turn a mode's steps off)",
             "drop train=true, or use mode=train")
    if mode == "eval" and not cfg["test"]:
        fail("test", False, "mode=eval only tests, so nothing would run", "drop test=false")
    if mode == "export" and cfg["test"]:
        fail("test", True, "mode=export writes a file and tests nothing", "drop test=true (mode=eval tests)")
    if mode == "train" and not cfg["train"] and not cfg["test"]:
        fail("test", False, "with train=false too, nothing would run", "drop test=false or train=false")


def check_task_optim(task: Mapping) -> None:
    """``task.optimizer``'s numbers, ``task.structure_optim`` and the schedule keys (``task.weight_decay`` ...),
    through the typed configs the tasks build themselves (tasks/schedule.py)."""
    try:
        Schedule.from_task(task)
    except OptionError as err:
        fail(f"task.{err.option}", err.value, err.problem, err.fix)


def check_storage(storage: Any) -> None:
    """``mode.storage`` (mode=compress): every key and value through ``StoragePolicy``'s own typed fields."""
    if storage is None:
        return
    from .io.storage import StoragePolicy  # torch: only runs that set a storage policy pay for it

    try:
        StoragePolicy.from_config(storage)
    except OptionError as err:
        fail("mode.storage" if err.option == "storage" else f"mode.storage.{err.option}", err.value, err.problem,
             err.fix)


def check_export(export: Any, ckpt: Any) -> None:
    """``export.*`` through ``ExportConfig``'s typed fields, and ``ckpt_path``: a folder ``mode=compress`` wrote."""
    from .export.config import ExportConfig  # torch-free

    try:
        ExportConfig.from_config(export)
    except OptionError as err:
        fail(f"export.{err.option}", err.value, err.problem, err.fix)
    folder = Path(str(ckpt)).expanduser() if ckpt else None
    if folder is None:
        fail("ckpt_path", ckpt, "mode=export reads a compressed folder but none was given",
             "add ckpt_path=<run dir>/compressed (written by mode=compress)")
    if not folder.is_dir() or not (folder / "manifest.json").is_file():
        problem = "no such folder" if not folder.exists() else "not a compressed folder (no manifest.json)"
        fail("ckpt_path", ckpt, problem, "give the compressed folder of a mode=compress run, "
             "e.g. ckpt_path=logs/compress/runs/<date>/compressed")


def check_trainer(trainer: Mapping) -> None:
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if not is_int(max_steps) or max_steps < -1:
        fail("trainer.max_steps", max_steps, "must be an integer >= 1, or -1 for no step limit",
             "e.g. trainer.max_steps=1000")
    if max_epochs is not None:
        if not is_int(max_epochs):
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
        if not (is_int(value) and value >= 0) and not (isinstance(value, float) and 0 <= value <= 1):
            fail(f"trainer.{key}", value, "must be a batch count (integer >= 0) or a fraction in [0.0, 1.0]",
                 f"e.g. trainer.{key}=10 or trainer.{key}=0.25")
    for key in ("accumulate_grad_batches", "log_every_n_steps", "num_nodes"):
        value = trainer.get(key)
        if value is not None and not (is_int(value) and value >= 1):
            fail(f"trainer.{key}", value, "must be an integer >= 1", f"e.g. trainer.{key}=1")
    value = trainer.get("check_val_every_n_epoch")
    if value is not None and not (is_int(value) and value >= 1):
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
    if clip is not None and not (is_number(clip) and clip >= 0):
        fail("trainer.gradient_clip_val", clip, "must be a number >= 0 or null", "e.g. trainer.gradient_clip_val=1.0")


def check_datamodule(dm: Mapping) -> None:
    """Sizes and fractions every datamodule shares (range against the dataset size is checked in setup)."""
    for key in ("batch_size", "eval_batch_size"):
        if key in dm and not (is_int(dm[key]) and dm[key] >= 1):
            fail(f"datamodule.{key}", dm[key], "must be an integer >= 1", f"e.g. datamodule.{key}=64")
    for key in ("val_size", "num_workers", "max_train_samples", "max_eval_samples", "max_train_blocks",
                "max_eval_windows"):
        value = dm.get(key)
        if value is not None and not (is_int(value) and value >= 0):
            fail(f"datamodule.{key}", value, "must be an integer >= 0" + (" or null" if key.startswith("max")
                                                                        else ""), f"e.g. datamodule.{key}=0")
    for key in ("val_fraction", "test_fraction"):
        value = dm.get(key)
        if value is not None and not (is_number(value) and 0 <= value < 1):
            fail(f"datamodule.{key}", value, "must be a fraction in [0, 1)", f"e.g. datamodule.{key}=0.1")
    if is_number(dm.get("val_fraction")) and is_number(dm.get("test_fraction")) \
            and dm["val_fraction"] + dm["test_fraction"] >= 1:
        fail("datamodule.val_fraction", dm["val_fraction"], f"plus test_fraction={dm['test_fraction']} leaves "
             "no training data", "keep their sum below 1")
    for key in ("block_size", "eval_length", "max_length", "img_size"):
        value = dm.get(key)
        if value is not None and not (is_int(value) and value >= 1):
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

