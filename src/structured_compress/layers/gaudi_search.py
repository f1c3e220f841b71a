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

Each start is refined by AdamW on factors, widths and locations against ``||W_hat - W||^2 / ||W||^2``; after
every step the widths are cut to the budget (:func:`project_widths_`), and the best feasible iterate is kept.
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
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .gaudi import GaudiGBLRLinear

log = logging.getLogger(__name__)


STARTS = ("blocks", "lowrank", "greedy", "given")


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


def snapped_cost(widths: Tensor, axis_sizes: tuple[int, int]) -> Tensor:
    """MACs bound ``sum_i (r_i + c_i)`` over live components, with widths on the forward's grid: a component
    is live when it is more than one element wide on both axes (eval mode zeroes the others)."""
    sizes = torch.tensor(axis_sizes, dtype=torch.float64, device=widths.device)[:, None]
    cells = torch.round(widths.double().clamp(0.0, 1.0) * sizes)  # float64, exactly as the forward snaps
    return (cells.sum(0) * (cells > 1).all(0)).sum()


@torch.no_grad()
def project_widths_(widths: Tensor, axis_sizes: tuple[int, int], budget_units: float) -> None:
    """Clamp widths to [0, 1], then take the same fraction off every width (clipping at 0), the smallest
    that brings :func:`snapped_cost` within ``budget_units`` (bisection: the cost falls monotonically)."""
    widths.clamp_(0.0, 1.0)
    if float(snapped_cost(widths, axis_sizes)) <= budget_units:
        return
    low, high = 0.0, float(widths.max())
    for _ in range(48):
        middle = (low + high) / 2
        if float(snapped_cost((widths - middle).clamp_min(0.0), axis_sizes)) > budget_units:
            low = middle
        else:
            high = middle
    widths.copy_((widths - high).clamp_min(0.0))  # the same arithmetic as the accepted test above


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


def interval_masks(widths: Tensor, locations: Tensor, axis_sizes: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Boolean ``([K, n], [K, m])`` circular interval masks of on-grid widths/locations (rows [input; output])."""
    masks = []
    for axis, size in enumerate(axis_sizes):
        start = torch.round(locations[axis] * size).long()[:, None]
        length = torch.round(widths[axis].clamp(0.0, 1.0) * size).long()[:, None]
        index = torch.arange(size, device=widths.device)[None, :]
        masks.append((index - start) % size < length)
    return masks[0], masks[1]


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


def svd_error_at(singular: Tensor, macs: float, shape: tuple[int, int]) -> float:
    """Relative error of the truncated SVD at ``macs`` multiply-adds: fractional rank ``macs / (m + n)``, the squared
    error interpolated linearly between the neighbouring integer ranks."""
    energy = singular.double().square()
    tails = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)]) / energy.sum().clamp_min(1e-300)
    rank = min(macs / sum(shape), float(len(energy)))
    low = int(rank)
    high = min(low + 1, len(energy))
    return math.sqrt(float(tails[low] + (tails[high] - tails[low]) * (rank - low)))


def _load_start_(layer: GaudiGBLRLinear, start: Start) -> None:
    with torch.no_grad():
        layer.out_factors.copy_(start.out_factors[:, :, None])
        layer.in_factors.copy_(start.in_factors[:, None, :])
        layer.widths.copy_(start.widths)
        layer.locations.copy_(start.locations)


@torch.no_grad()
def _snap_structure_(layer: GaudiGBLRLinear) -> None:
    for axis, size in enumerate(layer.axis_sizes):
        layer.widths[axis] = torch.round(layer.widths[axis] * size) / size
        layer.locations[axis] = torch.round(layer.locations[axis] * size) / size
    layer.project_structure_()


def refine(layer: GaudiGBLRLinear, target: Tensor, budget_units: float, niter: int, weight_lr: float,
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
    with torch.no_grad():
        for param, value in zip(layer.parameters(), best_state):
            param.copy_(value)
    return math.sqrt(best_loss)


def _eval_errors(layer: GaudiGBLRLinear, target: Tensor) -> tuple[float, float]:
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
            max_components: int, given_locations: Callable[[], Tensor], row_thresholds: Sequence[float],
            col_thresholds: Sequence[float], filter_std: float) -> list[Start]:
    """The candidate fits of one start kind (``greedy`` gives one per threshold pair)."""
    rows, cols = target.shape
    if kind == "blocks":
        tiled = blocks_start(target, spectrum, budget_units, max_components)
        lowrank = _starts("lowrank", target, spectrum, budget_units, max_components, given_locations,
                          row_thresholds, col_thresholds, filter_std)
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
    return [Start("greedy", left, right, *greedy_intervals(target, budget_units, max_components, r, c, filter_std),
                  row_threshold=r, col_threshold=c)
            for r in row_thresholds for c in col_thresholds]


def find_structure(make_layer: Callable[[int], GaudiGBLRLinear], target: Tensor, budget_units: float, *,
                   starts: Sequence[str] = ("blocks",), max_components: int | None = None, sweeps: int = 8,
                   niter: int = 200,
                   row_thresholds: Sequence[float] = (0.98,), col_thresholds: Sequence[float] = (0.98,),
                   filter_std: float = 10.0, weight_lr: float = 2e-2,
                   structure_lr_base: float = 10.0) -> tuple[GaudiGBLRLinear, SearchReport]:
    """Fit rank-1 components to ``target`` within ``budget_units`` MACs (a block of r rows and c columns costs
    r + c); returns the fitted layer (from ``make_layer(K)``, K components, no Gaussian) and a report.

    The fit runs on ``target`` scaled to unit RMS entries; ``weight_lr`` is in those units (the reference's
    5e-3 on weights of RMS ``a`` is ``5e-3 / a`` here). Every candidate of every kind in ``starts`` is refined
    ``niter`` steps and scored in eval mode; a candidate's unrefined state is kept when refinement does not
    improve it, so ``blocks`` and ``lowrank`` are never worse than the truncated SVD at the budget.
    """
    unknown = sorted(set(starts) - set(STARTS))
    if unknown or not starts:
        raise ValueError(f"starts must be a non-empty list drawn from {STARTS}, got {list(starts)}")
    started = time.perf_counter()
    rows, cols = target.shape
    max_components = min(rows, cols) if max_components is None else min(max_components, rows, cols)
    scale = target.square().mean().sqrt().clamp_min(torch.finfo(target.dtype).tiny)
    target = target / scale  # unit RMS entries, so the learning rates do not depend on the weight's scale
    spectrum = top_singular_pairs(target, min(rows, cols))

    def given_locations() -> Tensor:
        return make_layer(max_components).locations.detach().to(target.device, target.dtype)

    best, best_layer = None, None
    for kind in dict.fromkeys(starts):
        for start in _starts(kind, target, spectrum, budget_units, max_components, given_locations,
                             row_thresholds, col_thresholds, filter_std):
            layer = make_layer(start.widths.shape[1]).to(target.device, target.dtype)
            _load_start_(layer, start)
            candidates = []
            if float(snapped_cost(start.widths, layer.axis_sizes)) <= budget_units:
                candidates.append((_eval_errors(layer, target), [p.detach().clone() for p in layer.parameters()]))
            if start.name == "blocks" and sweeps > 0:
                alternate_factors_(start, target, sweeps)
                _load_start_(layer, start)
                candidates.append((_eval_errors(layer, target), [p.detach().clone() for p in layer.parameters()]))
            if (niter > 0 and start.name in ("greedy", "given")) or not candidates:
                refine(layer, target, budget_units, niter, weight_lr, structure_lr_base / min(rows, cols))
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
