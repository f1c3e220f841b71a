"""Run any structured linear map as a 2-D convolution.

The conv weight ``C_o x C_i x k_h x k_w`` becomes a ``C_o x (C_i k_h k_w)`` matrix in the column order its
layer type declares (``StructuredLinear.conv_column_order``): ``"channel"`` is the row-major flattening, the
column order of ``F.unfold``, so ``conv(x) = fold(W unfold(x))``; ``"kernel"`` puts the kernel position first,
``(k_h, k_w, C_i)``, as the Gaudi-GBLR reference does -- it decides which weights a contiguous column interval
holds (a run of channels at one kernel position, not a run of positions of one channel). 1x1 convs with
stride 1 skip unfold.

That unfold path is the reference; every layer type also has a native conv form (``conv_forward``) that runs
on the feature map directly, and ``StructuredConv2d.form`` picks between them and a cached dense kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StructuredLinear
from .convforms import ConvGeometry, is_channels_last
from .fastpath import cached, fast_paths_enabled, grad_free


COLUMN_ORDERS = ("channel", "kernel")


def kernel_as_matrix(kernel: Tensor, order: str = "channel") -> Tensor:
    """The ``C_o x (C_i k_h k_w)`` matrix of a conv kernel ``C_o x C_i x k_h x k_w`` (groups=1), columns in
    ``order`` (see the module docstring)."""
    if order not in COLUMN_ORDERS:
        raise ValueError(f"conv column order must be one of {COLUMN_ORDERS}, got {order!r}")
    if order == "kernel":
        kernel = kernel.permute(0, 2, 3, 1)
    return kernel.reshape(kernel.shape[0], -1)


def matrix_as_kernel(matrix: Tensor, in_channels: int, kernel_size: tuple[int, int], order: str = "channel") -> Tensor:
    """Inverse of :func:`kernel_as_matrix`."""
    if order == "kernel":
        return matrix.reshape(matrix.shape[0], *kernel_size, in_channels).permute(0, 3, 1, 2)
    return matrix.reshape(matrix.shape[0], in_channels, *kernel_size)


CONV_FORMS = ("native", "dense", "unfold")


class StructuredConv2d(nn.Module):
    """A conv layer whose flattened kernel is a :class:`StructuredLinear` (``self.linear``).

    ``form`` picks how it runs: ``"native"`` (default) the layer type's own conv form
    (``StructuredLinear.conv_forward``: (grouped) ``F.conv2d`` calls on the factors, in training too), or the
    unfold reference where the type has none; ``"dense"`` a dense kernel built from the layer once and cached,
    at inference only (with gradients to the layer it runs native) -- for shapes where no structured form beats
    the dense conv (:func:`structured_compress.convspeed.choose_conv_forms` picks it by timing and says so);
    ``"unfold"`` the reference, which ``fastpath.reference_paths()`` also forces.
    """

    def __init__(self, linear: StructuredLinear, in_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), form: str = "native"):
        super().__init__()
        kh, kw = kernel_size
        if linear.in_features != in_channels * kh * kw:
            raise ValueError(f"linear in_features {linear.in_features} != C_i*k_h*k_w = {in_channels * kh * kw}")
        self.linear = linear
        self.column_order = linear.conv_column_order
        self.in_channels = in_channels
        self.out_channels = linear.out_features
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.geometry = ConvGeometry(in_channels, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
        self.form = form

    @property
    def form(self) -> str:
        return self._form

    @form.setter
    def form(self, value: str) -> None:
        if value not in CONV_FORMS:
            raise ValueError(f"StructuredConv2d form must be one of {CONV_FORMS}, got {value!r}")
        self._form = value

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, linear: StructuredLinear) -> "StructuredConv2d":
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("StructuredConv2d supports groups=1, zero padding given as numbers")
        return cls(linear, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)

    @property
    def is_pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x: Tensor) -> Tensor:
        if not fast_paths_enabled() or self.form == "unfold":
            return self.forward_unfold(x)
        if self.form == "dense" and grad_free(*self.linear.parameters()):
            kernel = cached(self, "dense_kernel", tuple(self.linear.parameters()) + tuple(self.linear.buffers()),
                            lambda: self.to_dense_weight().to(x.dtype), (x.dtype, self.linear.training))
            bias = None if self.linear.bias is None else self.linear.bias.to(x.dtype)
            return self.geometry.conv(x, kernel, bias)
        out = self.linear.conv_forward(x, self.geometry)
        if out is None:
            return self.forward_unfold(x)
        if is_channels_last(x) and not out.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def running_form(self, training: bool = False) -> str:
        """The form a forward runs now: ``native``, ``dense`` (inference only) or ``unfold`` (the type has no
        native form in its current state); probes the layer with a tiny input."""
        if self.form == "unfold" or (self.form == "dense" and not training):
            return self.form
        state = [t for t in (*self.linear.parameters(), *self.linear.buffers()) if t.is_floating_point()]
        probe = torch.zeros(1, self.in_channels, *(k * d for k, d in zip(self.kernel_size, self.dilation)),
                            dtype=state[0].dtype if state else torch.float32,
                            device=state[0].device if state else None)
        with torch.no_grad():
            return "unfold" if self.linear.conv_forward(probe, self.geometry) is None else "native"

    def forward_unfold(self, x: Tensor) -> Tensor:
        """The reference: the linear map on ``F.unfold`` patches (on channels-last pixels for a 1x1 conv)."""
        if self.is_pointwise:
            return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        batch, _, height, width = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # B, C_i k_h k_w, L
        if self.column_order == "kernel":  # -> B, k_h k_w C_i, L
            cols = cols.unflatten(1, (self.in_channels, -1)).transpose(1, 2).flatten(1, 2)
        out = self.linear(cols.transpose(1, 2)).transpose(1, 2)  # B, C_o, L
        h_out = (height + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        w_out = (width + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return out.reshape(batch, self.out_channels, h_out, w_out)

    def to_dense_weight(self) -> Tensor:
        """The equivalent dense conv kernel ``C_o x C_i x k_h x k_w``."""
        return matrix_as_kernel(self.linear.to_dense_weight(), self.in_channels, self.kernel_size, self.column_order)

    def num_params(self) -> int:
        return self.linear.num_params()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, column_order={self.column_order}, "
                f"form={self.form}")
