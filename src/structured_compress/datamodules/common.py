"""Helpers every datamodule shares: finding local data, failing fast and clearly when it is missing."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset is in none of the places we look; the message says how to provide it."""


def first_dir_with(candidates: Iterable[Path | str | None], required: Iterable[str]) -> Path | None:
    """The first candidate directory that holds every file in ``required`` (``.gz`` variants allowed)."""
    required = list(required)
    for candidate in candidates:
        if candidate is None:
            continue
        path = Path(candidate).expanduser()
        if all((path / name).exists() or (path / f"{name}.gz").exists() for name in required):
            return path
    return None


def imagenet_folder_dirs(data_dir: str | Path, path: str | Path | None) -> list[Path]:
    """Where an ImageFolder-layout ImageNet may lie: ``path``, then ``data_dir/imagenet``, ``data_dir/ILSVRC2012``."""
    base = Path(data_dir)
    return ([Path(path).expanduser()] if path else []) + [base / "imagenet", base / "ILSVRC2012"]


def missing_imagenet_folder(data_dir: str | Path, path: str | Path | None) -> str | None:
    """Why ImageNet cannot be read (no ``train/`` and ``val/`` folders in any candidate), or None."""
    dirs = imagenet_folder_dirs(data_dir, path)
    if any((d / "train").is_dir() and (d / "val").is_dir() for d in dirs):
        return None
    return ("ImageNet (ImageFolder layout) not found. Looked for train/ and val/ class folders in: "
            + ", ".join(map(str, dirs)) + ". Download ILSVRC2012 from image-net.org (needs an account), extract "
            f"train/ and val/ into {dirs[-2]} with one folder per class, or set datamodule.path.")


def check_val_size(val_size: int, n_train: int, dataset: str) -> None:
    """``datamodule.val_size`` must leave at least one training example."""
    if not isinstance(val_size, int) or isinstance(val_size, bool) or not 0 <= val_size < n_train:
        raise ValueError(f"datamodule.val_size={val_size}: must be an integer in [0, {n_train - 1}] -- {dataset} "
                         f"has {n_train} training images and the rest trains; e.g. datamodule.val_size=5000")
