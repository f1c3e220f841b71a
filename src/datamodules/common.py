"""Helpers every datamodule shares: finding local data, failing fast and clearly when it is missing."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterable


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset is in none of the places we look; the message says how to provide it."""


def network_available(host: str = "pypi.org", port: int = 443, timeout: float = 2.0) -> bool:
    """True when a TCP connection opens quickly; used to refuse downloads that would hang offline."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


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
