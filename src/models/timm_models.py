"""timm models built from config, with weights from a local file, a hub name, or random init."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def create_timm_model(name: str, pretrained: bool = False, pretrained_path: str | None = None,
                      **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; ``pretrained_path`` loads a local state dict / checkpoint.

    kwargs override the architecture (e.g. ``img_size=28, patch_size=4, in_chans=1`` for Fashion-MNIST).
    """
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained and pretrained_path is None, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"timm has no model {name!r}; see timm.list_models('{name.split('_')[0]}*')") from err
        raise
    if pretrained_path:
        load_weights(model, pretrained_path)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict from ``.safetensors``, ``.pth`` or a Lightning ``.ckpt`` (``model.`` prefix dropped)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"pretrained weights not found at {path}; set model.pretrained_path to an existing file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        log.warning("loaded %s with %d missing and %d unexpected keys", path, len(missing), len(unexpected))
