"""Saving and loading compressed models (safetensors shards, a sealed JSON manifest, a storage policy)."""
from .compressed_format import guard_save_pretrained, load_compressed
from .save import CompressedWriter, save_compressed
from .manifest import FORMAT_VERSION, read_manifest
from .sizes import folder_sizes
from .source import timm_source
from .storage import StoragePolicy

__all__ = ["CompressedWriter", "FORMAT_VERSION", "StoragePolicy", "folder_sizes", "guard_save_pretrained",
           "load_compressed", "read_manifest", "save_compressed", "timm_source"]
