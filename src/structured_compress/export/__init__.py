"""Exporting compressed models to other runtimes' formats (GGUF for llama.cpp)."""
from .gguf import export_gguf

__all__ = ["export_gguf"]
