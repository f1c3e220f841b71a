"""Shared pieces of the layers' fast forward paths: a switch back to the reference paths, a cache for tensors
derived from a layer's state (dequantized or merged weights), and int8 integer matmuls.

Every fast path computes the same function as its layer's readable reference path (up to float rounding);
``reference_paths()`` turns them all off so tests can compare the two. The int8 paths also round the
activations to int8 (one scale per row), so they are approximations and only run where a layer's
``int8_activations`` is set (see :func:`set_int8_activations`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

_REFERENCE = False
_TINY = torch.finfo(torch.float32).tiny


@contextlib.contextmanager
def reference_paths() -> Iterator[None]:
    """Within the block every layer runs its reference forward (for equality tests and speed comparisons)."""
    global _REFERENCE
    previous, _REFERENCE = _REFERENCE, True
    try:
        yield
    finally:
        _REFERENCE = previous


def fast_paths_enabled() -> bool:
    return not _REFERENCE


def _state_key(sources: tuple[Tensor, ...], extra: tuple) -> tuple:
    """Identity of the state a derived tensor was built from: storage, in-place version, dtype, device, and
    whether it was built under inference mode (inference tensors must not reach autograd; they have no
    version counter, and cannot be changed in place outside inference mode)."""
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device)
                 for t in sources) + extra + (
        torch.is_inference_mode_enabled(),)


def cached(module: nn.Module, name: str, sources: tuple[Tensor, ...], build: Callable[[], Tensor | tuple],
           extra: tuple = ()) -> Tensor | tuple:
    """``build()``, rebuilt only when one of ``sources`` was replaced or changed in place (or ``extra``
    changed); one entry per ``name`` so stale copies do not pile up. Sources must not require grad (a cached
    tensor carries no graph). Under ``torch.compile`` it just builds, and the compiler fuses the work."""
    if torch.compiler.is_compiling():
        return build()
    store = module.__dict__.setdefault("_fast_cache", {})
    key = _state_key(sources, extra)
    entry = store.get(name)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, build())
        store[name] = entry
    return entry[1]


def grad_free(*tensors: Tensor | None) -> bool:
    """True when no gradient will flow to any of ``tensors`` (autograd off, or none requires grad)."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def contiguous_grad(x: Tensor) -> Tensor:
    """``x``, with its gradient made contiguous in backward (a no-op without autograd). Autograd passes the
    gradient of a permuted view on as a permuted view; a ``bmm`` backward handed one whose batch matrices
    have no unit stride takes CPU ``bmm``'s per-batch fallback, tens of times slower with two threads."""
    return _ContiguousGrad.apply(x) if torch.is_grad_enabled() and x.requires_grad else x


def factored_is_cheaper(rank: int, out_features: int, in_features: int) -> bool:
    """Two thin matmuls beat one dense matmul only while ``r (m + n) < m n`` (equal MACs: dense wins, being
    one call with one output write)."""
    return rank * (out_features + in_features) < out_features * in_features


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes of a 2-D float tensor with one float32 scale per row (dynamic quantization)."""
    scale = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    scale = scale.clamp(min=_TINY) / 127
    return torch.div(x, scale).round_().clamp_(-127, 127).to(torch.int8), scale


def int_mm_supported(rows: int, inner: int, cols: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` takes an ``(rows, inner) @ (inner, cols)`` int8 product on ``device``
    (CUDA needs more than 16 rows and inner/column sizes that are multiples of 8)."""
    if device.type == "cuda":
        return rows > 16 and inner % 8 == 0 and cols % 8 == 0
    return device.type == "cpu"


def int8_matmul(x: Tensor, codes_t: Tensor, col_scale: Tensor) -> Tensor:
    """``x @ (codes_t * col_scale)`` in float32 with ``x`` rounded to int8 per row: one integer matmul
    (``codes_t``: int8, inner x cols) and two rescales. Exact except for the rounding of ``x``."""
    x_codes, x_scale = quantize_rows(x)
    return torch.mul(torch._int_mm(x_codes, codes_t), x_scale).mul_(col_scale)


def int8_factors(v_codes: Tensor, v_scale: Tensor, u_codes: Tensor, u_scale: Tensor) -> tuple[Tensor, ...]:
    """Operands of ``y = (U * u_scale) (v_scale * (V x))`` as two :func:`int8_matmul` calls: ``(V^T, v_scale,
    U^T, u_scale)`` with the scales as float32 rows and the rank zero-padded to a multiple of 8 (CUDA's
    ``_int_mm`` needs it; a zero component adds exactly nothing)."""
    pad = -v_codes.shape[0] % 8
    v_t = torch.nn.functional.pad(v_codes.t(), (0, pad))
    u_t = torch.nn.functional.pad(u_codes.t(), (0, 0, 0, pad))
    v_scale = torch.nn.functional.pad(v_scale.float().reshape(1, -1), (0, pad))
    return v_t, v_scale, u_t, u_scale.float().reshape(1, -1)


def int8_factors_supported(x: Tensor, in_features: int, rank: int, out_features: int) -> bool:
    """Whether both integer matmuls of :func:`int8_factors` (rank padded to a multiple of 8) can run on the
    2-D input ``x``: no gradient may be needed (integer matmuls have none), and the shapes must suit."""
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    rows, device, rank = x.shape[0], x.device, rank + -rank % 8
    return int_mm_supported(rows, in_features, rank, device) and int_mm_supported(rows, rank, out_features, device)


def set_int8_activations(model: nn.Module, enabled: bool = True) -> int:
    """Let every layer that has an int8 path (``int8_activations`` attribute) use it; returns how many."""
    layers = [m for m in model.modules() if hasattr(type(m), "int8_activations")]
    for layer in layers:
        layer.int8_activations = bool(enabled)
    return len(layers)


def clear_caches(model: nn.Module) -> int:
    """Free every cached derived tensor under ``model`` (they hold float copies: up to the dense weights'
    size); the next forward rebuilds what it needs. Returns how many modules held a cache."""
    holders = [m for m in model.modules() if m.__dict__.pop("_fast_cache", None) is not None]
    return len(holders)
