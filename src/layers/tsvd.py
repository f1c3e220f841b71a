"""Ternary SVD: ``W ~= T_U diag(s) T_V`` with ternary ``T_U``, ``T_V`` (entries in {-1, 0, 1}) and float ``s``.

The ternary matmuls need additions only, so one token costs ``r`` multiplies (the scaling) and
``nnz(T_U) + nnz(T_V)`` additions. Factors come from a greedy decomposition: ternarize the top singular
vectors of the residual, refit every scale jointly by least squares, repeat until the residual's spectral
norm falls below ``tolerance * sigma_max(W)``.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StructuredLinear, check_budget, check_dense_weight, register_layer
from .fastpath import (cached, factored_is_cheaper, fast_paths_enabled, int8_factors, int8_factors_supported,
                       int8_matmul)

log = logging.getLogger(__name__)

EXACT_SVD_MAX_NUMEL = 128 ** 2  # at or below this, always the exact SVD
_RANDOMIZED_SVD_SEED = 0
_DAMPING = 1e-5


def ternarize(vectors: Tensor, cos_thresh: float) -> Tensor:
    """Ternary version of each row: ``sign(a) * [|a| >= theta]`` with the sparsest support whose cosine with
    the (normalised) row reaches ``cos_thresh`` (the best cosine if none does); ``cos_thresh <= 0``: ``sign(a)``."""
    sign = torch.where(vectors >= 0, 1.0, -1.0).to(vectors.dtype)
    if cos_thresh <= 0:
        return sign
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    mags = unit.abs().sort(dim=-1, descending=True).values
    support = torch.arange(1, unit.shape[-1] + 1, device=unit.device, dtype=unit.dtype)
    cosines = mags.cumsum(dim=-1) / support.sqrt()
    reaches = cosines >= cos_thresh
    keep = torch.where(reaches.any(dim=-1), reaches.to(torch.uint8).argmax(dim=-1), cosines.argmax(dim=-1))
    theta = mags.gather(-1, keep[:, None])
    return sign * (unit.abs() >= theta)


class ScaleFit:
    """Least-squares scales ``s`` for ``target ~= t_u diag(s) t_v`` with ternary ``t_u``, ``t_v``.

    Normal equations ``((t_u^T t_u) o (t_v t_v^T)) s = diag(t_u^T target t_v^T)`` (Hadamard product), damped
    by ``1e-5`` times the RMS of the Gram matrix (duplicate ternary vectors make it singular), solved in
    float64. ``extend`` appends components computing only the new rows of the system, so the greedy loop
    does not redo the ``r^2 (m + n)`` Gram product every step (ternary products are exact in float32).
    """

    def __init__(self, target: Tensor, t_u: Tensor, t_v: Tensor):
        self.target, self.t_u, self.t_v = target, t_u, t_v
        self.gram = (t_u.T @ t_u).double() * (t_v @ t_v.T).double()
        self.rhs = ((t_u.T @ target) * t_v).sum(dim=1).double()

    def extend(self, new_u: Tensor, new_v: Tensor) -> None:
        cross = (self.t_u.T @ new_u).double() * (self.t_v @ new_v.T).double()
        block = (new_u.T @ new_u).double() * (new_v @ new_v.T).double()
        self.gram = torch.cat([torch.cat([self.gram, cross], dim=1), torch.cat([cross.T, block], dim=1)])
        self.rhs = torch.cat([self.rhs, ((new_u.T @ self.target) * new_v).sum(dim=1).double()])
        self.t_u, self.t_v = torch.cat([self.t_u, new_u], dim=1), torch.cat([self.t_v, new_v])

    def solve(self) -> tuple[Tensor, Tensor]:
        """``(s, residual)``."""
        rank = len(self.rhs)
        if rank == 0:
            return self.target.new_zeros(0), self.target.clone()
        eye = torch.eye(rank, dtype=self.gram.dtype, device=self.gram.device)
        gram = self.gram + _DAMPING * (self.gram.square().sum() / rank).sqrt() * eye
        chol, info = torch.linalg.cholesky_ex(gram)
        if info.item() == 0:
            scales = torch.cholesky_solve(self.rhs[:, None], chol)[:, 0]
        else:
            scales = torch.linalg.lstsq(gram, self.rhs[:, None]).solution[:, 0]
        scales = scales.to(self.target.dtype)
        return scales, self.target - (self.t_u * scales) @ self.t_v


def fit_scales(target: Tensor, t_u: Tensor, t_v: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, residual)`` of the least-squares scales for fixed ternary factors (see :class:`ScaleFit`)."""
    return ScaleFit(target, t_u, t_v).solve()


