"""Ternary SVD: ``W ~= T_U diag(s) T_V`` with ternary ``T_U``, ``T_V`` (entries in {-1, 0, 1}) and float ``s``.

The ternary matmuls need additions only, so one token costs ``r`` multiplies (the scaling) and
``nnz(T_U) + nnz(T_V)`` additions. Factors come from a greedy decomposition: ternarize the top singular
vectors of the residual, refit every scale jointly by least squares, repeat until the residual's spectral
norm falls below ``tolerance * sigma_max(W)``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StructuredLinear, check_budget, check_dense_weight, register_layer
from .fastpath import (cached, factored_is_cheaper, fast_paths_enabled, int8_factors, int8_factors_supported,
                       int8_matmul)

log = logging.getLogger(__name__)

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
    """Largest rank whose 2-bit ternary factors fit in ``budget`` times the dense fp16 weight's bits."""
    check_budget(budget)
    return max(1, math.floor(8 * budget * out_features * in_features / (out_features + in_features)))


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
        stale = (stale + 1) % refit_every
        if stale:
            new_scales = fit.new_scales(residual)
            residual = torch.addmm(residual, new_u * new_scales, new_v, alpha=-1)
            scales = torch.cat([scales, new_scales])
        else:
            scales, residual = fit.solve()


@register_layer("tsvd")
class TernarySVDLinear(StructuredLinear):
    """``y = T_U (s * (T_V x)) + b``; ``u`` (out x r) and ``v`` (r x in) are int8 buffers in {-1, 0, 1}.

    The constructor only allocates (rank-0, i.e. a zero map, unless ``rank`` is given); ``from_dense``
    decomposes. The other constructor arguments are the decomposition options that ``requantize_`` (QAT)
    reuses. During QAT (``enable_qat``) a full-precision ``latent_weight`` parameter is trained through a
    straight-through estimator and the factors are refreshed from it after each optimizer step.
    """

    exact_tensors = ("s",)  # the fit error is verified with these scales

    def __init__(self, in_features: int, out_features: int, rank: int = 0, bias: bool = True,
                 tolerance: float = 1e-2, cos_thresh: float = 0.8386, steps: int = 20,
                 max_rank: int | None = None, prune_rate: float = math.inf, refit_every: int = 1):
        super().__init__(in_features, out_features, bias)
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if refit_every < 1:
            raise ValueError(f"refit_every must be >= 1 (1: refit every scale at every greedy step), got {refit_every}")
        self.refit_every = int(refit_every)
        self.tolerance, self.cos_thresh, self.steps = float(tolerance), float(cos_thresh), int(steps)
        self.max_rank = None if max_rank is None else int(max_rank)
        self.prune_rate = float(prune_rate)
        self.fit_error: float | None = None
        self.register_buffer("u", torch.zeros(out_features, rank, dtype=torch.int8))
        self.register_buffer("s", torch.zeros(rank))
        self.register_buffer("v", torch.zeros(rank, in_features, dtype=torch.int8))
        self.register_parameter("latent_weight", None)

    @property
    def rank(self) -> int:
        return self.s.numel()

    @property
    def tolerance_met(self) -> bool | None:
        """Whether the last decomposition reached ``fit_error < tolerance`` (``None`` before any); only a rank
        cap (``max_rank`` / ``budget_cap``) can make it ``False``."""
        return None if self.fit_error is None else self.fit_error < self.tolerance

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, budget: float = 1.0, tolerance: float = 1e-2,
                   cos_thresh: float = 0.8386, steps: int = 20, max_rank: int | None = None,
                   prune_rate: float = math.inf, budget_cap: bool = False,
                   refit_every: int = 1) -> "TernarySVDLinear":
        """Decompose ``weight`` until the true spectral error ``sigma_max(E) / sigma_max(W) < tolerance``
        (``fit_error``), at any rank. Only on request is the rank capped: by ``max_rank``, or with
        ``budget_cap`` by ``budget`` (2-bit ternary factors within ``budget`` x the fp16 dense size); a cap that
        stops the decomposition short of the tolerance is logged as a warning and leaves ``tolerance_met``
        False. ``steps``: the greedy step adds ``mn / ((m + n) steps)`` components (20 as published; fewer
        steps decompose faster at a slightly higher rank). ``refit_every``: joint scale refit every this many
        greedy steps (1 as published; see :func:`ternary_decomposition`)."""
        check_dense_weight(weight, bias)
        out_features, in_features = weight.shape
        if budget_cap and max_rank is None:
            max_rank = rank_cap(budget, out_features, in_features)
        layer = cls(in_features, out_features, bias=bias is not None, tolerance=tolerance, cos_thresh=cos_thresh,
                    steps=steps, max_rank=max_rank, prune_rate=prune_rate,
                    refit_every=refit_every).to(weight.device, weight.dtype)
        t_u, scales, t_v, error = ternary_decomposition(
            weight.detach().float(), tolerance, cos_thresh, stride_for(out_features, in_features, steps), max_rank,
            refit_every=layer.refit_every)
        layer.set_factors(t_u, scales, t_v)
        layer.fit_error = error
        layer._copy_bias(bias)
        if not layer.tolerance_met:
            log.warning("tsvd %dx%d: the rank cap %d binds; spectral error %.4f misses tolerance %g",
                        out_features, in_features, max_rank, error, tolerance)
        log.debug("tsvd %dx%d: rank %d, spectral error %.4f", out_features, in_features, layer.rank, error)
        return layer

    def set_factors(self, t_u: Tensor, scales: Tensor, t_v: Tensor) -> None:
        """Replace the factors (the rank may change); ternary inputs of any dtype."""
        self.u = t_u.detach().to(self.u.device, torch.int8)
        self.v = t_v.detach().to(self.v.device, torch.int8)
        self.s = scales.detach().to(self.s.device, self.s.dtype)

    def enable_qat(self) -> None:
        """Start QAT: a trainable full-precision ``latent_weight`` initialised to the ternary reconstruction."""
        self.latent_weight = nn.Parameter(self.to_dense_weight().detach().clone())

    def disable_qat(self) -> None:
        """Drop the latent weight; the layer is the deployable factored form again."""
        self.latent_weight = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Load a checkpoint written during QAT: take its rank (re-ternarization changes it), and when this
        layer is not training quantization-aware, leave out its latent weight -- the ternary factors are the
        model that was validated, e.g. the best checkpoint tested after training."""
        u, v = state_dict.get(prefix + "u"), state_dict.get(prefix + "v")
        if u is not None and v is not None and (u.shape != self.u.shape or v.shape != self.v.shape):
            self.u = torch.zeros(u.shape, dtype=self.u.dtype, device=self.u.device)
            self.v = torch.zeros(v.shape, dtype=self.v.dtype, device=self.v.device)
            self.s = torch.zeros(u.shape[1], dtype=self.s.dtype, device=self.s.device)
        if self.latent_weight is None:
            state_dict.pop(prefix + "latent_weight", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    int8_activations = False  # opt-in: ternaries as int8 integer matmuls, activations rounded to int8

    def forward(self, x: Tensor) -> Tensor:
        """Fast paths (same function): with ``int8_activations``, two integer matmuls on the int8 ternaries,
        one scale per component; else float copies of the factors cast once and cached (``s`` folded into
        ``T_V``), or the cached reconstruction when the rank is past break-even (``r (m + n) >= m n``)."""
        if self.latent_weight is not None:
            # value: the ternary reconstruction exactly; gradient: identity onto the latent weight
            latent = self.latent_weight
            weight = self.to_dense_weight().to(latent.dtype).detach() + (latent - latent.detach())
            return F.linear(x, weight.to(x.dtype), self.bias)
        if not fast_paths_enabled() or self.rank == 0:
            hidden = F.linear(x, self.v.to(x.dtype)) * self.s.to(x.dtype)
            return F.linear(hidden, self.u.to(x.dtype), self.bias)
        flat = x.reshape(-1, self.in_features)
        state = (self.u, self.s, self.v)
        if self.int8_activations and int8_factors_supported(flat, self.in_features, self.rank, self.out_features):
            v_t, v_scale, u_t, u_scale = cached(self, "int8", state, lambda: int8_factors(
                self.v, self.s, self.u, torch.ones(self.out_features, device=self.u.device)))
            y = int8_matmul(int8_matmul(flat, v_t, v_scale), u_t, u_scale).to(x.dtype)
            y = y if self.bias is None else y + self.bias.to(x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        if factored_is_cheaper(self.rank, self.out_features, self.in_features):
            left, right = cached(self, "factors", state, lambda: (
                self.u.to(x.dtype), (self.s.float()[:, None] * self.v.float()).to(x.dtype)), (x.dtype,))
            return F.linear(F.linear(x, right), left, self.bias)
        weight = cached(self, "weight", state, lambda: (
            (self.u.float() * self.s.float()) @ self.v.float()).to(x.dtype), (x.dtype,))
        return F.linear(x, weight, self.bias)

    def to_dense_weight(self) -> Tensor:
        return (self.u.to(self.s.dtype) * self.s) @ self.v.to(self.s.dtype)

    def num_params(self) -> int:
        """Numbers stored: ``r (m + n)`` ternary entries, ``r`` scales, the bias."""
        return self.rank * (self.in_features + self.out_features) + self.rank + self.bias_params()

    def muls_per_token(self) -> int:
        return self.rank

    def adds_per_token(self) -> int:
        return int(torch.count_nonzero(self.u).item() + torch.count_nonzero(self.v).item())

    def ternary_params(self) -> int:
        """Ternary entries stored (``r (m + n)``): the paper's "tern params"."""
        return self.rank * (self.in_features + self.out_features)

    def float_params(self) -> int:
        """Full-precision numbers stored (the ``r`` scales and the bias): the paper's "params"."""
        return self.rank + self.bias_params()

    def op_counts(self) -> dict:
        """The paper's cost columns per token, beside the dense layer's: multiplies, additions, float and
        ternary parameters, bytes stored (2-bit ternaries) and the dense fp16 bytes."""
        dense = self.in_features * self.out_features
        return {"muls": self.muls_per_token(), "adds": self.adds_per_token(), "float_params": self.float_params(),
                "ternary_params": self.ternary_params(), "bytes": self.storage_bytes(), "dense_macs": dense,
                "dense_fp16_bytes": 2 * (dense + self.bias_params())}

    def macs_per_token(self) -> int:
        """Multiplies plus additions, each counted as one MAC: an upper bound, since an addition is cheaper
        than a multiply-add. Use ``muls_per_token``/``adds_per_token`` for the split."""
        return self.muls_per_token() + self.adds_per_token()

    def config(self) -> dict:
        return {"rank": self.rank, "bias": self.bias is not None, "tolerance": self.tolerance,
                "cos_thresh": self.cos_thresh, "steps": self.steps, "max_rank": self.max_rank,
                "prune_rate": self.prune_rate, "refit_every": self.refit_every}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, tolerance={self.tolerance}"


