"""Run any structured linear map as a 2-D convolution.

The conv weight ``C_o x C_i x k_h x k_w`` is flattened row-major to ``C_o x (C_i k_h k_w)``; that is the
column order of ``F.unfold``, so ``conv(x) = fold(W unfold(x))``. 1x1 convs with stride 1 skip unfold.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StructuredLinear


def conv_weight_as_matrix(conv: nn.Conv2d) -> Tensor:
    """The ``C_o x (C_i k_h k_w)`` matrix view of a conv kernel (groups=1)."""
    return conv.weight.reshape(conv.out_channels, -1)


class StructuredConv2d(nn.Module):
    """A conv layer whose flattened kernel is a :class:`StructuredLinear` (``self.linear``)."""

    def __init__(self, linear: StructuredLinear, in_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1)):
        super().__init__()
        kh, kw = kernel_size
        if linear.in_features != in_channels * kh * kw:
            raise ValueError(f"linear in_features {linear.in_features} != C_i*k_h*k_w = {in_channels * kh * kw}")
        self.linear = linear
        self.in_channels = in_channels
        self.out_channels = linear.out_features
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, linear: StructuredLinear) -> "StructuredConv2d":
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("StructuredConv2d supports groups=1, zero padding given as numbers")
        return cls(linear, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)

    @property
    def is_pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.is_pointwise:
            return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        batch, _, height, width = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # B, C_i k_h k_w, L
        out = self.linear(cols.transpose(1, 2)).transpose(1, 2)  # B, C_o, L
        h_out = (height + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        w_out = (width + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return out.reshape(batch, self.out_channels, h_out, w_out)

    def to_dense_weight(self) -> Tensor:
        """The equivalent dense conv kernel ``C_o x C_i x k_h x k_w``."""
        return self.linear.to_dense_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def num_params(self) -> int:
        return self.linear.num_params()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")
