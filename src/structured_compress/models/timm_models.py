"""timm models built from config (random init, or timm's own pretrained weights when online).

Local pretrained files are loaded by the pipeline (``model.pretrained_path``, strictly), not here.
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from torch import nn


def plain(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Hydra passes list and dict arguments as OmegaConf containers; timm's models index, split and unpack them
    as plain lists (e.g. ``depths=[1,1,1,1]``)."""
    return {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in kwargs.items()}


def create_timm_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; kwargs override the architecture (e.g. ``img_size=28,
    patch_size=4, in_chans=1`` for Fashion-MNIST)."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **plain(kwargs))
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"timm has no model {name!r}; see timm.list_models('{name.split('_')[0]}*')") from err
        raise


def create_vgg(cfg: list, **kwargs) -> nn.Module:
    """timm's ``VGG`` with the feature widths ``cfg`` (numbers and ``"M"`` for max-pooling) given explicitly:
    ``timm.create_model("vgg19")`` fixes them. The state dict keys are those of timm's vgg models."""
    from timm.models.vgg import VGG

    return VGG(cfg=list(cfg), **plain(kwargs))
