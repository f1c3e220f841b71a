"""The greedy ternary decomposition ``W ~= T_U diag(s) T_V`` (entries of ``T_U``, ``T_V`` in {-1, 0, 1}, float
``s``) behind the ternary-SVD layer (:mod:`.tsvd`): ternarize the top singular vectors of the residual, refit
every scale jointly by least squares, repeat until the residual's spectral norm falls below
``tolerance * sigma_max(W)``.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from ..progress import progress_bar
from .base import check_budget
from .config import OptionError

_DAMPING = 1e-5  # ridge on the scale system, relative to each component's own diagonal entry


def sorted_descending(rows: Tensor) -> Tensor:
    """Each row sorted in descending order; on the CPU through NumPy, whose sort of a float row is about 25x
    faster than ``torch.sort`` here (a greedy step sorts ``2k`` rows of up to a few thousand entries)."""
    if rows.device.type != "cpu" or rows.requires_grad:
        return rows.sort(dim=-1, descending=True).values
    return torch.from_numpy(np.sort(rows.numpy(), axis=-1)[..., ::-1].copy())


def ternarize(vectors: Tensor, cos_thresh: float) -> Tensor:
    """Ternary version of each row: ``sign(a) * [|a| >= theta]`` with the sparsest support whose cosine with
    the (normalised) row reaches ``cos_thresh`` (the best cosine if none does); ``cos_thresh <= 0``: ``sign(a)``."""
    sign = torch.where(vectors >= 0, 1.0, -1.0).to(vectors.dtype)
    if cos_thresh <= 0:
        return sign
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    mags = sorted_descending(unit.abs())
    support = torch.arange(1, unit.shape[-1] + 1, device=unit.device, dtype=unit.dtype)
    cosines = mags.cumsum(dim=-1) / support.sqrt()
    reaches = cosines >= cos_thresh
    keep = torch.where(reaches.any(dim=-1), reaches.to(torch.uint8).argmax(dim=-1), cosines.argmax(dim=-1))
    theta = mags.gather(-1, keep[:, None])
    return sign * (unit.abs() >= theta)


class ScaleFit:
    """Least-squares scales ``s`` for ``target ~= t_u diag(s) t_v`` with ternary ``t_u``, ``t_v``.

    Normal equations ``((t_u^T t_u) o (t_v t_v^T)) s = diag(t_u^T target t_v^T)`` (Hadamard product), damped
    by ``1e-5`` times each component's own diagonal entry (duplicate ternary vectors make the system singular),
    solved in float64 through a Cholesky factor ``L`` that ``extend`` grows by one bordered block per greedy
    step: appending ``k`` components costs ``O(r^2 k)`` instead of a fresh ``O(r^3)`` factorisation (ternary
    products are exact in float32). ``L`` is kept as its row blocks, so growing it copies nothing, and the
    forward substitution ``L^{-1} rhs`` is extended with the system: a solve is one back substitution.
    """

    def __init__(self, target: Tensor, t_u: Tensor, t_v: Tensor):
        self.target = target
        self.rank = 0
        self._u = target.new_zeros(target.shape[0], 0)  # columns [0, rank) are t_u; the rest is spare capacity
        self._v = target.new_zeros(0, target.shape[1])
        self.blocks: list[tuple[int, Tensor, Tensor]] = []  # (first row, L[rows, :first], L[rows, rows])
        self.forward = torch.zeros(0, dtype=torch.float64, device=target.device)  # L^{-1} rhs
        self.last_block = torch.zeros(0, 0, dtype=torch.float64, device=target.device)  # its damped Gram
        if t_u.shape[1]:
            self.extend(t_u, t_v)

    @property
    def t_u(self) -> Tensor:
        return self._u[:, :self.rank]

    @property
    def t_v(self) -> Tensor:
        return self._v[:self.rank]

    def extend(self, new_u: Tensor, new_v: Tensor) -> None:
        """Append components ``new_u`` (m x k) / ``new_v`` (k x n) to the system."""
        rank, count = self.rank, new_u.shape[1]
        cross = (self.t_u.T @ new_u).double() * (self.t_v @ new_v.T).double()
        block = (new_u.T @ new_u).double() * (new_v @ new_v.T).double()
        block = block + torch.diag(_DAMPING * block.diagonal().clamp(min=1.0))
        self.last_block = block
        lower = self._forward_solve(cross).T.contiguous()
        corner = torch.linalg.cholesky(block - lower @ lower.T)
        rhs = ((new_u.T @ self.target) * new_v).sum(dim=1).double()
        self.forward = torch.cat([self.forward, torch.linalg.solve_triangular(
            corner, (rhs - lower @ self.forward)[:, None], upper=False)[:, 0]])
        self.blocks.append((rank, lower, corner))
        self._reserve(rank + count)
        self._u[:, rank:rank + count], self._v[rank:rank + count] = new_u, new_v
        self.rank = rank + count

    def _reserve(self, rank: int) -> None:
        """Room for ``rank`` components in the factor buffers, doubling so that appending is amortised O(1)."""
        if rank <= self._u.shape[1]:
            return
        room = max(rank, 2 * self._u.shape[1])
        grown_u, grown_v = self._u.new_zeros(self._u.shape[0], room), self._v.new_zeros(room, self._v.shape[1])
        grown_u[:, :self.rank], grown_v[:self.rank] = self.t_u, self.t_v
        self._u, self._v = grown_u, grown_v

    def _forward_solve(self, rhs: Tensor) -> Tensor:
        """``L^{-1} rhs`` by block forward substitution."""
        out = torch.empty_like(rhs)
        for first, lower, corner in self.blocks:
            part = rhs[first:first + len(corner)] - lower @ out[:first]
            out[first:first + len(corner)] = torch.linalg.solve_triangular(corner, part, upper=False)
        return out

    def _back_solve(self, rhs: Tensor) -> Tensor:
        """``L^{-T} rhs`` by block back substitution."""
        out = rhs.clone()
        for first, lower, corner in reversed(self.blocks):
            rows = slice(first, first + len(corner))
            out[rows] = torch.linalg.solve_triangular(corner.T, out[rows], upper=True)
            out[:first] -= lower.T @ out[rows]
        return out

    def new_scales(self, residual: Tensor) -> Tensor:
        """Scales of the components of the last ``extend`` alone, fitted to ``residual`` (the other scales held)."""
        new_u, new_v = self.t_u[:, -len(self.last_block):], self.t_v[-len(self.last_block):]
        rhs = ((new_u.T @ residual) * new_v).sum(dim=1).double()
        return torch.linalg.solve(self.last_block, rhs).to(residual.dtype)

    def solve(self) -> tuple[Tensor, Tensor]:
        """``(s, residual)``."""
        if self.rank == 0:
            return self.target.new_zeros(0), self.target.clone()
        scales = self._back_solve(self.forward[:, None])[:, 0].to(self.target.dtype)
        return scales, torch.addmm(self.target, self.t_u * scales, self.t_v, alpha=-1)


def fit_scales(target: Tensor, t_u: Tensor, t_v: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, residual)`` of the least-squares scales for fixed ternary factors (see :class:`ScaleFit`)."""
    return ScaleFit(target, t_u, t_v).solve()