def _best_new_magnitude(residual: Tensor, cos_thresh: float) -> Tensor:
    """Frobenius norm of the best single ternary rank-1 term fitted to ``residual``."""
    u, _, v = top_singular(residual, 1)
    t_u, t_v = ternarize(u.T, cos_thresh)[0], ternarize(v.T, cos_thresh)[0]
    support = t_u.abs().sum() * t_v.abs().sum()
    return (t_u @ residual @ t_v).abs() / support.sqrt()


@torch.no_grad()
def requantize_(layer: TernarySVDLinear, latent_weight: Tensor | None = None) -> None:
    """Re-ternarize ``layer`` from a full-precision weight (default: its ``latent_weight``), in place.

    With ``prune_rate`` infinite, decompose from scratch. Otherwise refit the scales of the current factors,
    drop the components whose Frobenius magnitude ``|s_i| sqrt(|t_u,i|_1 |t_v,i|_1)`` is below ``prune_rate``
    times that of the best new rank-1 ternary term, and, if any were dropped, warm-start the greedy
    decomposition from the survivors.
    """
    latent = layer.latent_weight if latent_weight is None else latent_weight
    if latent is None:
        raise ValueError("requantize_ needs a latent weight: call layer.enable_qat() or pass latent_weight")
    target = latent.detach().float()
    stride = stride_for(layer.out_features, layer.in_features, layer.steps)
    init = None
    if math.isfinite(layer.prune_rate) and layer.rank > 0:
        t_u, t_v = layer.u.float(), layer.v.float()
        scales, residual = fit_scales(target, t_u, t_v)
        magnitude = scales.abs() * (t_u.abs().sum(dim=0) * t_v.abs().sum(dim=1)).sqrt()
        keep = magnitude >= layer.prune_rate * _best_new_magnitude(residual, layer.cos_thresh)
        if bool(keep.all()):
            layer.set_factors(t_u, scales, t_v)
            return
        init = (t_u[:, keep], t_v[keep])
    t_u, scales, t_v, layer.fit_error = ternary_decomposition(
        target, layer.tolerance, layer.cos_thresh, stride, layer.max_rank, init=init, refit_every=layer.refit_every)
    layer.set_factors(t_u, scales, t_v)
