"""Structured layer types behind one interface. Importing a module registers its type in ``LAYERS``."""
from .base import LAYERS, StructuredLinear, build_layer, check_budget, get_layer_class, register_layer
from .conv import StructuredConv2d
from . import dense, lowrank  # noqa: F401  (registration)
from . import gaudi  # noqa: F401
from . import tsvd, svdq, hyper  # noqa: F401
from . import monarch, blockdiag  # noqa: F401

__all__ = ["LAYERS", "StructuredLinear", "StructuredConv2d", "build_layer", "check_budget", "get_layer_class",
           "register_layer"]
