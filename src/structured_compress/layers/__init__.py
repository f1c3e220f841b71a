"""Structured layer types behind one interface. Every module of this package is imported here, and a type
registers itself (with its typed config) on import: adding a type is adding its file (docs/add_layer_type.md)."""
import importlib
import pkgutil

from .base import LAYERS, StructuredLinear, build_layer, check_budget, get_layer_class, register_layer
from .conv import StructuredConv2d

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LAYERS", "StructuredLinear", "StructuredConv2d", "build_layer", "check_budget", "get_layer_class",
           "register_layer"]