def top_singular(matrix: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``count`` singular triplets ``(U [m, k], S [k], V [n, k])``, exact: from the eigendecomposition
    of the Gram matrix of the smaller side (``min(m, n)^2`` entries), far cheaper than a full SVD for the
    tall or wide matrices of a network and, unlike a randomized SVD, accurate in the top singular value
    that the stopping rule reads."""
    if matrix.shape[0] > matrix.shape[1]:
        v, s, u = top_singular(matrix.T, count)
        return u, s, v
    values, vectors = top_eigenpairs(matrix @ matrix.T, count)
    order = values.clamp(min=0).sqrt()
    u = vectors
    v = (matrix.T @ u) / order.clamp(min=torch.finfo(matrix.dtype).tiny)
    return u, order, v


def top_eigenpairs(gram: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest eigenvalues (descending) and their eigenvectors (columns) of a symmetric matrix.
    On the CPU only those are computed (LAPACK ``syevr`` through SciPy: the tridiagonal reduction plus
    ``count`` vectors, about 1.5x faster than all of them for a tenth of the spectrum)."""
    size = gram.shape[0]
    if gram.device.type != "cpu" or gram.requires_grad:
        values, vectors = torch.linalg.eigh(gram)
        return values.flip(0)[:count], vectors.flip(1)[:, :count]
    values, vectors = scipy.linalg.eigh(gram.numpy(), subset_by_index=[size - count, size - 1], driver="evr")
    return torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1].copy())


