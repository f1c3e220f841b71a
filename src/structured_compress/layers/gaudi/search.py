"""Structure search: fit a Gaudi-GBLR layer to a dense matrix at a MACs budget (arXiv 2310.18882, ``find_olb``).

Starts (each gives factors, widths and locations; the lowest relative Frobenius error wins):

* ``blocks`` (default): the truncated SVD that fills the budget, or a shorter SVD plus rank-1 blocks of its
  residual on an even tiling of the rows/columns (each block's own top singular pairs, allocated greedily by
  energy per MAC) -- whichever captures the most energy. Its error is exact before any refinement, so it is
  never worse than low rank; it beats it where the residual has block structure (e.g. per-head slices).
* ``lowrank``: the truncated SVD that fills the budget (full-width components).
* ``greedy``: the reference's greedy interval search -- columns in order of their Gram-row norm, each taking
  the longest circular run of correlated columns and then of correlated rows -- with the ``j``-th singular pair
  as component ``j``'s factors, for every threshold pair.
* ``given``: full widths at the layer's own locations, cut to the budget (the reference's ``find_mask=False``).

``blocks`` is refined by alternating least squares on its factors (``sweeps``, structure fixed). ``greedy`` and
``given`` -- and any start that exceeds the budget, e.g. ``lowrank`` below one full component -- are refined by
AdamW on factors, widths and locations against ``||W_hat - W||^2 / ||W||^2`` (``niter`` steps); after every step
the widths are cut to the budget (:func:`.mask.project_widths_`), and the best feasible iterate is kept.
The budget holds exactly: it counts the rows+cols of every live component on the grid the forward uses.

Deliberate differences from the reference, each because the reference version loses accuracy or breaks:
a row's (column's) correlation profile is the smoothed row of the symmetric Gram matrix (the reference reads
across separately filtered columns); runs report their true start and wrap correctly on odd lengths, and
equal-length runs keep the smallest start; the width cut bounds the snapped cost of live components itself
(the reference caps the mean width, which misprices non-square layers); refinement keeps its best feasible
iterate; and starts are compared by the Frobenius error the refinement minimises (the reference used the
operator norm, which favours low rank).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ...progress import progress_bar
from ..base import StructuredLinear
from .config import GaudiConfig
from .mask import project_widths_, snapped_cost
from .starts import Start, alternate_factors_, blocks_start, greedy_intervals, top_singular_pairs

log = logging.getLogger(__name__)


@dataclass
class SearchReport:
    """Outcome of :func:`find_structure`: errors of the kept fit (eval-mode masks) and of the truncated SVD
    at the same MACs (fractional rank, squared error interpolated), its start, thresholds and time."""

    rel_error: float
    op_error: float
    svd_error: float
    macs_fraction: float
    start: str
    row_threshold: float | None
    col_threshold: float | None
    seconds: float


def svd_error_at(singular: Tensor, macs: float, shape: tuple[int, int]) -> float:
    """Relative error of the truncated SVD at ``macs`` multiply-adds: fractional rank ``macs / (m + n)``, the squared
    error interpolated linearly between the neighbouring integer ranks."""
    energy = singular.double().square()
    tails = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)]) / energy.sum().clamp_min(1e-300)
    rank = min(macs / sum(shape), float(len(energy)))
    low = int(rank)
    high = min(low + 1, len(energy))
    return math.sqrt(float(tails[low] + (tails[high] - tails[low]) * (rank - low)))


def _load_start_(layer: StructuredLinear, start: Start) -> None:
    with torch.no_grad():
        layer.out_factors.copy_(start.out_factors[:, :, None])
        layer.in_factors.copy_(start.in_factors[:, None, :])
        layer.widths.copy_(start.widths)
        layer.locations.copy_(start.locations)


@torch.no_grad()
def _snap_structure_(layer: StructuredLinear) -> None:
    for axis, size in enumerate(layer.axis_sizes):
        layer.widths[axis] = torch.round(layer.widths[axis] * size) / size
        layer.locations[axis] = torch.round(layer.locations[axis] * size) / size
    layer.project_structure_()


def refine(layer: StructuredLinear, target: Tensor, budget_units: float, niter: int, weight_lr: float,
           structure_lr: float) -> float:
    """Joint gradient refinement of factors, widths and locations. The widths are cut to the budget before
    the first step and after every step, so every iterate is feasible; keeps the best one and returns its
    relative error (training masks)."""
    _snap_structure_(layer)
    project_widths_(layer.widths, layer.axis_sizes, budget_units)
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
    with progress_bar(niter, "gaudi refine", "step", leave=False) as bar:
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
                layer.project_structure_()
                project_widths_(layer.widths, layer.axis_sizes, budget_units)
            bar.update(1)
            bar.set_postfix(error=f"{math.sqrt(best_loss):.4f}", refresh=False)
    with torch.no_grad():
        for param, value in zip(layer.parameters(), best_state):
            param.copy_(value)
    return math.sqrt(best_loss)


def _eval_errors(layer: StructuredLinear, target: Tensor) -> tuple[float, float]:
    """Relative Frobenius and operator-norm errors of ``layer`` in eval mode (the mode it is used in)."""
    tiny = torch.finfo(target.dtype).tiny
    layer.eval()
    with torch.no_grad():
        residual = target - layer.to_dense_weight()
        rel = float(residual.norm() / target.norm().clamp_min(tiny))
        op = float(torch.linalg.matrix_norm(residual, ord=2)
                   / torch.linalg.matrix_norm(target, ord=2).clamp_min(tiny))
    layer.train()
    return rel, op


def _starts(kind: str, target: Tensor, spectrum: tuple[Tensor, Tensor, Tensor], budget_units: float,
            max_components: int, given_locations: Callable[[], Tensor], config: GaudiConfig) -> list[Start]:
    """The candidate fits of one start kind (``greedy`` gives one per threshold pair)."""
    rows, cols = target.shape
    if kind == "blocks":
        tiled = blocks_start(target, spectrum, budget_units, max_components)
        lowrank = _starts("lowrank", target, spectrum, budget_units, max_components, given_locations, config)
        return lowrank if tiled is None else [tiled[0]] + lowrank
    u, s, vh = spectrum
    rank = max(1, min(max_components, int(budget_units // (rows + cols)))) if kind == "lowrank" else max_components
    root = s[:rank].sqrt()
    left, right = (u[:, :rank] * root).T, root[:, None] * vh[:rank]
    if kind == "lowrank":
        widths = torch.ones(2, rank, dtype=target.dtype, device=target.device)
        return [Start("lowrank", left, right, widths, torch.zeros_like(widths))]
    if kind == "given":
        locations = given_locations()
        return [Start("given", left, right, torch.ones_like(locations), locations)]
    return [Start("greedy", left, right,
                  *greedy_intervals(target, budget_units, max_components, r, c, config.filter_std),
                  row_threshold=r, col_threshold=c)
            for r in config.row_thresholds for c in config.col_thresholds]


def find_structure(make_layer: Callable[[int], StructuredLinear], target: Tensor, budget_units: float,
                   config: GaudiConfig) -> tuple[StructuredLinear, SearchReport]:
    """Fit rank-1 components to ``target`` within ``budget_units`` MACs (a block of r rows and c columns costs
    r + c); returns the fitted layer (from ``make_layer(K)``, K components, no Gaussian) and a report.

    The fit runs on ``target`` scaled to unit RMS entries; ``config.weight_lr`` is in those units (the
    reference's 5e-3 on weights of RMS ``a`` is ``5e-3 / a`` here). Every candidate of every kind in
    ``config.starts`` is scored in eval mode -- ``blocks`` after ``sweeps`` least-squares sweeps, ``greedy`` and
    ``given`` after ``niter`` refinement steps; a candidate's unrefined state is kept when refinement does not
    improve it, so ``blocks`` and ``lowrank`` are never worse than the truncated SVD at the budget.
    """
    started = time.perf_counter()
    rows, cols = target.shape
    max_components = min(rows, cols) if config.num_components is None else min(config.num_components, rows, cols)
    scale = target.square().mean().sqrt().clamp_min(torch.finfo(target.dtype).tiny)
    target = target / scale  # unit RMS entries, so the learning rates do not depend on the weight's scale
    spectrum = top_singular_pairs(target, min(rows, cols))

    def given_locations() -> Tensor:
        return make_layer(max_components).locations.detach().to(target.device, target.dtype)

    best, best_layer = None, None
    for kind in config.starts:
        for start in _starts(kind, target, spectrum, budget_units, max_components, given_locations, config):
            layer = make_layer(start.widths.shape[1]).to(target.device, target.dtype)
            _load_start_(layer, start)
            candidates = []
            if float(snapped_cost(start.widths, layer.axis_sizes)) <= budget_units:
                candidates.append((_eval_errors(layer, target), [p.detach().clone() for p in layer.parameters()]))
            if start.name == "blocks" and config.sweeps > 0:
                alternate_factors_(start, target, config.sweeps)
                _load_start_(layer, start)
                candidates.append((_eval_errors(layer, target), [p.detach().clone() for p in layer.parameters()]))
            if (config.niter > 0 and start.name in ("greedy", "given")) or not candidates:
                refine(layer, target, budget_units, config.niter, config.weight_lr,
                       config.structure_lr_base / min(rows, cols))
                candidates.append((_eval_errors(layer, target), None))
            (rel_error, op_error), state = min(candidates, key=lambda c: c[0][0])
            if state is not None:
                with torch.no_grad():
                    for param, value in zip(layer.parameters(), state):
                        param.copy_(value)
            log.debug("%s start (thresholds %s, %s): rel. error %.4f, op-norm error %.4f", start.name,
                      start.row_threshold, start.col_threshold, rel_error, op_error)
            if best is None or rel_error < best.rel_error:
                best = SearchReport(rel_error, op_error, 0.0, 0.0, start.name, start.row_threshold,
                                    start.col_threshold, 0.0)
                best_layer = layer
    with torch.no_grad():
        best_layer.in_factors.mul_(scale.sqrt())
        best_layer.out_factors.mul_(scale.sqrt())
    best_layer.eval()
    macs = best_layer.macs_per_token()
    best_layer.train()
    best.macs_fraction = macs / (rows * cols)
    best.svd_error = svd_error_at(spectrum[1], macs, (rows, cols))
    best.seconds = time.perf_counter() - started
    return best_layer, best


@torch.no_grad()
def kept_components(search: StructuredLinear, drop_empty: bool) -> Tensor:
    """Which of a fitted search layer's components to keep; zeroes the widths of those eval mode drops (one
    element or less on an axis), so train and eval outputs agree."""
    sizes = torch.tensor(search.axis_sizes, device=search.widths.device, dtype=search.widths.dtype)[:, None]
    live = (torch.round(search.widths * sizes) > 1).all(0)  # as `active` in macs_per_token
    search.widths[:, ~live] = 0.0
    keep = live.clone() if drop_empty else torch.ones_like(live)
    keep[0] |= ~keep.any()  # a layer needs one component; a dead one stays zero
    return keep


@torch.no_grad()
def whole_layer_report(layer: StructuredLinear, weight: Tensor, parts: list[SearchReport]) -> SearchReport:
    """One report for a layer fitted segment by segment: its errors and the whole matrix's SVD baseline."""
    layer.eval()
    target = weight.detach().to(layer.in_factors.dtype)
    residual = target - layer.to_dense_weight()
    macs = layer.macs_per_token()
    layer.train()
    return SearchReport(
        rel_error=float(residual.norm() / target.norm()),
        op_error=float(torch.linalg.matrix_norm(residual, ord=2) / torch.linalg.matrix_norm(target, ord=2)),
        svd_error=svd_error_at(torch.linalg.svdvals(target.double()), macs, tuple(target.shape)),
        macs_fraction=macs / target.numel(), start="/".join(sorted({p.start for p in parts})),
        row_threshold=None, col_threshold=None, seconds=sum(p.seconds for p in parts))
