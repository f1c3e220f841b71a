"""Candidate starts of the Gaudi-GBLR structure search (see :mod:`.search`): the greedy interval search of the
reference, the tiled ``blocks`` start, and alternating least squares on a start's factors with its structure fixed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .mask import interval_masks


@dataclass
class Start:
    """A candidate fit: factors ``[K, m]`` / ``[K, n]`` (one rank-1 component per row), structure ``[2, K]``."""

    name: str
    out_factors: Tensor
    in_factors: Tensor
    widths: Tensor
    locations: Tensor
    row_threshold: float | None = None
    col_threshold: float | None = None


def smooth_circular(rows: Tensor, std: float) -> Tensor:
    """Circular convolution of each row with a normalised Gaussian (radius ``floor(4 std + 0.5)``)."""
    size = rows.shape[-1]
    radius = int(4 * std + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=rows.device)
    taps = torch.exp(-offsets.to(rows.dtype).square() / (2 * std ** 2))
    kernel = torch.zeros(size, dtype=rows.dtype, device=rows.device).index_add_(0, offsets % size, taps / taps.sum())
    return torch.fft.irfft(torch.fft.rfft(rows, dim=-1) * torch.fft.rfft(kernel), n=size, dim=-1)


def correlation_profile(rows: Tensor, std: float) -> Tensor:
    """``|row| / max|row|``, smoothed circularly: where along the axis a row has most of its mass."""
    magnitude = rows.abs()
    peak = magnitude.amax(-1, keepdim=True)
    return smooth_circular(magnitude / torch.where(peak > 0, peak, torch.ones_like(peak)), std)


def above_fraction_of_max(profile: Tensor, threshold: float) -> Tensor:
    """``profile > threshold * max(profile)`` per row (all False for an all-zero row)."""
    return profile > threshold * profile.amax(-1, keepdim=True)


def longest_circular_run(flags: Tensor) -> tuple[int, int]:
    """``(start, length)`` of the longest circular run of True in a 1-D mask; ties keep the smallest start.
    All True gives ``(0, N)``, all False ``(0, 0)``."""
    flags = flags.detach().bool().cpu()
    size = flags.numel()
    if bool(flags.all()):
        return 0, size
    if not bool(flags.any()):
        return 0, 0
    shift = int((~flags).nonzero()[0]) + 1  # start the scan just after a zero, so no run is cut in two
    rotated = torch.cat([torch.zeros(1, dtype=torch.int8), flags.roll(-shift).to(torch.int8),
                         torch.zeros(1, dtype=torch.int8)])
    edges = rotated.diff()
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    lengths = ends - starts
    starts = (starts + shift) % size
    best = int(torch.argmax(lengths * size - starts))  # longest first, then smallest start
    return int(starts[best]), int(lengths[best])


@torch.no_grad()
def greedy_intervals(target: Tensor, budget_units: float, num_components: int, row_threshold: float,
                     col_threshold: float, filter_std: float) -> tuple[Tensor, Tensor]:
    """Widths and locations ``[2, K]`` (rows ``[input; output]``) from the greedy interval search;
    components beyond the rows+cols budget get zero width (the one that crosses it included)."""
    out_features, in_features = target.shape
    row_gram, col_gram = target @ target.T, target.T @ target
    row_masks = above_fraction_of_max(correlation_profile(row_gram, filter_std), row_threshold)
    col_masks = above_fraction_of_max(correlation_profile(col_gram, filter_std), col_threshold)
    col_order = torch.argsort(col_gram.norm(dim=0), descending=True, stable=True).tolist()
    row_order = torch.argsort(row_gram.norm(dim=1), descending=True, stable=True).tolist()
    widths = torch.zeros(2, num_components, dtype=target.dtype)
    locations = torch.zeros(2, num_components, dtype=target.dtype)
    used = 0
    for j in range(num_components):
        col_start, col_len = longest_circular_run(col_masks[col_order[j]])
        if col_len == in_features:
            row_mask = row_masks[row_order[j]]
        elif col_len == 0:
            row_mask = torch.zeros(out_features, dtype=torch.bool)
        else:
            cols = (col_start + torch.arange(col_len, device=target.device)) % in_features
            block = target[:, cols]
            # ||row r of block block^T||^2 = b_r^T (block^T block) b_r, without forming the m x m product
            strongest = torch.argmax(((block @ col_gram[cols][:, cols]) * block).sum(1))
            profile = correlation_profile(block @ block[strongest], filter_std)
            row_mask = above_fraction_of_max(profile, row_threshold)
        row_start, row_len = longest_circular_run(row_mask)
        widths[:, j] = torch.tensor([col_len / in_features, row_len / out_features])
        locations[:, j] = torch.tensor([col_start / in_features, row_start / out_features])
        if row_len and col_len:
            used += row_len + col_len
        if used > budget_units:
            widths[:, j:] = 0.0
            break
    return widths.to(target.device), locations.to(target.device)


def top_singular_pairs(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_r, s_r, V_r^T)`` of ``matrix`` from the eigendecomposition of its smaller Gram matrix in float64
    (several times faster than a full SVD on CPU; accurate for the leading pairs the search uses)."""
    wide = matrix.shape[0] < matrix.shape[1]
    work = (matrix.T if wide else matrix).double()
    values, vectors = torch.linalg.eigh(work.T @ work)
    values, vectors = values.flip(0)[:rank].clamp_min(0.0), vectors.flip(1)[:, :rank]
    singular = values.sqrt()
    left = work @ vectors / torch.where(singular > 0, singular, torch.ones_like(singular))
    left, right = (vectors, left) if wide else (left, vectors)
    return left.to(matrix.dtype), singular.to(matrix.dtype), right.T.to(matrix.dtype)


