"""The identity re-parameterization: a plain dense weight, for baselines and for plumbing checks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StructuredLinear, check_dense_weight, register_layer


@register_layer("dense")
class DenseLinear(StructuredLinear):
    """``nn.Linear`` behind the structured interface; ``budget`` is accepted and ignored (always 1)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, budget: float | None = None):
        super().__init__(in_features, out_features, bias)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, budget: float = 1.0, **options) -> "DenseLinear":
        check_dense_weight(weight, bias)
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None)
        layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
        layer._copy_bias(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_dense_weight(self) -> Tensor:
        return self.weight

    def num_params(self) -> int:
        return self.weight.numel() + self.bias_params()

    def macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def config(self) -> dict:
        return {"bias": self.bias is not None}
