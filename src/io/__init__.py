"""Saving and loading compressed models (one safetensors file plus a JSON manifest)."""
from .compressed_format import FORMAT_VERSION, load_compressed, read_manifest, save_compressed

__all__ = ["FORMAT_VERSION", "load_compressed", "read_manifest", "save_compressed"]
