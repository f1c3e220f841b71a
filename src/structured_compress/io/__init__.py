"""Saving and loading compressed models (one safetensors file, a sealed JSON manifest, a storage policy)."""
from .compressed_format import guard_save_pretrained, load_compressed, save_compressed
from .manifest import FORMAT_VERSION, read_manifest
from .sizes import folder_sizes
from .source import timm_source
from .storage import StoragePolicy

__all__ = ["FORMAT_VERSION", "StoragePolicy", "folder_sizes", "guard_save_pretrained", "load_compressed",
           "read_manifest", "save_compressed", "timm_source"]
