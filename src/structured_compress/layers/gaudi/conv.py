"""Gaudi-GBLR's compact interval form as convs over channel slices (the layer's native conv form).

Columns are in the ``"kernel"`` order (``position C_i + channel``), so a component's column interval is a run
of channels at one kernel position, or runs across a few positions. Each input group of the compact plan
(:mod:`.compact`) becomes one conv over the channel slice its interval covers: a 1 x 1 conv on the shifted,
strided input when the interval sits at one kernel position, else a k x k conv whose kernel is zero outside
the interval. The hidden channels then go through the plan's output half on channels-last pixels.

When the intervals are wide (the SVD part of a ``blocks`` start spans every column), one k x k conv by the
masked in-factors ``W1`` and one 1 x 1 conv by the masked out-factors ``W2`` (``K t`` hidden channels, like a
low-rank conv) does the same work in two calls and wins; it is also valid for soft (Gaussian) masks and a
structure that is still learning, where the sliced form is not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import StructuredLinear
from ..convforms import ConvGeometry, factored_conv, is_channels_last, pointwise
from ..fastpath import cached, grad_free
from .compact import CompactPlan, compact_outputs


def _group_columns(layer: StructuredLinear, plan: CompactPlan) -> list[tuple[Tensor, Tensor]]:
    """Per input group, its global columns and the rows of its stacked factors ``(k t, L)``."""
    out = []
    for group in plan.inputs:
        factors = layer.in_factors[group.components][:, :, group.positions].flatten(0, 1)
        out.append((group.offset + group.positions, factors))
    return out


def group_kernels(layer: StructuredLinear, plan: CompactPlan, geometry: ConvGeometry) -> list[tuple]:
    """Per input group ``(first channel, last channel + 1, kernel position or None, kernel)``: a ``(k t) x
    span`` matrix for a group at one position, else a ``(k t) x span x k_h x k_w`` kernel."""
    channels, positions = geometry.in_channels, geometry.positions
    kernels = []
    for cols, factors in _group_columns(layer, plan):
        cols = cols.to(factors.device)
        position, channel = cols // channels, cols % channels
        low, high = int(channel.min()), int(channel.max()) + 1
        if bool((position == position[0]).all()):
            kernels.append((low, high, int(position[0]), _columns(factors, channel - low, high - low)))
            continue
        flat = factors.new_zeros(high - low, positions, factors.shape[0])
        flat = flat.index_put((channel - low, position), factors.T)
        kernels.append((low, high, None, flat.permute(2, 0, 1).reshape(-1, high - low, *geometry.kernel_size)))
    return kernels


def _columns(factors: Tensor, index: Tensor, width: int) -> Tensor:
    """``factors`` (rows x L) scattered into ``width`` columns at ``index`` (differentiable)."""
    return factors.new_zeros(width, factors.shape[0]).index_put((index,), factors.T).T


def _shifted(x: Tensor, position: int, geometry: ConvGeometry, out_size: tuple[int, int]) -> Tensor:
    """The input pixels one kernel position reads: the padded map shifted by the position's offset, strided."""
    (pad_h, pad_w), (dil_h, dil_w), (str_h, str_w) = geometry.padding, geometry.dilation, geometry.stride
    if pad_h or pad_w:
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    row, col = divmod(position, geometry.kernel_size[1])
    return x[:, :, row * dil_h::str_h, col * dil_w::str_w][:, :, :out_size[0], :out_size[1]]


