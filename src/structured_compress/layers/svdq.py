"""SVD + integer quantization: ``W ~= Q(U_k) diag(s) Q(V_k)`` with int8/int4 factors and float ``s``.

The rank comes from the budget, or -- given ``max_error`` and calibration ``inputs`` -- from a binary search
for the smallest rank whose relative output error, measured with the quantized factors, meets the bound.
Three storage modes share the class:

* ``factored``: packed quantized ``U_k`` (out x k) and ``V_k`` (k x in), fp16 group scales (and int8 zero
  codes on an asymmetric grid, fp16 mins on GGUF's Q4_1 grid), float ``s``;
* ``qdense``: the whole weight quantized with the same quantizer, used when no rank meets the bound or when
  the factored form would take at least as many bytes (so a kept factored form is always the smaller one);
* ``dense``: the float weight, when even the quantized dense weight misses ``max_error``.

With ``fallback_bits`` (e.g. 8 for an int4 codec) a layer that misses the bound at ``bits`` is searched again at
``fallback_bits`` before it is kept in float: a mixed-precision model, each layer's bit width in its config.

Rounding: ``nearest`` (round-to-nearest) or ``gptq`` (Hessian-aware, error-compensating, needs the layer's
input Gram matrix ``gram``): ``V_k`` is GPTQ-rounded against ``gram``, then ``U_k`` is refitted by least squares to
the rounded ``V_k`` on the same inputs (absorbing its error) and GPTQ-rounded against the Gram matrix of its own
inputs ``diag(s) V_hat x``; a whole matrix is GPTQ-rounded directly.

Grids: the project's (``grid: int``) or llama.cpp's block grids (``grid: gguf``: Q8_0, Q4_0, Q4_1 by ``bits`` and
``symmetric``, groups of 32), on which a whole-matrix layer exports to GGUF without loss (``export/gguf.py``).
fp16 scales (and Q4_1 mins) are kept as their int16 bit patterns so ``model.half()``/``.to(dtype)`` cannot round
them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Calibration, StructuredLinear, register_layer
from .config import LayerConfig, OptionError, option
from .convforms import ConvGeometry, factored_conv
from .fastpath import (cached, factored_is_cheaper, fast_paths_enabled, int8_factors, int8_factors_supported,
                       int8_matmul)
from .lowrank import rank_for_budget
from .gptq import gptq_quantize
from .quant import (GGUF_BLOCK, check_bits, dequantize, gguf_type, num_groups, pack, packed_numel, quantize,
                    quantize_grid, unpack)

log = logging.getLogger(__name__)

MODES = ("factored", "qdense", "dense")
GRIDS = ("int", "gguf")
Quantized = tuple[Tensor, Tensor, "Tensor | None"]  # (codes, fp16 scales, offsets: int8 zero codes, fp16 mins or None)


def max_useful_rank(out_features: int, in_features: int) -> int:
    """``floor(mn / (m + n))``: beyond it the factors hold more numbers than the weight (at least 1)."""
    return max(1, (out_features * in_features) // (out_features + in_features))


def search_rank(error_of: Callable[[int], float], k_max: int, max_error: float) -> int | None:
    """Smallest ``k`` in ``[1, k_max]`` with ``error_of(k) <= max_error`` by binary search (assumes the error
    is non-increasing in k), or ``None`` when even ``k_max`` misses the bound."""
    if error_of(k_max) > max_error:
        return None
    low, high = 1, k_max
    while low < high:
        mid = (low + high) // 2
        if error_of(mid) <= max_error:
            high = mid
        else:
            low = mid + 1
    return low


def fake_quantize(matrix: Tensor, bits: int, group_size: int | None) -> Tensor:
    """``dequantize(quantize(matrix))``: what the stored factor will be."""
    return dequantize(*quantize(matrix, bits, group_size), group_size)


def quantize_matrix(matrix: Tensor, bits: int, group_size: int | None, symmetric: bool,
                    gram: Tensor | None, gguf: bool = False) -> Quantized:
    """Round ``matrix`` (rows x cols) onto the grid: to nearest, or by GPTQ when ``gram`` (cols x cols) is given."""
    if gram is None:
        return quantize_grid(matrix, bits, group_size, symmetric, gguf)
    return gptq_quantize(matrix, gram, bits, group_size, symmetric, gguf=gguf)


def quantize_factors(weight: Tensor, u: Tensor, s: Tensor, vh: Tensor, bits: int, group_size: int | None,
                     symmetric: bool, gram: Tensor | None, gguf: bool = False) -> tuple[Quantized, Quantized]:
    """Quantized ``(U, V)`` of the rank-k SVD ``weight ~= U diag(s) V``; with ``gram`` (the inputs' ``X^T X``)
    ``V`` is GPTQ-rounded, ``U`` refitted to it -- ``argmin_U ||(U diag(s) V_hat - W) X^T||`` -- and
    GPTQ-rounded on its own inputs, as the module doc says."""
    if gram is None:
        return (quantize_matrix(u, bits, group_size, symmetric, None, gguf),
                quantize_matrix(vh, bits, group_size, symmetric, None, gguf))
    gram = gram.to(weight.device, torch.float64)
    v_q = gptq_quantize(vh, gram, bits, group_size, symmetric, gguf=gguf)
    hidden_map = (dequantize(*v_q[:2], group_size, v_q[2], gguf) * s[:, None]).double()  # x -> diag(s) V_hat x
    hidden_gram = hidden_map @ gram @ hidden_map.T
    ridge = 1e-8 * hidden_gram.diagonal().mean().clamp(min=1e-30) * torch.eye(len(s), dtype=torch.float64,
                                                                           device=weight.device)
    refit = torch.linalg.solve(hidden_gram + ridge, hidden_map @ gram @ weight.double().T).T
    return gptq_quantize(refit.float(), hidden_gram, bits, group_size, symmetric, gguf=gguf), v_q


def _dequantized(q: Quantized, group_size: int | None, gguf: bool) -> Tensor:
    return dequantize(q[0], q[1], group_size, q[2], gguf)


@dataclass
class SVDQuantConfig(LayerConfig):
    """SVD + int8/int4 quantization of both factors (packed codes, fp16 per-row or per-group scales).
    Rank: options.rank, else with max_error and calibration inputs the smallest rank whose relative output
    error ||W_hat x - W x|| / ||W x + b|| <= max_error (binary search), else from budget. Falls back to the
    quantized dense weight when no rank meets the bound or the factors would not be smaller, then to
    fallback_bits, then to the float weight."""

    layer_type = "svdq"
    promoted = ("max_error",)
    budget: float = option(0.5, "dense fraction that sets the factors' rank k = budget m n / (m + n), in (0, 1] "
                           "(unused with rank, max_error or svd: false)", gt=0, le=1)
    bits: Literal[4, 8] = option(8, "bits per stored code of the factors (or of the whole weight)")
    group_size: int | None = option(None, "consecutive entries of a row that share one scale (null = one per row)",
                                    gt=0)
    max_error: float | None = option(None, "bound on the relative output error on the calibration inputs; picks "
                                     "the rank per layer (needs calibration_batches > 0; null = rank from budget)",
                                     gt=0)
    fallback_bits: Literal[8] | None = option(None, "bits of a second try for a layer that misses max_error at "
                                              "bits (8 with bits=4: mixed int4/int8), before it is kept in float")
    symmetric: bool = option(True, "true: symmetric grids; false: zero-point grids (int8 zero code per group)")
    rounding: Literal["nearest", "gptq"] = option("nearest", "nearest | gptq (Hessian-aware error-compensating "
                                                  "rounding from the inputs' Gram matrix; needs calibration)")
    svd: bool = option(True, "false: no SVD, the whole weight quantized (plain weight-only int4/int8)")
    grid: Literal["int", "gguf"] = option("int", "int: the project's grids; gguf: llama.cpp's blocks (Q8_0 for "
                                          "bits=8, Q4_0 / Q4_1 for bits=4 symmetric / not; needs group_size=32): "
                                          "whole-matrix layers then export to GGUF without loss")
    rank: int | None = option(None, "fixed rank of the factors for every layer (null = from max_error or budget)",
                              gt=0)

    def validate(self) -> None:
        if self.fallback_bits is not None and self.max_error is None:
            raise OptionError("fallback_bits", self.fallback_bits, "only acts on layers that miss max_error",
                              "set layer.max_error too, or fallback_bits=null")
        if self.fallback_bits is not None and self.fallback_bits <= self.bits:
            raise OptionError("fallback_bits", self.fallback_bits, f"must be more bits than bits={self.bits}",
                              "use bits=4 with fallback_bits=8, or fallback_bits=null")
        if self.rank is not None and not self.svd:
            raise OptionError("rank", self.rank, "svd=false stores no factors", "set rank=null or svd=true")
        if self.grid == "gguf" and self.group_size != GGUF_BLOCK:
            raise OptionError("group_size", self.group_size, f"grid=gguf quantizes in llama.cpp's blocks of "
                              f"{GGUF_BLOCK} weights", f"set group_size={GGUF_BLOCK}, or grid=int")
        if self.grid == "gguf" and not self.symmetric and 8 in (self.bits, self.fallback_bits):
            raise OptionError("symmetric", False, "GGUF has no 8-bit block type with a zero point (grid=gguf)",
                              "use symmetric=true (Q8_0), bits=4 without fallback_bits (Q4_1), or grid=int")
        if self.rank is not None and self.max_error is not None:
            raise OptionError("rank", self.rank, "max_error picks the rank itself",
                              "give one: rank=null, or max_error=null")

    def calibration_needed(self) -> tuple[str, ...]:
        return (("inputs",) if self.max_error is not None else ()) + (("gram",) if self.rounding == "gptq" else ())


@register_layer(SVDQuantConfig)
class SVDQuantLinear(StructuredLinear):
    """``y = U (s * (V x)) + b`` with quantized, packed ``U``/``V`` (or a quantized/float dense weight).

    The constructor allocates zero buffers for the given mode and rank (``rank`` defaults to the largest
    useful one); ``from_dense`` fills them.
    """

    exact_tensors = ("s",)  # the rank search measured the output error with these scales

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bits: int = 8,
                 group_size: int | None = None, mode: str = "factored", bias: bool = True, symmetric: bool = True,
                 grid: str = "int"):
        super().__init__(in_features, out_features, bias)
        if mode not in MODES:
            raise ValueError(f"svdq mode must be one of {MODES}, got {mode!r}")
        if grid not in GRIDS:
            raise ValueError(f"svdq grid must be one of {GRIDS}, got {grid!r}")
        self.bits, self.group_size, self.mode, self.symmetric = check_bits(bits), group_size, mode, bool(symmetric)
        self.grid, self.gguf = grid, grid == "gguf"
        if self.gguf:
            gguf_type(bits, self.symmetric)  # refuses a grid GGUF cannot store
        self.rank: int | None = None
        self._shapes: dict[str, tuple[int, int]] = {}
        if mode == "factored":
            rank = max_useful_rank(out_features, in_features) if rank is None else int(rank)
            if not 1 <= rank <= min(in_features, out_features):
                raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
            self.rank = rank
            self._register_quantized("u", out_features, rank)
            self._register_quantized("v", rank, in_features)
            self.register_buffer("s", torch.zeros(rank))
        elif mode == "qdense":
            self._register_quantized("w", out_features, in_features)
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features))

    def _register_quantized(self, name: str, rows: int, cols: int) -> None:
        self._shapes[name] = (rows, cols)
        self.register_buffer(f"{name}_packed", torch.zeros(packed_numel(rows * cols, self.bits), dtype=torch.uint8))
        groups = num_groups(cols, self.group_size)
        self.register_buffer(f"{name}_scales", torch.zeros(rows, groups, dtype=torch.int16))
        if not self.symmetric:  # the zero point: int8 zero codes, or on the GGUF grid fp16 mins (as int16 bits)
            offsets, dtype = ("mins", torch.int16) if self.gguf else ("zeros", torch.int8)
            self.register_buffer(f"{name}_{offsets}", torch.zeros(rows, groups, dtype=dtype))

    def _store(self, name: str, quantized: Quantized) -> None:
        """Write ``(codes, scales, offsets)`` (as :func:`quantize_matrix` returns them) into the buffers."""
        codes, scales, offsets = quantized
        getattr(self, f"{name}_packed").copy_(pack(codes, self.bits))
        getattr(self, f"{name}_scales").copy_(scales.view(torch.int16))
        if not self.symmetric and self.gguf:
            getattr(self, f"{name}_mins").copy_(offsets.view(torch.int16))
        elif not self.symmetric:
            getattr(self, f"{name}_zeros").copy_(offsets)

    def quantized(self, name: str) -> Quantized:
        """The stored ``(codes, fp16 scales, offsets)`` of factor ``name`` (``u``, ``v``, or ``w`` in qdense mode)."""
        codes = unpack(getattr(self, f"{name}_packed"), self.bits, self._shapes[name])
        offsets = None
        if not self.symmetric:
            offsets = getattr(self, f"{name}_mins").view(torch.float16) if self.gguf else getattr(self, f"{name}_zeros")
        return codes, getattr(self, f"{name}_scales").view(torch.float16), offsets

    def _load(self, name: str) -> Tensor:
        codes, scales, offsets = self.quantized(name)
        return dequantize(codes, scales, self.group_size, offsets, self.gguf)

    @classmethod
    def initialize(cls, weight: Tensor, bias: Tensor | None, config: SVDQuantConfig,
                   data: Calibration) -> "SVDQuantLinear":
        """Quantized truncated SVD of ``weight`` at the rank the module doc describes, falling back to
        ``qdense``, then ``fallback_bits``, then ``dense``."""
        bits, group_size, symmetric = config.bits, config.group_size, config.symmetric
        gram = data.gram if config.rounding == "gptq" else None
        out_features, in_features = weight.shape
        dense = weight.float()
        gguf = config.grid == "gguf"
        kwargs = {"bits": bits, "group_size": group_size, "bias": bias is not None, "symmetric": symmetric,
                  "grid": config.grid}
        error_of = None
        if config.max_error is not None:
            error_of = _output_error_fn(dense, bias, data.inputs.to(dense.device).reshape(-1, in_features).float())
        u, sv, vh = torch.linalg.svd(dense, full_matrices=False) if config.svd else (None, None, None)

        def factors(k: int) -> tuple[Quantized, Quantized]:
            return quantize_factors(dense, u[:, :k], sv[:k], vh[:k], bits, group_size, symmetric, gram, gguf)

        def factored_error(k: int) -> float:
            u_q, v_q = factors(k)
            return error_of(_dequantized(u_q, group_size, gguf) * sv[:k], _dequantized(v_q, group_size, gguf))

        rank = None
        if config.svd:
            rank = _factored_rank(config, out_features, in_features, None if error_of is None else factored_error)
        qdense = cls(in_features, out_features, mode="qdense", **kwargs).to(weight.device)
        qdense._store("w", quantize_matrix(dense, bits, group_size, symmetric, gram, gguf))
        if rank is not None:
            layer = cls(in_features, out_features, rank=rank, mode="factored", **kwargs).to(weight.device)
            u_q, v_q = factors(rank)
            layer._store("u", u_q)
            layer._store("v", v_q)
            layer.s.copy_(sv[:rank])
            if layer.storage_bytes() < qdense.storage_bytes():
                return _finish(layer, bias, weight.dtype)
            log.debug("svdq %dx%d: rank %d is not smaller than quantized dense", out_features, in_features, rank)
        if error_of is None or error_of(qdense.to_dense_weight()) <= config.max_error:
            return _finish(qdense, bias, weight.dtype)
        if config.fallback_bits is not None:
            log.info("svdq %dx%d: int%d misses max_error=%g; trying int%d", out_features, in_features, bits,
                     config.max_error, config.fallback_bits)
            return cls.initialize(weight, bias, replace(config, bits=config.fallback_bits, fallback_bits=None), data)
        log.info("svdq %dx%d: even the int%d dense weight misses max_error=%g; keeping it in float",
                 out_features, in_features, bits, config.max_error)
        layer = cls(in_features, out_features, mode="dense", **kwargs).to(weight.device)
        layer.weight.copy_(dense)
        return _finish(layer, bias, weight.dtype)

    int8_activations = False  # opt-in: integer matmuls with int8-rounded activations (see fastpath)

    def forward(self, x: Tensor) -> Tensor:
        """Fast paths (same function): int8 codes through integer matmuls when ``int8_activations`` is set;
        else the float weights dequantized once and cached (factored: ``s`` folded into ``V``, merged into
        one matrix when that is cheaper); the reference path dequantizes on every call."""
        if not fast_paths_enabled():
            return self._forward_reference(x)
        flat = x.reshape(-1, self.in_features)
        if self._int8_path_ok(flat):
            v_t, v_scale, u_t, u_scale = cached(self, "int8", self._state(), self._int8_operands)
            y = int8_matmul(int8_matmul(flat, v_t, v_scale), u_t, u_scale).to(x.dtype)
            y = y if self.bias is None else y + self.bias.to(x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.mode == "factored" and factored_is_cheaper(self.rank, self.out_features, self.in_features):
            left, right = cached(self, "factors", self._state(), lambda: self._float_factors(x.dtype), (x.dtype,))
            return F.linear(F.linear(x, right), left, self.bias)
        weight = cached(self, "weight", self._state(), lambda: self.to_dense_weight().to(x.dtype), (x.dtype,))
        return F.linear(x, weight, self.bias)

    def conv_forward(self, x: Tensor, geometry: ConvGeometry) -> Tensor | None:
        """Factored mode: the dequantized factors (cached) as a k x k conv into ``rank`` channels and a 1 x 1
        conv; the whole-weight modes: their (dequantized, cached) weight as one dense conv kernel."""
        if not fast_paths_enabled():
            return None
        if self.mode == "factored":
            left, right = cached(self, "factors", self._state(), lambda: self._float_factors(x.dtype), (x.dtype,))
            return factored_conv(x, geometry, right, left, self.bias)
        weight = cached(self, "weight", self._state(), lambda: self.to_dense_weight().to(x.dtype), (x.dtype,))
        return geometry.conv(x, weight.reshape(self.out_features, geometry.in_channels, *geometry.kernel_size),
                             self.bias)

    def _state(self) -> tuple[Tensor, ...]:
        """The buffers every derived tensor depends on (the cache key)."""
        return tuple(self.buffers())

    def _float_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(U, s V)`` dequantized in ``dtype``."""
        work = torch.promote_types(dtype, torch.float32)  # fold s at float32 or better (float64 stays exact)
        return self._load("u").to(dtype), (self.s.to(work)[:, None] * self._load("v").to(work)).to(dtype)

    def _int8_path_ok(self, flat: Tensor) -> bool:
        """The integer path needs factored int8 codes with one scale per row, and a shape ``_int_mm`` takes."""
        return (self.int8_activations and self.mode == "factored" and self.bits == 8 and self.group_size is None
                and int8_factors_supported(flat, self.in_features, self.rank, self.out_features))

    def _int8_operands(self) -> tuple[Tensor, ...]:
        """:func:`int8_factors` of the stored codes, ``s`` folded into the scales of ``V``'s rows."""
        codes = {name: unpack(getattr(self, f"{name}_packed"), self.bits, self._shapes[name]) for name in "uv"}
        scales = {name: getattr(self, f"{name}_scales").view(torch.float16).float()[:, 0] for name in "uv"}
        return int8_factors(codes["v"], scales["v"] * self.s.float(), codes["u"], scales["u"])

    def _forward_reference(self, x: Tensor) -> Tensor:
        if self.mode == "factored":
            hidden = F.linear(x, self._load("v").to(x.dtype)) * self.s.to(x.dtype)
            return F.linear(hidden, self._load("u").to(x.dtype), self.bias)
        weight = self.weight if self.mode == "dense" else self._load("w")
        return F.linear(x, weight.to(x.dtype), self.bias)

    def to_dense_weight(self) -> Tensor:
        if self.mode == "factored":
            return (self._load("u") * self.s.float()) @ self._load("v")
        return self.weight if self.mode == "dense" else self._load("w")

    def num_params(self) -> int:
        """Numbers stored: integer codes (or floats in ``dense`` mode), scales, ``s`` and the bias."""
        return sum(t.numel() for name, t in self.state_dict().items() if not name.endswith("_packed")) + sum(
            rows * cols for rows, cols in self._shapes.values())

    def macs_per_token(self) -> int:
        if self.mode == "factored":
            return self.rank * (self.in_features + self.out_features)
        return self.in_features * self.out_features

    def config(self) -> dict:
        return {"rank": self.rank, "bits": self.bits, "group_size": self.group_size, "mode": self.mode,
                "bias": self.bias is not None, "symmetric": self.symmetric, "grid": self.grid}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}, rank={self.rank}, bits={self.bits}"


