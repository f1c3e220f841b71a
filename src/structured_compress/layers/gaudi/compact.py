"""The compact Gaudi-GBLR forward: each component touches only its column and row intervals.

Component ``i`` maps ``x[cols_i]`` through ``V_i`` (t x v_i) and adds ``U_i h_i`` (u_i x t) into ``y[rows_i]``,
so a token costs ``sum_i t (u_i + v_i)`` multiply-adds -- the MACs the layer counts -- instead of the ``m n`` of
the dense-mask path. Components that share a column interval are one matmul on one gathered slice of ``x``;
those that share a row interval are one matmul whose result is added into one slice of ``y``. The grouping
(the plan) depends only on the structure, so it is cached until widths or locations change. Valid whenever
the masks are exact 0/1 intervals: no Gaussian factor, widths on the grid (eval mode, or frozen in training).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import StructuredLinear

MAX_GROUPS = 64  # beyond this many distinct intervals the per-group overhead outweighs the saved MACs
MAX_COMPACT_FRACTION = 0.6  # compact MACs must be below this fraction of dense to be chosen automatically


@dataclass
class IntervalGroup:
    """Components (indices into the layer) sharing one circular interval of an axis (of one input segment)."""

    positions: Tensor  # [L] the interval's indices within the segment, in order (index the factors)
    local: slice | None  # the same as a slice when it does not wrap
    offset: int  # where the segment starts along the axis (inputs are indexed at offset + positions)
    components: Tensor  # [k] component indices


@dataclass
class CompactPlan:
    """Input groups (their order is the order of the hidden units) and output groups, plus compact MACs."""

    inputs: list[IntervalGroup]
    outputs: list[tuple[IntervalGroup, Tensor | slice]]  # with each group's hidden units (a slice if a range)
    macs: int


def _groups(starts: Tensor, lengths: Tensor, size: int, live: Tensor, segment: Tensor) -> list[IntervalGroup]:
    """Live components grouped by identical ``(segment, start, length)``: circular intervals on segments of
    length ``size``."""
    keys = ((segment * size + starts) * (size + 1) + lengths)[live]
    components = live.nonzero().flatten()
    unique, inverse = torch.unique(keys, return_inverse=True)
    groups = []
    for g, key in enumerate(unique.tolist()):
        rest, length = divmod(key, size + 1)
        index, start = divmod(rest, size)
        positions = (start + torch.arange(length, device=starts.device)) % size
        local = slice(start, start + length) if start + length <= size else None
        groups.append(IntervalGroup(positions, local, index * size, components[inverse == g]))
    return groups


@torch.no_grad()
def build_plan(layer: StructuredLinear) -> CompactPlan:
    """The grouping of ``layer``'s components by interval, from the widths/locations its forward uses now."""
    intervals = []
    for axis, size in enumerate(layer.axis_sizes):
        width = layer.effective_width(axis).detach()
        location = layer._snapped(layer.locations, axis).detach()
        intervals.append((torch.round(location * size).long() % size, torch.round(width.clamp(0, 1) * size).long()))
    live = (intervals[0][1] > 0) & (intervals[1][1] > 0)
    segment = torch.arange(layer.num_components, device=live.device) // layer.components_per_segment
    inputs = _groups(*intervals[0], layer.axis_sizes[0], live, segment)
    rank = layer.rank_per_component
    hidden_of = torch.empty(layer.num_components, dtype=torch.long, device=live.device)
    order = torch.cat([g.components for g in inputs]) if inputs else live.nonzero().flatten()
    hidden_of[order] = torch.arange(order.numel(), device=live.device)
    outputs = []
    for group in _groups(*intervals[1], layer.out_features, live, torch.zeros_like(segment)):
        hidden = (hidden_of[group.components][:, None] * rank + torch.arange(rank, device=live.device)).flatten()
        first = int(hidden[0])
        if torch.equal(hidden, torch.arange(first, first + hidden.numel(), device=live.device)):
            hidden = slice(first, first + hidden.numel())
        outputs.append((group, hidden))
    outputs.sort(key=lambda item: item[0].local != slice(0, layer.out_features))  # a full-height group first
    macs = rank * int((intervals[0][1] * live).sum() + (intervals[1][1] * live).sum())
    return CompactPlan(inputs, outputs, macs)


def _take(x: Tensor, group: IntervalGroup, offset: int = 0) -> Tensor:
    """The group's interval along the last dim of ``x``, shifted by ``offset``."""
    if group.local is not None:
        return x[..., group.local.start + offset:group.local.stop + offset]
    return x.index_select(-1, group.positions + offset)


def _bias_rows(flat: Tensor, size: int, bias: Tensor | None) -> Tensor:
    """A fresh ``[tokens, size]`` output holding the bias (zeros without one)."""
    if bias is None:
        return flat.new_zeros(len(flat), size)
    return bias.expand(len(flat), size).clone()


def compact_forward(layer: StructuredLinear, plan: CompactPlan, x: Tensor) -> Tensor:
    """``y = W x + b`` through the plan's interval slices (differentiable in the factors and ``x``). Under
    autocast it runs in the autocast dtype itself: the in-place adds need one dtype throughout."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return _compact_forward(layer, plan, x.to(dtype), dtype)
    return _compact_forward(layer, plan, x, x.dtype)


def _compact_forward(layer: StructuredLinear, plan: CompactPlan, x: Tensor, dtype: torch.dtype) -> Tensor:
    flat = x.reshape(-1, layer.in_features)
    hidden = [F.linear(_take(flat, g, g.offset), _take(layer.in_factors[g.components], g).flatten(0, 1).to(dtype))
              for g in plan.inputs]
    hidden = torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0] if hidden else flat.new_zeros(len(flat), 0)
    return compact_outputs(layer, plan, hidden, dtype).reshape(*x.shape[:-1], layer.out_features)


def compact_outputs(layer: StructuredLinear, plan: CompactPlan, hidden: Tensor, dtype: torch.dtype) -> Tensor:
    """The output half: ``[tokens, hidden units]`` (in the plan's input-group order) -> ``[tokens, m]``, each
    output group's factors added into its row interval, bias included."""
    bias = None if layer.bias is None else layer.bias.to(dtype)
    full = slice(0, layer.out_features)
    out = None
    for group, units in plan.outputs:
        factors = layer.out_factors[group.components][:, group.positions]  # k, L, t
        factors = factors.permute(1, 0, 2).reshape(group.positions.numel(), -1).to(dtype)
        inputs = hidden[:, units] if isinstance(units, slice) else hidden.index_select(-1, units)
        if out is None and group.local == full:
            out = F.linear(inputs, factors, bias)  # the full-height group writes the output, bias included
            continue
        if out is None:
            out = _bias_rows(hidden, layer.out_features, bias)
        if group.local is not None:
            out[:, group.local].addmm_(inputs, factors.T)
        else:
            out.index_add_(-1, group.positions, inputs @ factors.T)
    if out is None:
        out = _bias_rows(hidden, layer.out_features, bias)
    return out