def output_size(x: Tensor, geometry: ConvGeometry) -> tuple[int, int]:
    sizes = []
    for axis in range(2):
        span = geometry.dilation[axis] * (geometry.kernel_size[axis] - 1) + 1
        sizes.append((x.shape[2 + axis] + 2 * geometry.padding[axis] - span) // geometry.stride[axis] + 1)
    return sizes[0], sizes[1]


SLICED_ADVANTAGE = 3.0  # the sliced form runs only when the masked-factor form needs this many times its MACs


def masked_factor_conv(layer: StructuredLinear, x: Tensor, geometry: ConvGeometry) -> Tensor:
    """``W2 (W1 x)`` with the masked factors as a k x k conv into ``K t`` channels and a 1 x 1 conv (the
    columns of ``W1``, kernel order, reordered to the conv kernel's channel order); gradients reach the
    factors and, through the masks, the widths and locations."""
    def build() -> tuple[Tensor, Tensor]:
        in_weight, out_weight = layer.masked_factors()
        kernel = in_weight.reshape(-1, *geometry.kernel_size, geometry.in_channels).permute(0, 3, 1, 2)
        return kernel.reshape(in_weight.shape[0], -1).to(x.dtype), out_weight.to(x.dtype)
    if grad_free(layer.in_factors, layer.out_factors, layer.widths, layer.locations):
        right, left = cached(layer, "masked_factors", (layer.in_factors, layer.out_factors, layer.widths,
                                                       layer.locations), build, (x.dtype, layer.training))
    else:
        right, left = build()
    return factored_conv(x, geometry, right, left, None if layer.bias is None else layer.bias.to(x.dtype))


def sliced_macs(layer: StructuredLinear, plan: CompactPlan, geometry: ConvGeometry) -> int:
    """Multiply-adds per output pixel of the sliced form: each input group's conv over its whole channel span
    (times ``k_h k_w`` when it spans several kernel positions), plus the plan's output half."""
    total = layer.rank_per_component * sum(group.positions.numel() * group.components.numel()
                                           for group, _ in plan.outputs)
    for group in plan.inputs:
        cols = group.offset + group.positions
        channel, position = cols % geometry.in_channels, cols // geometry.in_channels
        span = int(channel.max() - channel.min()) + 1
        spread = 1 if bool((position == position[0]).all()) else geometry.positions
        total += group.components.numel() * layer.rank_per_component * span * spread
    return total


def prefer_sliced(layer: StructuredLinear, plan: CompactPlan | None, geometry: ConvGeometry) -> bool:
    """Whether the sliced interval form beats the masked-factor form: only with a plan, when the latter's
    ``K t (m + n)`` MACs exceed the sliced form's (:func:`sliced_macs`) by :data:`SLICED_ADVANTAGE` (more
    calls and slices cost more per MAC). Cached per plan."""
    if plan is None:
        return False
    store = layer.__dict__.setdefault("_sliced_choice", {})
    key = (id(plan), geometry)
    if key not in store:
        hidden = layer.num_components * layer.rank_per_component
        factored = hidden * (layer.in_features + layer.out_features)
        store.clear()
        store[key] = factored > SLICED_ADVANTAGE * sliced_macs(layer, plan, geometry)
    return store[key]


def gaudi_conv(layer: StructuredLinear, plan: CompactPlan, x: Tensor, geometry: ConvGeometry) -> Tensor:
    """The layer (with an eligible compact ``plan``) as convs over channel slices; keeps ``x``'s memory
    format. Kernels are cached when no gradient reaches the factors."""
    if grad_free(layer.in_factors):
        kernels = cached(layer, "conv_kernels", (layer.in_factors, layer.widths, layer.locations),
                         lambda: group_kernels(layer, plan, geometry), (geometry, id(plan)))
    else:
        kernels = group_kernels(layer, plan, geometry)
    size = output_size(x, geometry)
    hidden = []
    for low, high, position, kernel in kernels:
        part = x[:, low:high]
        kernel = kernel.to(x.dtype)
        if position is None:
            hidden.append(geometry.conv(part, kernel))
        else:
            hidden.append(pointwise(_shifted(part, position, geometry, size), kernel))
    batch = x.shape[0]
    if not hidden:
        hidden = x.new_zeros(batch * size[0] * size[1], 0)
    else:
        hidden = torch.cat([h.permute(0, 2, 3, 1) for h in hidden], dim=-1).reshape(-1, sum(
            h.shape[1] for h in hidden))
    y = compact_outputs(layer, plan, hidden, x.dtype).reshape(batch, *size, layer.out_features).permute(0, 3, 1, 2)
    return y if is_channels_last(x) else y.contiguous()
