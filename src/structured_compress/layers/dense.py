"""The identity re-parameterization: a plain dense weight, for baselines and for plumbing checks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Calibration, StructuredLinear, register_layer
from .config import LayerConfig, option


@dataclass
class DenseConfig(LayerConfig):
    """Baseline: every selected layer stays dense (replaced by DenseLinear, outputs identical)."""

    layer_type = "dense"
    budget: float = option(1.0, "unused: a dense layer keeps all of itself", gt=0, le=1)
    budget_of: Literal["none"] = option("none", "what budget counts: none (the budget is unused)")


@register_layer(DenseConfig)
class DenseLinear(StructuredLinear):
    """``nn.Linear`` behind the structured interface."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, budget: float | None = None):
        super().__init__(in_features, out_features, bias)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    @classmethod
    def initialize(cls, weight: Tensor, bias: Tensor | None, config: DenseConfig, data: Calibration) -> "DenseLinear":
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