def _output_error_fn(weight: Tensor, bias: Tensor | None,
                     inputs: Tensor) -> Callable[[Tensor, Tensor | None], float]:
    """``(left, right) -> ||inputs (left right - W)^T||_F / ||inputs W^T + b||_F`` (the bias cancels in the
    numerator); ``right=None`` measures the matrix ``left``. A factored approximation is applied factor by factor,
    never multiplied out: at rank k that costs ``k (in + out)`` per input row instead of ``in * out``, which is
    what makes the rank search affordable on 7B-sized layers."""
    target = F.linear(inputs, weight)
    reference = (target if bias is None else target + bias.detach().float()).norm().clamp(min=1e-30)

    def error_of(left: Tensor, right: Tensor | None = None) -> float:
        approx = F.linear(inputs, left) if right is None else F.linear(F.linear(inputs, right), left)
        return ((approx - target).norm() / reference).item()

    return error_of


def _factored_rank(config: SVDQuantConfig, out_features: int, in_features: int,
                   error_of_rank: Callable[[int], float] | None) -> int | None:
    """The factors' rank: ``config.rank``; else the smallest meeting ``max_error`` (``error_of_rank`` measures
    it; None when no rank meets it); else the budget's."""
    if config.rank is not None:
        if config.rank > min(out_features, in_features):
            raise OptionError("rank", config.rank, f"exceeds min(out, in) = {min(out_features, in_features)} of a "
                              f"{out_features}x{in_features} layer", "lower layer.options.rank or set it to null")
        return config.rank
    if error_of_rank is not None:
        return search_rank(error_of_rank, max_useful_rank(out_features, in_features), config.max_error)
    return rank_for_budget(config.budget, out_features, in_features)


def _finish(layer: SVDQuantLinear, bias: Tensor | None, dtype: torch.dtype) -> SVDQuantLinear:
    """Copy the bias and give the float state (``s``, bias, dense weight) the pretrained weight's dtype."""
    layer.to(dtype)
    layer._copy_bias(bias)
    log.debug("svdq %dx%d -> %s rank=%s, %d bytes", layer.out_features, layer.in_features, layer.mode,
              layer.rank, layer.storage_bytes())
    return layer
