"""Block-diagonal layer with an optional low-rank residual: ``W ~= blockdiag(D_1..D_b) + L R``.

With ``b`` blocks the input is zero-padded to ``b p`` (``p = ceil(n/b)``) and the output to ``b s``
(``s = ceil(m/b)``); block ``k`` maps input entries ``kp..kp+p-1`` to outputs ``ks..ks+s-1``, and the padded
output is truncated to ``m``. Cost (parameters = MACs per token): ``b s p + r (m + n)``.
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Calibration, StructuredLinear, check_budget, register_layer
from .config import LayerConfig, OptionError, option
from .convforms import BlockLayout, ConvGeometry, factored_conv, keep_channels
from .fastpath import cached, fast_paths_enabled, grad_free
from .lowrank import spectral_factors

log = logging.getLogger(__name__)


def blockdiag_cost(in_features: int, out_features: int, nblocks: int) -> int:
    """Entries stored by ``nblocks`` padded diagonal blocks."""
    return nblocks * math.ceil(out_features / nblocks) * math.ceil(in_features / nblocks)


@dataclass
class BlockDiagConfig(LayerConfig):
    """Block-diagonal W (zero-padded for non-divisible sizes) plus an optional low-rank residual L R."""

    layer_type = "blockdiag"
    budget: float = option(0.5, "fraction of the dense layer's parameters (= its MACs) kept, in (0, 1]: the cost "
                           "b s p + r (m + n) never exceeds it", gt=0, le=1)
    residual_fraction: float = option(0.0, "share of the budget given to the low-rank residual (0 = pure "
                                      "block-diagonal)", ge=0, lt=1)
    refine_steps: int = option(10, "alternating block/residual refits after the SVD init (only used with a "
                               "residual)", ge=0)
    nblocks: int | None = option(None, "fixed block count for every layer (null = the count that fills the budget "
                                 "left by the residual)", gt=0)
    residual_rank: int | None = option(None, "fixed rank of the residual for every layer (null = from "
                                       "residual_fraction)", ge=0)

    def validate(self) -> None:
        if self.residual_rank is not None and self.residual_fraction > 0:
            raise OptionError("residual_rank", self.residual_rank, "fixes the residual that residual_fraction "
                              "would size", "give one: residual_rank=null, or residual_fraction=0")


def check_count(name: str, value, low: int, out_features: int, in_features: int) -> int:
    """A block count or rank in ``[low, min(m, n)]`` for an ``m x n`` layer, as an int."""
    high = min(out_features, in_features)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise OptionError(name, value, f"must be an integer in [{low}, {high}] for a {out_features}x{in_features} "
                          "layer", f"lower layer.options.{name}, or set it to null to derive it from the budget")
    return int(value)


def least_budget(cost: float, dense: int) -> str:
    """``cost / dense`` rounded up to 4 decimals: a budget to suggest that does fit ``cost``."""
    return f"{math.ceil(cost / dense * 1e4) / 1e4:g}"


def residual_rank_for_budget(budget: float, residual_fraction: float, out_features: int, in_features: int) -> int:
    """Largest rank whose ``r (m + n)`` fits in ``residual_fraction * budget * m * n``; a share that keeps
    less than one rank-1 component is an error, not a silently missing residual."""
    BlockDiagConfig(budget=budget, residual_fraction=residual_fraction)  # checks both against their ranges
    rank = math.floor(residual_fraction * budget * out_features * in_features / (out_features + in_features))
    if residual_fraction > 0 and rank < 1:
        smallest = least_budget(out_features + in_features, budget * out_features * in_features)
        raise OptionError("residual_fraction", residual_fraction, f"of budget {budget} keeps less than one rank-1 "
                          f"residual component of a {out_features}x{in_features} layer",
                          f"raise it to at least {smallest} (or layer.budget), or set it to 0")
    return min(rank, min(out_features, in_features))


def nblocks_for_budget(budget: float, out_features: int, in_features: int, reserved: int = 0) -> int:
    """The block count in ``[1, min(m, n)]`` whose padded cost is largest without exceeding
    ``budget * m * n - reserved`` (ties: fewest blocks)."""
    check_budget(budget)
    available = budget * out_features * in_features - reserved
    counts = range(1, min(out_features, in_features) + 1)
    fitting = [(blockdiag_cost(in_features, out_features, b), -b) for b in counts
               if blockdiag_cost(in_features, out_features, b) <= available]
    if not fitting:
        cheapest = min(blockdiag_cost(in_features, out_features, b) for b in counts) + reserved
        raise OptionError("budget", budget, f"is below the cheapest block layout of a {out_features}x{in_features} "
                          f"layer ({cheapest} numbers{f' with {reserved} for the residual' if reserved else ''})",
                          f"raise layer.budget to at least {least_budget(cheapest, out_features * in_features)}, "
                          "lower residual_fraction, or exclude the layer with layer.exclude")
    return -max(fitting)[1]


@register_layer(BlockDiagConfig)
class BlockDiagLinear(StructuredLinear):
    """``y = D x + L (R x) + b`` with block-diagonal ``D`` (``blocks``: ``b x s x p``) and rank-``r`` ``L R``.

    Explicit ``nblocks`` / ``residual_rank`` win over ``budget``. With a budget, ``residual_fraction`` of it
    goes to the residual and the rest to the blocks; with no budget, ``budget=1.0``.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int | None = None,
                 budget: float | None = None, residual_rank: int | None = None, residual_fraction: float = 0.0,
                 bias: bool = True):
        super().__init__(in_features, out_features, bias)
        if residual_rank is None:
            residual_rank = 0 if budget is None else residual_rank_for_budget(
                budget, residual_fraction, out_features, in_features)
        self.residual_rank = check_count("residual_rank", residual_rank, 0, out_features, in_features)
        if nblocks is None:
            nblocks = nblocks_for_budget(1.0 if budget is None else budget, out_features, in_features,
                                         reserved=self.residual_rank * (in_features + out_features))
        self.nblocks = check_count("nblocks", nblocks, 1, out_features, in_features)
        self.in_block = math.ceil(in_features / self.nblocks)
        self.out_block = math.ceil(out_features / self.nblocks)
        self.blocks = nn.Parameter(torch.empty(self.nblocks, self.out_block, self.in_block))
        self.left = nn.Parameter(torch.empty(out_features, self.residual_rank))
        self.right = nn.Parameter(torch.empty(self.residual_rank, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Blocks uniform ``+-1/sqrt(p)``; the residual starts at zero (``left = 0``) so it adds nothing."""
        with torch.no_grad():
            bound = 1 / math.sqrt(self.in_block)
            self.blocks.uniform_(-bound, bound)
            nn.init.zeros_(self.left)
            nn.init.uniform_(self.right, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
            if self.bias is not None:
                self.bias.uniform_(-1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))

    @classmethod
    def initialize(cls, weight: Tensor, bias: Tensor | None, config: BlockDiagConfig,
                   data: Calibration) -> "BlockDiagLinear":
        """Copy the diagonal blocks of ``weight``; with a residual, fit it by truncated SVD of the off-block
        remainder, then alternate (blocks = diag part of ``W - LR``, residual = SVD of ``W - D``).

        Without a residual this is the exact Frobenius projection. With one, each of the ``refine_steps``
        alternations can only lower the error (there is no closed form for the joint optimum).
        """
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, nblocks=config.nblocks, budget=config.budget,
                    residual_rank=config.residual_rank, residual_fraction=config.residual_fraction,
                    bias=bias is not None).to(weight.device, weight.dtype)
        work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        blocks = layer._diagonal_blocks(work)
        with torch.no_grad():
            if layer.residual_rank:
                for step in range(config.refine_steps + 1):
                    left, right = spectral_factors(work - layer._assemble(blocks), layer.residual_rank)
                    if step < config.refine_steps:
                        blocks = layer._diagonal_blocks(work - left @ right)
                layer.left.copy_(left)
                layer.right.copy_(right)
            layer.blocks.copy_(blocks)
        layer._copy_bias(bias)
        log.debug("blockdiag %dx%d: nblocks=%d, residual_rank=%d, cost %.3f of dense", out_features, in_features,
                  layer.nblocks, layer.residual_rank, layer.macs_per_token() / (out_features * in_features))
        return layer

    def _diagonal_blocks(self, weight: Tensor) -> Tensor:
        """The ``b x s x p`` diagonal blocks of the zero-padded ``weight``."""
        b, s, p = self.nblocks, self.out_block, self.in_block
        padded = F.pad(weight, (0, b * p - self.in_features, 0, b * s - self.out_features))
        return padded.reshape(b, s, b, p).diagonal(dim1=0, dim2=2).permute(2, 0, 1)

    def _assemble(self, blocks: Tensor) -> Tensor:
        """The ``m x n`` block-diagonal matrix with the given blocks (padding cut off)."""
        dense = torch.block_diag(*blocks.unbind(0))
        return dense[: self.out_features, : self.in_features]

    def _forward_fast(self, flat: Tensor) -> Tensor:
        """The forward on a 2-D batch. Without autograd: one ``addmm`` per block writing its column slice of
        the output in place (no copies, bias fused), the residual added by a second in-place ``addmm``. With
        autograd: one ``bmm`` over strided input chunks, one copy laying the blocks side by side."""
        b, s, p, rows = self.nblocks, self.out_block, self.in_block, flat.shape[0]
        x = flat if b * p == self.in_features else F.pad(flat, (0, b * p - self.in_features))
        # in-place addmm/mm skip autocast: an input of another dtype (bf16 activations) takes the bmm path
        if flat.dtype == self.blocks.dtype and not (
                torch.is_grad_enabled() and (flat.requires_grad or self.blocks.requires_grad)):
            y = flat.new_empty(rows, b * s)
            for k in range(b):
                out = y[:, k * s:(k + 1) * s]
                chunk, block = x[:, k * p:(k + 1) * p], self.blocks[k].t()
                if self.bias is not None and (k + 1) * s <= self.out_features:
                    torch.addmm(self.bias[k * s:(k + 1) * s], chunk, block, out=out)
                else:
                    torch.mm(chunk, block, out=out)
            y = y[:, : self.out_features]
            cut = self.out_features // s * s  # a block straddling the cut at out_features got no bias
            if self.bias is not None and cut < self.out_features:
                y[:, cut:] += self.bias[cut:]
            if self.residual_rank:
                y.addmm_(F.linear(flat, self.right), self.left.t())
            return y
        y = torch.bmm(x.reshape(rows, b, p).transpose(0, 1), self.blocks.transpose(1, 2)).transpose(0, 1)
        y = y.reshape(rows, b * s)[:, : self.out_features]
        if self.residual_rank:
            y = torch.addmm(y, F.linear(flat, self.right), self.left.t())
        return y if self.bias is None else y + self.bias

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if fast_paths_enabled():
            return self._forward_fast(flat).reshape(*x.shape[:-1], self.out_features)
        b = self.nblocks
        chunks = F.pad(flat, (0, b * self.in_block - self.in_features)).reshape(-1, b, self.in_block)
        y = torch.einsum("ksp,nkp->nks", self.blocks, chunks).reshape(-1, b * self.out_block)[:, : self.out_features]
        if self.residual_rank:
            y = y + F.linear(F.linear(flat, self.right), self.left)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def conv_forward(self, x: Tensor, geometry: ConvGeometry) -> Tensor:
        """One grouped conv, ``groups = nblocks``: in the ``"channel"`` column order a block's columns are a
        run of whole input channels (all kernel positions), so the blocks are channel groups. Channel counts
        the block count does not divide gather each block's channel span first (see ``BlockLayout``). The
        residual runs as a k x k conv into its rank and a 1 x 1 conv, added in place."""
        layout = BlockLayout.of(self.nblocks, self.in_block, geometry)
        if grad_free(self.blocks):
            kernel = cached(self, "conv_kernel", (self.blocks,), lambda: layout.kernel(self.blocks, geometry),
                            (geometry,))
        else:
            kernel = layout.kernel(self.blocks, geometry)
        fits = self.nblocks * self.out_block == self.out_features
        y = keep_channels(layout.conv(x, kernel, geometry, self.bias if fits else None), self.out_features)
        if self.residual_rank:
            y = y + factored_conv(x, geometry, self.right, self.left, None)
        if self.bias is not None and not fits:
            y = y + self.bias[:, None, None]
        return y

    def to_dense_weight(self) -> Tensor:
        dense = self._assemble(self.blocks)
        return dense + self.left @ self.right if self.residual_rank else dense

    def num_params(self) -> int:
        return self.macs_per_token() + self.bias_params()

    def macs_per_token(self) -> int:
        return self.blocks.numel() + self.residual_rank * (self.in_features + self.out_features)

    def config(self) -> dict:
        return {"nblocks": self.nblocks, "residual_rank": self.residual_rank, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", nblocks={self.nblocks}, block={self.out_block}x{self.in_block}, "
                f"residual_rank={self.residual_rank}")
