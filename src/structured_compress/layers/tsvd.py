"""Ternary SVD: ``W ~= T_U diag(s) T_V`` with ternary ``T_U``, ``T_V`` (entries in {-1, 0, 1}) and float ``s``.

The ternary matmuls need additions only, so one token costs ``r`` multiplies (the scaling) and
``nnz(T_U) + nnz(T_V)`` additions. Factors come from the greedy decomposition of :mod:`.ternary`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Calibration, StructuredLinear, register_layer
from .config import LayerConfig, OptionError, option
from .convforms import ConvGeometry, factored_conv
from .fastpath import (cached, factored_is_cheaper, fast_paths_enabled, int8_factors, int8_factors_supported,
                       int8_matmul)
from .ternary import best_new_magnitude, fit_scales, rank_cap, stride_for, ternary_decomposition

log = logging.getLogger(__name__)


@dataclass
class TernarySVDConfig(LayerConfig):
    """Ternary SVD: W ~= T_U diag(s) T_V, ternary T_U/T_V (int8 buffers in {-1,0,1}), float scales s.
    Greedy: ternarize the residual's top singular vectors (exact), refit all scales jointly, stop when the true
    sigma_max(residual)/sigma_max(W) < tolerance, at any rank. Costs r multiplies + nnz(T_U)+nnz(T_V) additions
    per token: TSVD saves multiplications, not bytes (2-bit ternaries at 1e-2 exceed the fp16 dense weight).
    The rank is capped only on request (max_rank, or budget with budget_cap); a binding cap is logged and the
    layer's fit_error then exceeds the tolerance. QAT: add the TernaryQAT callback (callbacks=[default,tsvd_qat])."""

    layer_type = "tsvd"
    budget: float = option(1.0, "used with budget_cap only: the ternary factors' bytes over the fp16 dense "
                           "weight's, in (0, 1]",
                           gt=0, le=1)
    budget_of: Literal["bytes"] = option("bytes", "what budget counts: bytes (of the ternary factors, with "
                                         "budget_cap)")
    tolerance: float = option(0.01, "stop once sigma_max(residual) / sigma_max(W) is below this", gt=0, le=1)
    cos_thresh: float = option(0.8386, "ternarize each singular vector on the sparsest support whose cosine with "
                               "it reaches this (0 = all signs)", ge=0, le=1)
    steps: int = option(20, "components per greedy step = mn / ((m + n) steps); 20 as published, 5 is ~5x "
                        "faster at ~+4 % rank", ge=1)
    refit_every: int = option(1, "refit all scales jointly every this many greedy steps (1 as published; more "
                              "is faster, new scales alone in between)", ge=1)
    max_rank: int | None = option(None, "cap on the rank (null = none)", ge=1)
    budget_cap: bool = option(False, "cap the rank so the 2-bit ternary factors fit in budget x the fp16 dense "
                              "weight")
    prune_rate: float = option(float("inf"), "QAT (TernaryQAT) only: finite = warm start, dropping components below "
                               "this x the best new term (.inf = from scratch)", ge=0)

    def validate(self) -> None:
        if self.budget_cap and self.max_rank is not None:
            raise OptionError("budget_cap", True, f"max_rank={self.max_rank} already caps the rank, so the budget "
                              "cap would change nothing", "set one of budget_cap and max_rank")


@register_layer(TernarySVDConfig)
class TernarySVDLinear(StructuredLinear):
    """``y = T_U (s * (T_V x)) + b``; ``u`` (out x r) and ``v`` (r x in) are int8 buffers in {-1, 0, 1}.

    The constructor only allocates (rank-0, i.e. a zero map, unless ``rank`` is given); ``from_dense``
    decomposes (:class:`TernarySVDConfig`). The other constructor arguments are the decomposition options that
    ``requantize_`` (QAT) reuses. During QAT (``enable_qat``) a full-precision ``latent_weight`` parameter is
    trained through a straight-through estimator and the factors are refreshed from it after each optimizer step.
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
    def initialize(cls, weight: Tensor, bias: Tensor | None, config: TernarySVDConfig,
                   data: Calibration) -> "TernarySVDLinear":
        """Decompose ``weight`` until the true spectral error ``sigma_max(E) / sigma_max(W) < tolerance``
        (``fit_error``), at any rank unless capped (``max_rank``, or ``budget`` with ``budget_cap``); a cap that
        stops the decomposition short of the tolerance is logged as a warning and leaves ``tolerance_met`` False."""
        out_features, in_features = weight.shape
        max_rank = rank_cap(config.budget, out_features, in_features) if config.budget_cap else config.max_rank
        layer = cls(in_features, out_features, bias=bias is not None, tolerance=config.tolerance,
                    cos_thresh=config.cos_thresh, steps=config.steps, max_rank=max_rank,
                    prune_rate=config.prune_rate, refit_every=config.refit_every).to(weight.device, weight.dtype)
        t_u, scales, t_v, error = ternary_decomposition(
            weight.float(), layer.tolerance, layer.cos_thresh, stride_for(out_features, in_features, layer.steps),
            max_rank, refit_every=layer.refit_every)
        layer.set_factors(t_u, scales, t_v)
        layer.fit_error = error
        layer._copy_bias(bias)
        if not layer.tolerance_met:
            log.warning("tsvd %dx%d: the rank cap %d binds; spectral error %.4f misses tolerance %g",
                        out_features, in_features, max_rank, error, layer.tolerance)
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

    def conv_forward(self, x: Tensor, geometry: ConvGeometry) -> Tensor | None:
        """The ternaries as float conv kernels (cached, ``s`` folded into ``T_V``): a k x k conv into ``rank``
        channels, then a 1 x 1 conv. None during QAT (the latent weight carries the gradient) or at rank 0."""
        if self.latent_weight is not None or self.rank == 0 or not fast_paths_enabled():
            return None
        left, right = cached(self, "factors", (self.u, self.s, self.v), lambda: (
            self.u.to(x.dtype), (self.s.float()[:, None] * self.v.float()).to(x.dtype)), (x.dtype,))
        return factored_conv(x, geometry, right, left, self.bias)

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
        keep = magnitude >= layer.prune_rate * best_new_magnitude(residual, layer.cos_thresh)
        if bool(keep.all()):
            layer.set_factors(t_u, scales, t_v)
            return
        init = (t_u[:, keep], t_v[keep])
    t_u, scales, t_v, layer.fit_error = ternary_decomposition(
        target, layer.tolerance, layer.cos_thresh, stride, layer.max_rank, init=init, refit_every=layer.refit_every)
    layer.set_factors(t_u, scales, t_v)
