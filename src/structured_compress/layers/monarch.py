"""Monarch layer: two block-diagonal factors joined by the stride (butterfly) permutation.

Shapes, for ``n`` inputs, ``m`` outputs and ``b`` blocks: ``p = ceil(n/b)``, ``s = ceil(m/b)``, inner size
``q = min(p, s)``. ``B1`` is ``b x q x p`` and ``B2`` is ``b x s x q``. Input chunk ``k`` (entries ``kp..kp+p-1``
of the zero-padded input) goes through ``B1[k]``; the ``bq`` results are regrouped so that group ``l`` holds
the entries ``l, l+b, l+2b, ...``; group ``l`` goes through ``B2[l]`` and its output ``sigma`` lands at index
``sigma*b + l``. The padded ``bs``-vector is truncated to ``m``.

Seen as a dense matrix, block ``(k, l)`` -- rows ``sigma*b + l``, columns ``k*p + i`` -- is a sum of one
rank-1 term per inner index ``t`` with ``t // q == k`` and ``t % b == l``, and every ``t`` feeds exactly one
block. So the layer can express exactly the matrices whose ``(k, l)`` blocks have rank at most the number of
such ``t``, and per-block truncated SVDs give the Frobenius-optimal projection (Eckart-Young per block).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Calibration, StructuredLinear, check_budget, register_layer
from .blockdiag import check_count, least_budget
from .config import LayerConfig, OptionError, option
from .convforms import BlockLayout, ConvGeometry, channel_shuffle, keep_channels, pointwise
from .fastpath import cached, contiguous_grad, fast_paths_enabled, grad_free

log = logging.getLogger(__name__)


def monarch_shapes(in_features: int, out_features: int, nblocks: int) -> tuple[int, int, int]:
    """``(p, s, q)``: input block size, output block size and inner (rank-carrying) size."""
    p = math.ceil(in_features / nblocks)
    s = math.ceil(out_features / nblocks)
    return p, s, min(p, s)


def monarch_cost(in_features: int, out_features: int, nblocks: int) -> int:
    """Stored factor entries = multiply-adds per token, ``b (q p + s q)``."""
    p, s, q = monarch_shapes(in_features, out_features, nblocks)
    return nblocks * (q * p + s * q)


def nblocks_for_budget(budget: float, out_features: int, in_features: int) -> int:
    """Start from ``floor((m + n) min(m, n) / floor(beta m n))`` (the reference rule, which rounds down
    and so overspends), then raise the block count until the cost fits ``beta m n`` -- budget means the
    same dense fraction for every layer type. Clipped to ``[1, min(m, n)]``; a budget that not even the
    cheapest block count fits is an error, not a silent overspend.
    """
    check_budget(budget)
    dense = out_features * in_features
    smaller = min(out_features, in_features)
    target = math.floor(budget * dense)
    nblocks = smaller if target < 1 else max(1, min(smaller, (out_features + in_features) * smaller // target))
    while nblocks < smaller and monarch_cost(in_features, out_features, nblocks) > max(target, 1):
        nblocks += 1
    cost = monarch_cost(in_features, out_features, nblocks)
    if cost > budget * dense:  # only at nblocks = min(m, n), the cheapest layout (any fewer blocks cost 2x)
        raise OptionError("budget", budget, f"is below the cheapest Monarch layout of a {out_features}x"
                          f"{in_features} layer ({cost} numbers)", f"raise layer.budget to at least "
                          f"{least_budget(cost, dense)}, or exclude the layer with layer.exclude")
    return nblocks


def inner_index_map(nblocks: int, inner: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """For each inner index ``t`` in ``[0, b q)``: its input chunk ``k``, output group ``l`` and its
    position ``j`` among the inner indices of block ``(k, l)`` (the singular-vector slot it carries)."""
    t = torch.arange(nblocks * inner, device=device)
    k, l = t // inner, t % nblocks
    first = k * inner + (l - k * inner) % nblocks  # smallest t' in chunk k with t' = l (mod b)
    return k, l, (t - first) // nblocks


def block_view(weight: Tensor, nblocks: int, p: int, s: int) -> Tensor:
    """Zero-pad ``weight`` to ``bs x bp`` and view it as ``T[k, l, sigma, i] = W[sigma b + l, k p + i]``."""
    out_features, in_features = weight.shape
    padded = F.pad(weight, (0, nblocks * p - in_features, 0, nblocks * s - out_features))
    return padded.reshape(s, nblocks, nblocks, p).permute(2, 1, 0, 3)


@torch.no_grad()
def project_to_monarch(weight: Tensor, nblocks: int) -> tuple[Tensor, Tensor]:
    """``(B1, B2)`` of the Monarch matrix nearest to ``weight`` in Frobenius norm.

    Each ``(k, l)`` block of the padded weight gets a truncated SVD whose rank is the number of inner
    indices that feed it; singular pairs are split as ``sqrt(sigma)`` into both factors. Zero padding is
    optimal for the truncated rows/columns, which lie outside the objective.
    """
    out_features, in_features = weight.shape
    p, s, q = monarch_shapes(in_features, out_features, nblocks)
    work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    u, sv, vh = torch.linalg.svd(block_view(work, nblocks, p, s), full_matrices=False)  # (b, b, s|p, q)
    k, l, j = inner_index_map(nblocks, q, weight.device)
    root = sv[k, l, j].sqrt()
    blocks1 = torch.zeros(nblocks, q, p, dtype=work.dtype, device=weight.device)
    blocks2 = torch.zeros(nblocks, s, q, dtype=work.dtype, device=weight.device)
    t = torch.arange(nblocks * q, device=weight.device)
    blocks1[k, t % q] = root[:, None] * vh[k, l, j]
    blocks2[l, :, t // nblocks] = root[:, None] * u[k, l, :, j]
    return blocks1.to(weight.dtype), blocks2.to(weight.dtype)


@dataclass
class MonarchConfig(LayerConfig):
    """Monarch: two block-diagonal factors joined by the stride (butterfly) permutation, initialised by the
    closed-form Frobenius projection (per-block SVDs). Odd / non-divisible sizes are zero-padded internally."""

    layer_type = "monarch"
    budget: float = option(0.5, "fraction of the dense layer's parameters (= its MACs) kept, in (0, 1]: the "
                           "smallest block count whose b(qp + sq) fits", gt=0, le=1)
    nblocks: int | None = option(None, "fixed block count for every layer instead of one from the budget (null = "
                                 "from budget)", gt=0)


@register_layer(MonarchConfig)
class MonarchLinear(StructuredLinear):
    """``y = P_out B2 Perm B1 P_in x + b`` with block-diagonal ``B1``, ``B2`` (see module docstring).

    ``nblocks`` wins over ``budget``; with neither, ``budget=1.0``.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int | None = None,
                 budget: float | None = None, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        if nblocks is None:
            nblocks = nblocks_for_budget(1.0 if budget is None else budget, out_features, in_features)
        self.nblocks = check_count("nblocks", nblocks, 1, out_features, in_features)
        self.in_block, self.out_block, self.inner = monarch_shapes(in_features, out_features, self.nblocks)
        self.blocks1 = nn.Parameter(torch.empty(self.nblocks, self.inner, self.in_block))
        self.blocks2 = nn.Parameter(torch.empty(self.nblocks, self.out_block, self.inner))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform ``+-1/sqrt(fan_in)`` per factor, as for ``nn.Linear``."""
        with torch.no_grad():
            for factor in (self.blocks1, self.blocks2):
                bound = 1 / math.sqrt(factor.shape[-1])
                factor.uniform_(-bound, bound)
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def initialize(cls, weight: Tensor, bias: Tensor | None, config: MonarchConfig,
                   data: Calibration) -> "MonarchLinear":
        """The Frobenius-nearest Monarch matrix to ``weight`` (closed form, per-block truncated SVDs)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, nblocks=config.nblocks, budget=config.budget,
                    bias=bias is not None).to(weight.device, weight.dtype)
        blocks1, blocks2 = project_to_monarch(weight, layer.nblocks)
        with torch.no_grad():
            layer.blocks1.copy_(blocks1)
            layer.blocks2.copy_(blocks2)
        layer._copy_bias(bias)
        log.debug("monarch %dx%d: nblocks=%d, cost %.3f of dense", out_features, in_features, layer.nblocks,
                  layer.macs_per_token() / (out_features * in_features))
        return layer

    def _apply_factors(self, x: Tensor) -> Tensor:
        """The bias-free map on a 2-D batch ``(N, n) -> (N, m)``."""
        b, q = self.nblocks, self.inner
        x = F.pad(x, (0, b * self.in_block - self.in_features)).reshape(-1, b, self.in_block)
        z = torch.einsum("kqp,nkp->nkq", self.blocks1, x).reshape(-1, q, b)  # z[:, c, l] = inner index c*b + l
        y = torch.einsum("lsc,ncl->nsl", self.blocks2, z).reshape(-1, b * self.out_block)
        return y[:, : self.out_features]

    def _forward_bmm(self, x: Tensor) -> Tensor:
        """``_apply_factors`` plus bias as two ``bmm`` calls arranged so that every ``bmm`` operand and output
        has a unit stride in one of its matrix dimensions (CPU ``bmm`` otherwise takes a per-batch fallback,
        tens of times slower with two threads). The first product is feature-major, ``(b q, N)`` with row
        ``t = k q + i``; the stride permutation regroups the rows as ``t = c b + l``, a free view. The second
        product lands as ``(b, N s)``, and the output interleave (index ``sigma*b + l``) is one blocked 2-D
        transpose copy; its gradient is made contiguous before it reaches the ``bmm`` backward."""
        b, q, s, rows = self.nblocks, self.inner, self.out_block, x.shape[0]
        if b * self.in_block != self.in_features:
            x = F.pad(x, (0, b * self.in_block - self.in_features))
        chunks = x.reshape(rows, b, self.in_block).permute(1, 2, 0)  # (b, p, N), a view
        z = torch.bmm(self.blocks1, chunks).reshape(q, b, rows)  # z[c, l] = inner row c b + l
        y = torch.bmm(z.permute(1, 2, 0), self.blocks2.transpose(1, 2))  # (b, N, s): output sigma b + l
        y = contiguous_grad(y.reshape(b, rows * s)).t().contiguous().reshape(rows, b * s)
        if b * s != self.out_features:
            y = y[:, : self.out_features]
            return y if self.bias is None else y + self.bias
        if self.bias is None:
            return y
        # in place only without autograd: with one block the transpose copy is a no-op, so ``y`` is a view
        return y + self.bias if torch.is_grad_enabled() else y.add_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if fast_paths_enabled():
            y = self._forward_bmm(flat)
        else:
            y = self._apply_factors(flat)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def conv_forward(self, x: Tensor, geometry: ConvGeometry) -> Tensor:
        """``B1`` as a grouped k x k conv (``groups = nblocks``; its blocks are channel groups in the
        ``"channel"`` column order, spans gathered where the block count does not divide the channels), the
        stride permutation as a channel shuffle, ``B2`` as a grouped 1 x 1 conv, and the output interleave
        (index ``sigma b + l``) as a second shuffle."""
        b, q, s = self.nblocks, self.inner, self.out_block
        layout = BlockLayout.of(b, self.in_block, geometry)
        if grad_free(self.blocks1, self.blocks2):
            first, second = cached(self, "conv_kernels", (self.blocks1, self.blocks2), lambda: (
                layout.kernel(self.blocks1, geometry), self.blocks2.reshape(b * s, q)), (geometry,))
        else:
            first, second = layout.kernel(self.blocks1, geometry), self.blocks2.reshape(b * s, q)
        z = channel_shuffle(layout.conv(x, first, geometry), q, b) if b > 1 else layout.conv(x, first, geometry)
        y = pointwise(z, second, groups=b)
        y = keep_channels(channel_shuffle(y, b, s) if b > 1 else y, self.out_features)
        if self.bias is None:
            return y
        return y + self.bias[:, None, None] if torch.is_grad_enabled() else y.add_(self.bias[:, None, None])

    def to_dense_weight(self) -> Tensor:
        eye = torch.eye(self.in_features, device=self.blocks1.device, dtype=self.blocks1.dtype)
        return self._apply_factors(eye).T

    def num_params(self) -> int:
        return self.blocks1.numel() + self.blocks2.numel() + self.bias_params()

    def macs_per_token(self) -> int:
        return self.blocks1.numel() + self.blocks2.numel()

    def config(self) -> dict:
        return {"nblocks": self.nblocks, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", nblocks={self.nblocks}, "
                f"blocks=({self.in_block}->{self.inner}->{self.out_block})")
