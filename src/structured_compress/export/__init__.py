"""Exporting compressed models to other runtimes' formats (GGUF for llama.cpp): ``export_gguf`` in Python,
``python run.py mode=export`` on the command line. ``export.config`` stays torch-free for the compose-time checks."""
from __future__ import annotations

from typing import Any

__all__ = ["export_gguf"]


def __getattr__(name: str) -> Any:
    if name == "export_gguf":  # imported on first use: the compose-time checks import export.config without torch
        from .gguf import export_gguf

        return export_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