def spectral_norm(matrix: Tensor) -> float:
    """``sigma_max(matrix)`` from an exact SVD (singular values only), in float64."""
    return torch.linalg.svdvals(matrix.double())[0].item() if matrix.numel() else 0.0


def stride_for(out_features: int, in_features: int, steps: int) -> int:
    """Components added per greedy step: the low-rank break-even rank ``mn/(m+n)`` split into ``steps``."""
    return max(1, (out_features * in_features) // ((out_features + in_features) * steps))


def rank_cap(budget: float, out_features: int, in_features: int) -> int:
    """Largest rank whose 2-bit ternary factors fit in ``budget`` times the dense fp16 weight's bits; a budget
    below one component is an error, not a silent rank 1 over the budget."""
    check_budget(budget)
    rank = math.floor(8 * budget * out_features * in_features / (out_features + in_features))
    if rank < 1:
        smallest = (out_features + in_features) / (8 * out_features * in_features)
        raise OptionError("budget", budget, f"with budget_cap, keeps less than one ternary component of a "
                          f"{out_features}x{in_features} layer", f"raise layer.budget to at least {smallest:.2g}, "
                          "drop budget_cap, or exclude the layer with layer.exclude")
    return rank


def ternary_decomposition(target: Tensor, tolerance: float, cos_thresh: float, stride: int,
                          max_rank: int | None = None, init: tuple[Tensor, Tensor] | None = None,
                          refit_every: int = 1) -> tuple[Tensor, Tensor, Tensor, float]:
    """Greedy ternary SVD of ``target`` (float): returns ``(t_u, s, t_v, error)`` with the true spectral error
    ``error = sigma_max(E) / sigma_max(target)`` of the final residual ``E`` (exact SVDs). Stops once
    ``error < tolerance``, or when ``max_rank`` (``None``: unbounded) is reached. ``init`` warm-starts from
    given ternary components.

    ``refit_every``: all scales are refitted jointly every this many greedy steps (1, as published: every
    step); in between, only the new components' scales are fitted to the residual, which is then updated in
    place (``m n k`` work instead of the ``m n r`` of a fresh residual). The stop is only ever judged, and
    the result only ever returned, on jointly refitted scales."""
    if refit_every < 1:
        raise ValueError(f"refit_every must be >= 1, got {refit_every}")
    fit = ScaleFit(target, *((target.new_zeros(target.shape[0], 0), target.new_zeros(0, target.shape[1]))
                             if init is None else init))
    scales, residual = fit.solve()
    reference = spectral_norm(target)
    stale = 0  # greedy steps since the last joint refit
    with progress_bar(max_rank, f"tsvd {target.shape[0]}x{target.shape[1]}", "component", leave=False) as bar:
        while True:
            room = stride if max_rank is None else min(stride, max_rank - len(scales))
            u, top, v = top_singular(residual, max(1, min(room, *residual.shape)))
            error = 0.0 if reference == 0 else top[0].item() / reference
            if (error < tolerance or room <= 0) and stale:
                (scales, residual), stale = fit.solve(), 0
                continue
            if error < tolerance or room <= 0:  # confirm with an exact SVD of the residual: it is the reported error
                error = 0.0 if reference == 0 else spectral_norm(residual) / reference
                if error < tolerance or room <= 0:
                    return fit.t_u.clone(), scales, fit.t_v.clone(), error
            new_u, new_v = ternarize(u.T, cos_thresh).T, ternarize(v.T, cos_thresh)
            fit.extend(new_u, new_v)
            bar.update(new_u.shape[1])
            bar.set_postfix(error=f"{error:.4f}", refresh=False)
            stale = (stale + 1) % refit_every
            if stale:
                new_scales = fit.new_scales(residual)
                residual = torch.addmm(residual, new_u * new_scales, new_v, alpha=-1)
                scales = torch.cat([scales, new_scales])
            else:
                scales, residual = fit.solve()


def best_new_magnitude(residual: Tensor, cos_thresh: float) -> Tensor:
    """Frobenius norm of the best single ternary rank-1 term fitted to ``residual``."""
    u, _, v = top_singular(residual, 1)
    t_u, t_v = ternarize(u.T, cos_thresh)[0], ternarize(v.T, cos_thresh)[0]
    support = t_u.abs().sum() * t_v.abs().sum()
    return (t_u @ residual @ t_v).abs() / support.sqrt()
