"""Loading Hugging Face datasets from this machine only: a ``save_to_disk`` folder, a folder of data files,
or the datasets cache; the hub is tried only when the network is up, so offline runs fail fast."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from ..sources import network_available
from .common import DatasetNotFoundError

log = logging.getLogger(__name__)


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").exists() or (
        (path / "dataset_info.json").exists() and (path / "state.json").exists())


def has_data_files(path: Path) -> bool:
    """True for a folder holding parquet or arrow files (loaded with ``load_dataset(folder)``)."""
    return path.is_dir() and (any(path.glob("**/*.parquet")) or any(path.glob("**/*.arrow")))


def hf_datasets_cache(hub_name: str) -> Path:
    """The datasets-cache folder ``load_dataset(hub_name)`` fills (``HF_DATASETS_CACHE`` or ``HF_HOME``)."""
    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser()
    return cache / hub_name.replace("/", "___")


def missing_saved_hf_dataset(candidates: Iterable[Path | str | None], hub_name: str) -> str | None:
    """Why a Hugging Face dataset cannot be loaded offline (no saved folder, data files or cache entry),
    or None; only stats paths, so it is cheap enough to run before any model is built."""
    looked = [Path(str(c)).expanduser() for c in candidates if c]
    if any(is_saved_dataset(path) or has_data_files(path) for path in looked):
        return None
    if hf_datasets_cache(hub_name).is_dir():
        return None
    return (f"{hub_name} not found. Looked in: {', '.join(map(str, looked))} and {hf_datasets_cache(hub_name)}. "
            f"Save it with datasets.load_dataset('{hub_name}').save_to_disk('{looked[-1] if looked else 'DIR'}') "
            "on a machine that has it, or set datamodule.path")


def load_local_dataset(candidates: Iterable[Path | str | None], hub_name: str, config_name: str | None = None,
                       allow_download: bool = True, how_to: str = "", data_files: dict | None = None):
    """The dataset from the first candidate folder (``load_from_disk`` or a folder of data files), else from
    the datasets cache (offline mode), else downloaded from the hub when ``allow_download`` and online.
    ``data_files`` (split -> file in the hub repository) picks files of a large hub dataset (C4's shards).

    Raises :class:`DatasetNotFoundError` naming every place it looked and the command that fetches it.
    """
    import datasets

    looked = []
    for candidate in candidates:
        if candidate is None:
            continue
        path = Path(candidate).expanduser()
        looked.append(str(path))
        if is_saved_dataset(path):
            log.info("loading %s from %s (save_to_disk folder)", hub_name, path)
            return datasets.load_from_disk(str(path))
        if has_data_files(path):
            log.info("loading %s from the data files in %s", hub_name, path)
            return datasets.load_dataset(str(path))
    cached = _load_from_cache(hub_name, config_name, data_files)
    if cached is not None:
        return cached
    looked.append(f"the datasets cache ({hub_name}{', ' + config_name if config_name else ''})")
    if allow_download and network_available("huggingface.co"):
        log.info("downloading %s/%s from the hub", hub_name, config_name)
        return datasets.load_dataset(hub_name, config_name, data_files=data_files)
    args = f"'{hub_name}'" + (f", '{config_name}'" if config_name else "") + (
        f", data_files={data_files!r}" if data_files else "")
    first = next((p for p in looked), "DIR")
    raise DatasetNotFoundError(
        f"{hub_name}{'/' + config_name if config_name else ''} not found. Looked in: {', '.join(looked)}. "
        f"On a machine with internet run `python -c \"import datasets; datasets.load_dataset({args})"
        f".save_to_disk('{first}')\"` and copy that folder here. {how_to}".strip()
    )


def _load_from_cache(hub_name: str, config_name: str | None, data_files: dict | None = None):
    """``load_dataset`` with the hub switched off: succeeds only when the datasets cache holds it."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(hub_name, config_name, data_files=data_files)
    except Exception as err:  # noqa: BLE001 -- any failure here just means "not cached"
        log.debug("%s/%s not in the datasets cache: %s", hub_name, config_name, err)
        return None
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
