"""Low-rank layer ``W ~= A B`` with spectral (SVD) initialisation, plain or data-aware (whitened)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Calibration, StructuredLinear, check_budget, register_layer
from .config import LayerConfig, OptionError, option
from .convforms import ConvGeometry, factored_conv
from .fastpath import cached, factored_is_cheaper, fast_paths_enabled, grad_free


def rank_for_budget(budget: float, out_features: int, in_features: int) -> int:
    """Largest rank whose ``r (m + n)`` cost fits in ``budget * m * n``, at most ``min(m, n)``; a budget below
    one rank-1 component is an error, not a silent rank 1 at many times the budget."""
    check_budget(budget)
    rank = math.floor(budget * out_features * in_features / (out_features + in_features))
    if rank < 1:
        smallest = (out_features + in_features) / (out_features * in_features)
        raise OptionError("budget", budget, f"keeps less than one rank-1 component of a {out_features}x"
                          f"{in_features} layer", f"raise layer.budget to at least {smallest:.2g}, or exclude "
                          "the layer with layer.exclude")
    return min(rank, min(out_features, in_features))


def spectral_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(U_r sqrt(S_r), sqrt(S_r) V_r^T)``: the best rank-r factors (Eckart-Young), scale split evenly."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def whitening_factor(gram: Tensor, eps: float = 1e-6) -> Tensor:
    """Lower-triangular ``S`` with ``S S^T = gram`` (float64), shifting the spectrum if it is not PD."""
    gram = gram.double()
    gram = (gram + gram.T) / 2
    chol, info = torch.linalg.cholesky_ex(gram)
    if info.item() != 0:
        shift = -torch.linalg.eigvalsh(gram).min().clamp(max=0) + eps * gram.diagonal().mean().clamp(min=1.0)
        chol = torch.linalg.cholesky(gram + shift * torch.eye(len(gram), dtype=gram.dtype, device=gram.device))
    return chol


def whitened_factors(weight: Tensor, gram: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """SVD-LLM's truncation-aware factors: minimise ``||(W - A B) X||_F`` given ``gram = X X^T``."""
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"whitening needs the input Gram matrix of shape {(weight.shape[1],) * 2}, got {tuple(gram.shape)}"
        )
    chol = whitening_factor(gram)
    left, right = spectral_factors(weight.double() @ chol, rank)
    right = torch.linalg.solve_triangular(chol, right, upper=False, left=False)  # right @ chol^-1
    return left.to(weight.dtype), right.to(weight.dtype)


@dataclass
class LowRankConfig(LayerConfig):
    """Low-rank W ~= A B with SVD spectral init (sqrt(S) split into both factors).
    The rank is the largest whose r (m + n) parameters fit in budget x m n, unless rank is given."""

    layer_type = "lowrank"
    budget: float = option(0.5, "fraction of the dense layer's parameters (= its MACs) kept, in (0, 1]", gt=0, le=1)
    rank: int | None = option(None, "fixed rank for every layer instead of one from the budget (null = from budget)",
                              ge=1)
    init: Literal["svd", "whiten"] = option("svd", "svd | whiten (data-aware SVD-LLM whitening of the inputs' "
                                            "Gram matrix; needs calibration_batches > 0)")

    def calibration_needed(self) -> tuple[str, ...]:
        return ("gram",) if self.init == "whiten" else ()


@register_layer(LowRankConfig)
class LowRankLinear(StructuredLinear):
    """``y = A (B x) + b`` with ``A`` of shape (out, r) and ``B`` of shape (r, in).

    ``rank`` wins over ``budget``; with neither the layer keeps full rank. Random init draws a dense
    Kaiming-uniform matrix and projects it, so factor scales match spectral init.
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None = None,
                 budget: float | None = None, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        if rank is None:
            rank = (rank_for_budget(budget, out_features, in_features) if budget is not None
                    else min(in_features, out_features))
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}] "
                             f"for a {out_features}x{in_features} layer, got {rank}")
        self.rank = int(rank)
        self.left = nn.Parameter(torch.empty(out_features, self.rank))
        self.right = nn.Parameter(torch.empty(self.rank, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        dense = torch.empty(self.out_features, self.in_features)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        left, right = spectral_factors(dense, self.rank)
        with torch.no_grad():
            self.left.copy_(left)
            self.right.copy_(right)
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def initialize(cls, weight: Tensor, bias: Tensor | None, config: LowRankConfig,
                   data: Calibration) -> "LowRankLinear":
        """Truncated SVD of ``weight`` (``init='svd'``), or of the weight whitened by the inputs' Gram matrix
        (``init='whiten'``)."""
        out_features, in_features = weight.shape
        rank = config.rank if config.rank is not None else rank_for_budget(config.budget, out_features, in_features)
        if rank > min(out_features, in_features):
            raise OptionError("rank", rank, f"exceeds min(out, in) = {min(out_features, in_features)} of a "
                              f"{out_features}x{in_features} layer", "lower layer.options.rank or set it to null")
        layer = cls.empty(in_features, out_features, weight.device, weight.dtype, rank=rank, bias=bias is not None)
        if config.init == "svd":
            left, right = spectral_factors(weight, layer.rank)
        else:
            left, right = whitened_factors(weight, data.gram.to(weight.device), layer.rank)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
        layer._copy_bias(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """Two ``F.linear`` calls (the second adds the bias in its GEMM, no copies, compiles as is); with no
        gradient to the factors and a rank past break-even, one matmul by the cached product instead."""
        if (fast_paths_enabled() and grad_free(self.left, self.right)
                and not factored_is_cheaper(self.rank, self.out_features, self.in_features)):
            weight = cached(self, "weight", (self.left, self.right),
                            lambda: (self.left.float() @ self.right.float()).to(self.left.dtype))
            return F.linear(x, weight, self.bias)
        return F.linear(F.linear(x, self.right), self.left, self.bias)

    def conv_forward(self, x: Tensor, geometry: ConvGeometry) -> Tensor:
        """A k x k conv into ``rank`` channels, then a 1 x 1 conv; gradients reach both factors."""
        return factored_conv(x, geometry, self.right, self.left, self.bias)

    def to_dense_weight(self) -> Tensor:
        return self.left @ self.right

    def num_params(self) -> int:
        return self.rank * (self.in_features + self.out_features) + self.bias_params()

    def macs_per_token(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def config(self) -> dict:
        return {"rank": self.rank, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"
