"""Structure search: fit a Gaudi-GBLR layer to a dense matrix (the reference's ``find_olb``, arXiv 2310.18882).

1. Greedy interval search (optional): columns in order of their Gram-row norm; each takes the longest
   circular run of columns strongly correlated with it, then the longest run of rows correlated with the
   rows those columns feed, until the rows+cols cost exceeds the budget. Component ``j`` keeps the
   ``j``-th singular pair as its factors.
2. Refinement: AdamW on factors, widths and locations against ``||W_hat - W||^2 / ||W||^2``, projecting the
   widths back under the budget after every step.
3. Selection: over the starts, keep the fit with the lowest relative Frobenius error.

Deliberate differences from the reference, each because the reference version loses accuracy or breaks:
a row's (column's) correlation profile is the smoothed row of the symmetric Gram matrix (the reference reads
across separately filtered columns); runs report their true start and wrap correctly on odd lengths, and
equal-length runs keep the smallest start; the width projection bounds the rows+cols cost itself (the
reference caps the mean width, which misprices non-square layers, and subtracts once then clamps, which
overshoots); refinement keeps its best iterate; the truncated SVD that fills the budget is one more start,
so the search never does worse than low rank; and starts are compared by the Frobenius error the refinement
minimises (the reference used the operator norm, which favours low rank).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from .lowrank import spectral_factors

if TYPE_CHECKING:
    from .gaudi import GaudiGBLRLinear

log = logging.getLogger(__name__)


@dataclass
class SearchReport:
    """Outcome of :func:`find_structure`: errors of the kept fit (eval-mode masks), its start and thresholds."""

    rel_error: float
    op_error: float
    start: str
    row_threshold: float | None
    col_threshold: float | None
    seconds: float


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


@torch.no_grad()
def _snap_structure_(layer: GaudiGBLRLinear) -> None:
    for axis, size in enumerate(layer.axis_sizes):
        layer.widths[axis] = torch.round(layer.widths[axis] * size) / size
        layer.locations[axis] = torch.round(layer.locations[axis] * size) / size
    layer.project_structure_()


def project_widths_(widths: Tensor, axis_sizes: tuple[int, int], budget_units: float) -> None:
    """Clamp widths to [0, 1], then take the same number of cells off every width (clipping at 0) so that
    the rows+cols cost ``sum_d N_d sum_i w_{d,i}`` fits in ``budget_units``."""
    widths.clamp_(0.0, 1.0)
    sizes = torch.tensor(axis_sizes, dtype=widths.dtype, device=widths.device)[:, None]
    cells = (widths * sizes).flatten()
    ordered = torch.sort(cells, descending=True).values
    counts = torch.arange(1, cells.numel() + 1, device=cells.device, dtype=cells.dtype)
    shifts = (ordered.cumsum(0) - budget_units) / counts  # the cut if exactly the top k stay positive
    support = (ordered > shifts).nonzero().flatten()
    cut = shifts[support[-1]].clamp_min(0.0) if support.numel() else torch.zeros((), device=cells.device)
    widths.copy_(((widths * sizes - cut) / sizes).clamp(0.0, 1.0))


def refine(layer: GaudiGBLRLinear, target: Tensor, budget_units: float, niter: int, weight_lr: float,
           structure_lr: float) -> float:
    """Joint gradient refinement of factors, widths and locations under the budget projection. Keeps the
    best iterate (the projected steps can lose ground) and returns its relative error (training masks)."""
    _snap_structure_(layer)
    optimizer = torch.optim.AdamW([
        {"params": [layer.in_factors, layer.out_factors], "lr": weight_lr},
        {"params": [layer.locations], "lr": structure_lr},
        {"params": [layer.widths], "lr": structure_lr},
    ], betas=(0.0, 0.999), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.01,
                                                 total_iters=max(niter, 1))
    scale = target.square().sum().clamp_min(torch.finfo(target.dtype).tiny)
    layer.train()
    best_loss, best_state = math.inf, None
    for step in range(niter + 1):
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():  # callers such as compress_ run under no_grad
            loss = (layer.to_dense_weight() - target).square().sum() / scale
        if loss.item() < best_loss:
            best_loss = loss.item()
            best_state = [p.detach().clone() for p in layer.parameters()]
        if step == niter:
            break
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            project_widths_(layer.widths, layer.axis_sizes, budget_units)
            layer.project_structure_()
    with torch.no_grad():
        for param, value in zip(layer.parameters(), best_state):
            param.copy_(value)
    return math.sqrt(best_loss)


def find_structure(layer: GaudiGBLRLinear, target: Tensor, budget_units: float, *, find_mask: bool = True,
                   lowrank_start: bool = True, niter: int = 200, row_thresholds: Sequence[float] = (0.98,),
                   col_thresholds: Sequence[float] = (0.98,), filter_std: float = 10.0, weight_lr: float = 2e-2,
                   structure_lr_base: float = 10.0) -> SearchReport:
    """Fit ``layer`` (rank-1 components, no Gaussian, same device/dtype as ``target``) to ``target`` in place.

    ``budget_units``: target cost in rows+cols units (a rank-1 block of r rows and c columns costs r + c).
    The fit runs on ``target`` scaled to unit RMS entries; ``weight_lr`` is in those units. Candidate starts,
    each refined, the lowest Frobenius error kept: the greedy intervals for every threshold pair
    (``find_mask``; otherwise the layer's own widths/locations), and with ``lowrank_start`` the truncated
    SVD that fills the budget (full-width components), so the result is never worse than low rank.
    """
    if layer.rank_per_component != 1 or not layer.no_gaussian:
        raise ValueError("the structure search fits rank-1 components without the Gaussian factor")
    started = time.perf_counter()
    out_features, in_features = target.shape
    tiny = torch.finfo(target.dtype).tiny
    scale = target.square().mean().sqrt().clamp_min(tiny)
    target = target / scale  # unit RMS entries, so the learning rates do not depend on the weight's scale
    left, right = spectral_factors(target, layer.num_components)
    starts: list[tuple[str, float | None, float | None]] = []
    if find_mask:
        starts += [("greedy", r, c) for r in row_thresholds for c in col_thresholds]
    else:
        starts.append(("given", None, None))
    if lowrank_start:
        starts.append(("lowrank", None, None))
    given = layer.widths.detach().clone(), layer.locations.detach().clone()
    full_rank = min(layer.num_components, int(budget_units // (out_features + in_features)))
    op_norm = torch.linalg.matrix_norm(target, ord=2).clamp_min(tiny)
    best, best_state = None, None
    for kind, row_threshold, col_threshold in starts:
        with torch.no_grad():
            layer.out_factors.copy_(left.T[:, :, None])
            layer.in_factors.copy_(right[:, None, :])
            if kind == "greedy":
                widths, locations = greedy_intervals(target, budget_units, layer.num_components, row_threshold,
                                                     col_threshold, filter_std)
            elif kind == "lowrank":
                widths, locations = torch.zeros_like(given[0]), torch.zeros_like(given[1])
                widths[:, :full_rank] = 1.0
            else:
                widths, locations = given
            layer.widths.copy_(widths)
            layer.locations.copy_(locations)
        refine(layer, target, budget_units, niter, weight_lr, structure_lr_base / min(target.shape))
        layer.eval()
        with torch.no_grad():
            residual = target - layer.to_dense_weight()
            rel_error = float(residual.norm() / target.norm().clamp_min(tiny))
            op_error = float(torch.linalg.matrix_norm(residual, ord=2) / op_norm)
        layer.train()
        log.debug("%s start (thresholds %s, %s): rel. error %.4f, op-norm error %.4f", kind, row_threshold,
                  col_threshold, rel_error, op_error)
        if best is None or rel_error < best.rel_error:
            best = SearchReport(rel_error, op_error, kind, row_threshold, col_threshold, 0.0)
            best_state = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for param, value in zip(layer.parameters(), best_state):
            param.copy_(value)
        layer.in_factors.mul_(scale.sqrt())
        layer.out_factors.mul_(scale.sqrt())
    best.seconds = time.perf_counter() - started
    return best
