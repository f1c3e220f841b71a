"""timm models built from config (random init, or timm's own pretrained weights when online).

Local pretrained files are loaded by the pipeline (``model.pretrained_path``, strictly), not here.
"""
from __future__ import annotations

from torch import nn


def create_timm_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; kwargs override the architecture (e.g. ``img_size=28,
    patch_size=4, in_chans=1`` for Fashion-MNIST)."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"timm has no model {name!r}; see timm.list_models('{name.split('_')[0]}*')") from err
        raise
