"""Gaudi-GBLR (arXiv 2310.18882): interval masks (:mod:`.mask`), the layer (:mod:`.layer`) and its typed
config (:mod:`.config`), its structure search (:mod:`.search`, :mod:`.starts`) and compact forward (:mod:`.compact`)."""
from .config import COMPUTE_MODES, GaudiConfig
from .layer import GaudiGBLRLinear
from .mask import MASK_THRESHOLD, gaudi_mask

__all__ = ["COMPUTE_MODES", "GaudiConfig", "GaudiGBLRLinear", "MASK_THRESHOLD", "gaudi_mask"]
