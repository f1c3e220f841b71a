"""Registers the compressed format's quantization config and quantizer (``io.hf_quantizer``) with transformers,
so ``AutoModelFor*.from_pretrained(folder)`` loads a compressed folder once ``import structured_compress`` ran.

Importing transformers (and torch) here would make every ``import structured_compress`` slow and break the
torch-free modules, so registration waits for transformers' quantizer registry: it happens at once when that
is already imported, else right after transformers imports it (a one-shot import hook). Torch-free.
"""
from __future__ import annotations

import importlib.machinery
import logging
import sys

log = logging.getLogger(__name__)
REGISTRY = "transformers.quantizers.auto"


def register() -> None:
    """Register the config and quantizer under ``quant_method: structured_compress`` (idempotent)."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer

    from .io.hf_quantizer import StructuredCompressConfig, StructuredCompressQuantizer
    from .io.source import HF_QUANT_METHOD

    if HF_QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(HF_QUANT_METHOD)(StructuredCompressConfig)
        register_quantizer(HF_QUANT_METHOD)(StructuredCompressQuantizer)


def _register_quietly() -> None:
    """``register``, never failing transformers' own import: a failure only costs ``from_pretrained`` support."""
    try:
        register()
    except Exception as err:  # an incompatible transformers must still import
        log.warning("structured_compress could not register its transformers quantizer (%r): from_pretrained "
                    "cannot load compressed folders; load_compressed(path) can", err)


class _RegisteringLoader(importlib.machinery.SourceFileLoader):
    def exec_module(self, module) -> None:
        super().exec_module(module)
        _register_quietly()


class _RegistryHook:
    """Meta-path finder that wraps the loader of transformers' quantizer registry, once."""

    def find_spec(self, name, path, target=None):
        if name != REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = _RegisteringLoader(spec.loader.name, spec.loader.path)
        return spec


def register_with_transformers() -> None:
    """Register now if transformers' quantizer registry is imported, else when it gets imported."""
    if REGISTRY in sys.modules:
        _register_quietly()
    elif not any(isinstance(finder, _RegistryHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryHook())
