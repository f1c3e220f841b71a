"""Building blocks of the layers' native conv forms (``StructuredLinear.conv_forward``).

A structured conv runs as ordinary (grouped) ``F.conv2d`` calls on the feature map, so oneDNN's direct kernels
do the work and no ``F.unfold`` copy is made. Each layer type composes its form from the pieces here: a k x k
conv into a few channels then a 1 x 1 conv out (factored types), grouped convs whose groups are the blocks
(block-diagonal and Monarch), channel shuffles, and channel slices. Columns are in the ``"channel"`` order
of :mod:`.conv` (``c k_h k_w + position``) unless a function says otherwise.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ConvGeometry:
    """The conv a structured linear map stands for: ``in_channels`` and the usual ``F.conv2d`` settings."""

    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def positions(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def conv(self, x: Tensor, kernel: Tensor, bias: Tensor | None = None, groups: int = 1) -> Tensor:
        """``F.conv2d`` with this geometry's stride, padding and dilation."""
        return F.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation, groups)


def is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def pointwise(x: Tensor, matrix: Tensor, bias: Tensor | None = None, groups: int = 1) -> Tensor:
    """A 1 x 1 conv by ``matrix`` (out x in/groups)."""
    return F.conv2d(x, matrix[:, :, None, None], bias, groups=groups)


def factored_conv(x: Tensor, geometry: ConvGeometry, right: Tensor, left: Tensor, bias: Tensor | None) -> Tensor:
    """``W = left @ right`` (out x r, r x C_i k_h k_w) as a k x k conv into ``r`` channels, then a 1 x 1 conv."""
    hidden = geometry.conv(x, right.reshape(right.shape[0], geometry.in_channels, *geometry.kernel_size))
    return pointwise(hidden, left, bias)


def channel_shuffle(x: Tensor, rows: int, cols: int) -> Tensor:
    """Channels read as a ``rows x cols`` grid, transposed (channel ``i cols + j`` moves to ``j rows + i``),
    keeping ``x``'s memory format."""
    batch, _, height, width = x.shape
    if is_channels_last(x):
        y = x.permute(0, 2, 3, 1).unflatten(-1, (rows, cols)).transpose(-1, -2).reshape(batch, height, width, -1)
        return y.permute(0, 3, 1, 2)
    return x.unflatten(1, (rows, cols)).transpose(1, 2).reshape(batch, rows * cols, height, width)


def keep_channels(x: Tensor, count: int) -> Tensor:
    """The first ``count`` channels (padding a block layout added), as a dense tensor in ``x``'s format."""
    if x.shape[1] == count:
        return x
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return x[:, :count].contiguous(memory_format=fmt)


@dataclass(frozen=True)
class BlockLayout:
    """Where ``nblocks`` column blocks of width ``p`` (zero-padded to ``nblocks p`` columns) sit on a conv's
    input channels: block ``k`` reads ``span`` channels from ``firsts[k]`` on. ``firsts`` is None when the
    blocks are exactly the channel groups (``nblocks p = C_i k_h k_w`` and ``k_h k_w`` divides ``p``); else
    ``slots`` gives the place of each block column in its block's ``span x k_h k_w`` kernel (padded columns go
    to one spare slot that is dropped)."""

    nblocks: int
    span: int
    firsts: tuple[int, ...] | None
    slots: Tensor | None

    @classmethod
    @functools.lru_cache(maxsize=512)
    def of(cls, nblocks: int, width: int, geometry: ConvGeometry) -> "BlockLayout":
        positions, channels = geometry.positions, geometry.in_channels
        if width % positions == 0 and nblocks * width == channels * positions:
            return cls(nblocks, width // positions, None, None)
        cols = torch.arange(nblocks * width).reshape(nblocks, width)
        first = cols[:, 0] // positions
        last = (cols[:, -1].clamp(max=channels * positions - 1)) // positions
        span = int((last - first).max()) + 1
        slots = (cols // positions - first[:, None]) * positions + cols % positions
        slots = torch.where(cols < channels * positions, slots, span * positions)
        return cls(nblocks, span, tuple(first.tolist()), slots)

    def kernel(self, blocks: Tensor, geometry: ConvGeometry) -> Tensor:
        """The grouped conv kernel ``(nblocks o) x span x k_h x k_w`` of ``blocks`` (``nblocks x o x p``);
        differentiable in ``blocks``."""
        nblocks, rows, _ = blocks.shape
        if self.slots is None:
            return blocks.reshape(nblocks * rows, self.span, *geometry.kernel_size)
        size = self.span * geometry.positions
        flat = blocks.new_zeros(nblocks, size + 1, rows)
        slots = self.slots.to(blocks.device)
        index = (torch.arange(nblocks, device=blocks.device)[:, None].expand_as(slots), slots)
        flat = flat.index_put(index, blocks.transpose(1, 2))[:, :size]
        return flat.transpose(1, 2).reshape(nblocks * rows, self.span, *geometry.kernel_size)

    def inputs(self, x: Tensor) -> Tensor:
        """``x`` with each block's channel span laid side by side (``x`` itself when the blocks are groups):
        one ``cat`` of channel slices (``index_select`` on a channels-last map is many times slower), zero
        channels standing in past the last one."""
        if self.firsts is None:
            return x
        channels, pieces = x.shape[1], []
        fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        for first in self.firsts:
            pieces.append(x[:, first:first + self.span])
            if first + self.span > channels:
                pad = x.new_zeros(x.shape[0], first + self.span - channels, *x.shape[2:])
                pieces.append(pad.contiguous(memory_format=fmt))
        return torch.cat(pieces, dim=1)

    def conv(self, x: Tensor, kernel: Tensor, geometry: ConvGeometry, bias: Tensor | None = None) -> Tensor:
        """The grouped conv of the gathered input by ``kernel`` (from :meth:`kernel`)."""
        return geometry.conv(self.inputs(x), kernel, bias, groups=self.nblocks)