def top_singular(matrix: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``count`` singular triplets ``(U [m, k], S [k], V [n, k])``: a seeded randomized SVD of rank
    ``q = 5 * count`` when ``q`` is under half the smaller side (each greedy step then costs O(m n q) instead
    of a full SVD), else exact (also for matrices of at most ``EXACT_SVD_MAX_NUMEL`` entries). The global
    RNG is left untouched."""
    sketch = 5 * count
    if matrix.numel() <= EXACT_SVD_MAX_NUMEL or 2 * sketch > min(matrix.shape):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :count], s[:count], vh[:count].T
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_RANDOMIZED_SVD_SEED)
        u, s, v = torch.svd_lowrank(matrix, q=sketch, niter=2)
    return u[:, :count], s[:count], v[:, :count]


def stride_for(out_features: int, in_features: int, steps: int) -> int:
    """Components added per greedy step: the low-rank break-even rank ``mn/(m+n)`` split into ``steps``."""
    return max(1, (out_features * in_features) // ((out_features + in_features) * steps))


def rank_cap(budget: float, out_features: int, in_features: int) -> int:
    """Largest rank whose 2-bit ternary factors fit in ``budget`` times the dense fp16 weight's bits."""
    check_budget(budget)
    return max(1, math.floor(8 * budget * out_features * in_features / (out_features + in_features)))


def ternary_decomposition(target: Tensor, tolerance: float, cos_thresh: float, stride: int, max_rank: int,
                          init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, float]:
    """Greedy ternary SVD of ``target`` (float): returns ``(t_u, s, t_v, error)``, ``error = sigma_max(E) /
    sigma_max(target)`` for the final residual ``E``. ``init`` warm-starts from given ternary components."""
    rows, cols = target.shape
    fit = ScaleFit(target, *((target.new_zeros(rows, 0), target.new_zeros(0, cols)) if init is None else init))
    scales, residual = fit.solve()
    reference = top_singular(target, 1)[1][0] if init is not None else None
    while True:
        u, s, v = top_singular(residual, stride)
        reference = s[0] if reference is None else reference
        if reference == 0 or s[0] / reference < tolerance:
            break
        take = min(stride, max_rank - len(scales), len(s))
        if take <= 0:
            break
        fit.extend(ternarize(u[:, :take].T, cos_thresh).T, ternarize(v[:, :take].T, cos_thresh))
        scales, residual = fit.solve()
    error = 0.0 if reference == 0 else (s[0] / reference).item()
    return fit.t_u, scales, fit.t_v, error


@register_layer("tsvd")
class TernarySVDLinear(StructuredLinear):
    """``y = T_U (s * (T_V x)) + b``; ``u`` (out x r) and ``v`` (r x in) are int8 buffers in {-1, 0, 1}.

    The constructor only allocates (rank-0, i.e. a zero map, unless ``rank`` is given); ``from_dense``
    decomposes. The other constructor arguments are the decomposition options that ``requantize_`` (QAT)
    reuses. During QAT (``enable_qat``) a full-precision ``latent_weight`` parameter is trained through a
    straight-through estimator and the factors are refreshed from it after each optimizer step.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 0, bias: bool = True,
                 tolerance: float = 1e-2, cos_thresh: float = 0.8386, steps: int = 20,
                 max_rank: int | None = None, prune_rate: float = math.inf):
        super().__init__(in_features, out_features, bias)
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.tolerance, self.cos_thresh, self.steps = float(tolerance), float(cos_thresh), int(steps)
        self.max_rank = rank_cap(1.0, out_features, in_features) if max_rank is None else int(max_rank)
        self.prune_rate = float(prune_rate)
        self.fit_error: float | None = None
        self.register_buffer("u", torch.zeros(out_features, rank, dtype=torch.int8))
        self.register_buffer("s", torch.zeros(rank))
        self.register_buffer("v", torch.zeros(rank, in_features, dtype=torch.int8))
        self.register_parameter("latent_weight", None)

    @property
    def rank(self) -> int:
        return self.s.numel()

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, budget: float = 1.0, tolerance: float = 1e-2,
                   cos_thresh: float = 0.8386, steps: int = 20, max_rank: int | None = None,
                   prune_rate: float = math.inf) -> "TernarySVDLinear":
        """Decompose ``weight`` until ``sigma_max(E) / sigma_max(W) < tolerance``. The rank is capped by
        ``max_rank``, or else by ``budget``: 2-bit ternary factors within ``budget`` x the fp16 dense size."""
        check_dense_weight(weight, bias)
        out_features, in_features = weight.shape
        max_rank = rank_cap(budget, out_features, in_features) if max_rank is None else max_rank
        layer = cls(in_features, out_features, bias=bias is not None, tolerance=tolerance, cos_thresh=cos_thresh,
                    steps=steps, max_rank=max_rank, prune_rate=prune_rate).to(weight.device, weight.dtype)
        t_u, scales, t_v, error = ternary_decomposition(
            weight.detach().float(), tolerance, cos_thresh, stride_for(out_features, in_features, steps), max_rank)
        layer.set_factors(t_u, scales, t_v)
        layer.fit_error = error
        layer._copy_bias(bias)
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

    def flops_per_token(self) -> int:
        """Multiplies plus additions, each counted as one MAC: an upper bound, since an addition is cheaper
        than a multiply-add. Use ``muls_per_token``/``adds_per_token`` for the split."""
        return self.muls_per_token() + self.adds_per_token()

    def config(self) -> dict:
        return {"rank": self.rank, "bias": self.bias is not None, "tolerance": self.tolerance,
                "cos_thresh": self.cos_thresh, "steps": self.steps, "max_rank": self.max_rank,
                "prune_rate": self.prune_rate}

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
        target, layer.tolerance, layer.cos_thresh, stride, layer.max_rank, init=init)
    layer.set_factors(t_u, scales, t_v)