def _interval_bounds(size: int, parts: int) -> list[int]:
    return [round(i * size / parts) for i in range(parts + 1)]


def tilings_for(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Row x column splits the ``blocks`` start tries: along the long axis for elongated layers, else both."""
    rows, cols = shape
    if rows >= 2 * cols:
        return [(2, 1), (4, 1)]
    if cols >= 2 * rows:
        return [(1, 2), (1, 4)]
    return [(2, 1), (1, 2), (2, 2)]


def _block_atoms(residual: Tensor, row_bounds: list[int], col_bounds: list[int], units: float, count: int):
    """Top rank-1 atoms of each tile of ``residual`` that could fit in ``units`` MACs, as
    ``(energy, cost, row tile, col tile, u, v)``; ``count`` caps the atoms per tile."""
    atoms = []
    for i in range(len(row_bounds) - 1):
        for j in range(len(col_bounds) - 1):
            block = residual[row_bounds[i]:row_bounds[i + 1], col_bounds[j]:col_bounds[j + 1]]
            cost = block.shape[0] + block.shape[1]
            rank = min(min(block.shape), int(units // cost), count)
            if rank < 1:
                continue
            u, s, vh = top_singular_pairs(block, rank)
            atoms += [(float(s[k]) ** 2, cost, i, j, u[:, k] * s[k].sqrt(), vh[k] * s[k].sqrt())
                      for k in range(rank)]
    return atoms


def _allocate(atoms: list, units: float, count: int) -> list:
    """Greedy by energy per MAC (exact for equal costs, which even tilings nearly have)."""
    chosen, used = [], 0.0
    for atom in sorted(atoms, key=lambda a: -a[0] / a[1]):
        if len(chosen) == count:
            break
        if used + atom[1] <= units:
            chosen.append(atom)
            used += atom[1]
    return chosen


@torch.no_grad()
def blocks_start(target: Tensor, spectrum: tuple[Tensor, Tensor, Tensor], budget_units: float,
                 max_components: int, fractions: Sequence[float] = (0.5, 0.75)) -> tuple[Start, float] | None:
    """The best tiled start and its relative error (exact, before refinement): for each SVD share in
    ``fractions`` and tiling in :func:`tilings_for`, that share of the truncated SVD plus the residual's best
    tile atoms in the rest of the budget. None when nothing fits. ``spectrum``: ``target``'s ``(U, s, V^T)``."""
    rows, cols = target.shape
    full_rank = min(max_components, int(budget_units // (rows + cols)))
    u, s, vh = spectrum
    total = float(target.square().sum())
    energy = s.double().square().cumsum(0)
    best_error, best = math.inf, None
    for fraction in fractions:
        head = int(fraction * full_rank)
        residual = target - (u[:, :head] * s[:head]) @ vh[:head]
        left_units, left_count = budget_units - head * (rows + cols), max_components - head
        head_energy = float(energy[head - 1]) if head else 0.0
        for tiling in tilings_for((rows, cols)):
            row_bounds, col_bounds = _interval_bounds(rows, tiling[0]), _interval_bounds(cols, tiling[1])
            chosen = _allocate(_block_atoms(residual, row_bounds, col_bounds, left_units, left_count),
                               left_units, left_count)
            error = total - head_energy - sum(atom[0] for atom in chosen)
            if chosen and error < best_error:
                best_error, best = error, (head, row_bounds, col_bounds, chosen)
    if best is None:
        return None
    head, row_bounds, col_bounds, chosen = best
    size = max(head + len(chosen), 1)
    out_factors = torch.zeros(size, rows, dtype=target.dtype, device=target.device)
    in_factors = torch.zeros(size, cols, dtype=target.dtype, device=target.device)
    widths = torch.zeros(2, size, dtype=target.dtype, device=target.device)
    locations = torch.zeros_like(widths)
    root = s[:head].sqrt()
    out_factors[:head], in_factors[:head], widths[:, :head] = (u[:, :head] * root).T, root[:, None] * vh[:head], 1.0
    for k, (_, _, i, j, left, right) in enumerate(chosen, start=head):
        out_factors[k, row_bounds[i]:row_bounds[i + 1]] = left
        in_factors[k, col_bounds[j]:col_bounds[j + 1]] = right
        widths[:, k] = torch.tensor([(col_bounds[j + 1] - col_bounds[j]) / cols,
                                     (row_bounds[i + 1] - row_bounds[i]) / rows])
        locations[:, k] = torch.tensor([col_bounds[j] / cols, row_bounds[i] / rows])
    return Start("blocks", out_factors, in_factors, widths, locations), math.sqrt(max(best_error, 0.0) / total)


def _least_squares_rows(target: Tensor, basis: Tensor, mask: Tensor, ridge: float) -> Tensor:
    """``X [K, R]`` minimising ``||X^T basis - target||`` with ``X[k, r] = 0`` where ``mask[k, r]`` is False,
    for ``target [R, C]`` and ``basis [K, C]``: one ridge-regularised normal-equation solve per distinct
    pattern of active components (rows with the same pattern share it)."""
    result = torch.zeros(mask.shape, dtype=target.dtype, device=target.device)
    patterns, group = torch.unique(mask.T, dim=0, return_inverse=True)
    for g, pattern in enumerate(patterns):
        active = pattern.nonzero().flatten()
        if active.numel() == 0:
            continue
        rows = (group == g).nonzero().flatten()
        sub = basis[active]
        gram = sub @ sub.T
        gram.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-30))
        result[active[:, None], rows[None, :]] = torch.linalg.solve(gram, sub @ target[rows].T)
    return result


@torch.no_grad()
def alternate_factors_(start: Start, target: Tensor, sweeps: int, ridge: float = 1e-6) -> None:
    """Alternating least squares on the factors of ``start`` with its structure fixed: each half-sweep solves
    exactly for all output (then input) factors given the others, so the error never rises. A row's
    factors only see the components whose interval covers it, which keeps every solve small."""
    rows, cols = target.shape
    mask_in, mask_out = interval_masks(start.widths, start.locations, (cols, rows))
    out_factors, in_factors = start.out_factors * mask_out, start.in_factors * mask_in
    for _ in range(sweeps):
        out_factors = _least_squares_rows(target, in_factors, mask_out, ridge)
        in_factors = _least_squares_rows(target.T, out_factors, mask_in, ridge)
    start.out_factors, start.in_factors = out_factors, in_factors
