"""Integer quantization on symmetric or asymmetric (zero-point) grids with per-row or per-group scales,
and int4/int8 byte packing.

Grids, per group of ``group_size`` consecutive entries of a row (or per whole row):

* symmetric: ``w ~= scale * c`` with codes ``c`` in ``[-qmax, qmax]`` (``qmax = 2^(B-1) - 1``);
* asymmetric: ``w ~= scale * (c - z)`` with codes in ``[-2^(B-1), 2^(B-1) - 1]`` and an integer zero code
  ``z`` in the same range: the ``2^B`` levels span ``[min(w, 0), max(w, 0)]``, so 0 is always exact.

With ``gguf=True`` the grids are llama.cpp's block types instead (groups of 32, :func:`gguf_type`), so a layer
quantized on them exports to a GGUF file without loss: Q8_0 is the symmetric int8 grid; Q4_0 maps the group's
signed extreme to code -8 (``scale = extreme / -8``, codes in ``[-8, 7]``, all 16 levels); Q4_1 is
``scale * (c + 8) + min`` with an fp16 ``min`` per group in place of the zero code.

Scales are fp16 and codes are computed against the fp16-rounded scale, so what a search evaluates is what
is stored. Quantized values are stored as ``uint8`` bytes: int8 as its two's-complement bytes, int4 as two
values per byte (value + 8 in a nibble, element ``2i`` in the low nibble, ``2i+1`` in the high one). Ternary
int8 tensors ({-1, 0, 1}) pack four entries per byte; that is how saved files store them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_BITS = (4, 8)
GGUF_BLOCK = 32  # weights per llama.cpp Q8_0 / Q4_0 / Q4_1 block (one fp16 scale, and Q4_1's fp16 min)
_FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): keeps a stored scale from rounding to 0


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric ``bits``-bit code: 127 for int8, 7 for int4."""
    return 2 ** (bits - 1) - 1


def num_groups(cols: int, group_size: int | None) -> int:
    """Scale groups per row: one per ``group_size`` consecutive entries (the last may be short), or 1."""
    if group_size is not None and (isinstance(group_size, bool) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (one scale per row), got {group_size!r}")
    return 1 if group_size is None else math.ceil(cols / group_size)


def _grouped(x: Tensor, group_size: int | None) -> Tensor:
    """``rows x cols`` -> ``rows x groups x g``, zero-padding the last group."""
    rows, cols = x.shape
    size = cols if group_size is None else group_size
    groups = num_groups(cols, group_size)
    padded = torch.nn.functional.pad(x, (0, groups * size - cols))
    return padded.reshape(rows, groups, size)


def gguf_type(bits: int, symmetric: bool) -> str:
    """The llama.cpp block type of a GGUF grid: ``q8_0`` (8 bits), ``q4_0`` / ``q4_1`` (4 bits, symmetric /
    with a min per block)."""
    if check_bits(bits) == 8 and not symmetric:
        raise ValueError("GGUF has no 8-bit block type with a zero point (Q8_1 only holds activations); "
                         "use symmetric=True (Q8_0)")
    return "q8_0" if bits == 8 else "q4_0" if symmetric else "q4_1"


def grid(groups: Tensor, bits: int, symmetric: bool = True, gguf: bool = False) -> tuple[Tensor, Tensor | None]:
    """The quantization grid of each group (last axis of ``groups``, float): ``(scales, offsets)``, fp16
    scales and per-group offsets with the shapes of ``groups`` minus its last axis: ``None`` when ``symmetric``,
    else int8 zero codes, or fp16 mins on the GGUF Q4_1 grid."""
    kind = gguf_type(bits, symmetric) if gguf else None
    if kind == "q4_0":
        extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        scales = extreme / -8
        return torch.where(scales.abs() < _FP16_TINY, torch.full_like(scales, _FP16_TINY), scales).half(), None
    if kind == "q4_1":
        low = groups.amin(dim=-1)
        return ((groups.amax(dim=-1) - low) / 15).clamp(min=_FP16_TINY).half(), low.half()
    check_bits(bits)
    if symmetric:
        return (groups.abs().amax(dim=-1) / qmax(bits)).clamp(min=_FP16_TINY).half(), None
    low, high = groups.amin(dim=-1).clamp(max=0), groups.amax(dim=-1).clamp(min=0)
    scales = ((high - low) / (2 ** bits - 1)).clamp(min=_FP16_TINY).half()
    zeros = torch.round(-low / scales.float()).clamp(0, 2 ** bits - 1) - 2 ** (bits - 1)
    return scales, zeros.to(torch.int8)


def round_to_grid(values: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, gguf: bool = False) -> Tensor:
    """Nearest codes of ``values`` on the grid ``(scales, zeros)`` (broadcast against ``values``), as floats."""
    if zeros is None:
        low = -(2 ** (bits - 1)) if gguf and bits == 4 else -qmax(bits)  # Q4_0 uses code -8 too
        return torch.round(values / scales.float()).clamp(low, qmax(bits))
    if gguf:
        return torch.round((values - zeros.float()) / scales.float()).clamp(0, 15) - 8
    return (torch.round(values / scales.float()) + zeros.float()).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def grid_values(codes: Tensor, scales: Tensor, zeros: Tensor | None, gguf: bool = False) -> Tensor:
    """Float32 values of float ``codes`` on the grid ``(scales, zeros)`` (broadcast): ``scale * (c - z)``, or
    on GGUF's Q4_1 grid ``scale * (c + 8) + min`` in llama.cpp's order of operations (bit-identical to it)."""
    if zeros is None:
        return codes * scales.float()
    if gguf:
        return (codes + 8) * scales.float() + zeros.float()
    return (codes - zeros.float()) * scales.float()


def quantize(weight: Tensor, bits: int, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest quantization of a 2-D tensor along its rows: ``(codes, scales)``, int8 codes
    with ``weight``'s shape and fp16 scales of shape ``rows x groups`` (see :func:`quantize_grid`)."""
    codes, scales, _ = quantize_grid(weight, bits, group_size, symmetric=True)
    return codes, scales


def quantize_grid(weight: Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                  gguf: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest quantization of a 2-D tensor along its rows on a symmetric, zero-point or GGUF grid:
    ``(codes, scales, offsets)``; scales and offsets (see :func:`grid`) are ``rows x groups``."""
    rows, cols = weight.shape
    grouped = _grouped(weight.detach().float(), group_size)
    if gguf:
        codes, scales, zeros = llama_rounding(grouped, gguf_type(bits, symmetric))
    else:
        scales, zeros = grid(grouped, bits, symmetric)
        codes = round_to_grid(grouped, scales[..., None], None if zeros is None else zeros[..., None], bits)
    return codes.reshape(rows, -1)[:, :cols].to(torch.int8), scales, zeros


def llama_rounding(groups: Tensor, kind: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """llama.cpp's own round-to-nearest onto a GGUF grid (``ggml-quants.c``'s reference quantizers, which
    gguf-py reproduces), so a ``grid: gguf`` layer rounded to nearest holds the very codes llama.cpp would
    write: codes from the float32 scale (not its fp16 rounding), ties rounded as llama.cpp rounds them
    (Q8_0 away from zero, Q4_0 / Q4_1 up). Returns ``(codes, fp16 scales, fp16 mins or None)``."""
    if kind == "q8_0":
        scales = groups.abs().amax(dim=-1) / 127
    elif kind == "q4_0":
        scales = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1) / -8
    else:
        low = groups.amin(dim=-1)
        scales = (groups.amax(dim=-1) - low) / 15
    inverse = torch.where(scales == 0, torch.zeros_like(scales), 1 / scales)[..., None]
    if kind == "q8_0":
        scaled = groups * inverse
        magnitude = scaled.abs()
        return torch.sign(scaled) * (magnitude.floor() + (2 * (magnitude - magnitude.floor())).floor()), \
            scales.half(), None
    if kind == "q4_0":
        return torch.trunc(groups * inverse + 8.5).clamp(0, 15) - 8, scales.half(), None
    return torch.trunc((groups - low[..., None]) * inverse + 0.5).clamp(0, 15) - 8, scales.half(), low.half()


def dequantize(codes: Tensor, scales: Tensor, group_size: int | None = None, zeros: Tensor | None = None,
               gguf: bool = False) -> Tensor:
    """Float32 values of ``codes`` (:func:`grid_values`) with the group layout of :func:`quantize_grid`."""
    rows, cols = codes.shape
    grouped = grid_values(_grouped(codes.float(), group_size), scales[..., None],
                          None if zeros is None else zeros[..., None], gguf)
    return grouped.reshape(rows, -1)[:, :cols]


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes occupy once packed."""
    return numel if check_bits(bits) == 8 else (numel + 1) // 2


def pack(codes: Tensor, bits: int) -> Tensor:
    """Flatten int8 codes into a ``uint8`` byte buffer (int4: two per byte, odd lengths padded by one 0)."""
    flat = codes.reshape(-1).to(torch.int8)
    if check_bits(bits) == 8:
        return flat.view(torch.uint8).clone()
    if flat.numel() and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 packing needs codes in [-8, 7]")
    nibbles = (flat.to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])
    pairs = nibbles.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack(packed: Tensor, bits: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack`: int8 codes of ``shape``."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != packed_numel(numel, bits):
        raise ValueError(
            f"packed buffer holds {packed.numel()} {packed.dtype} bytes; {numel} int{bits} codes need "
            f"{packed_numel(numel, bits)} uint8 bytes"
        )
    if bits == 8:
        return packed.view(torch.int8).reshape(shape)
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)[:numel]
    return (nibbles.to(torch.int16) - 8).to(torch.int8).reshape(shape)


def is_ternary_int8(tensor: Tensor) -> bool:
    """int8 with every entry in {-1, 0, 1} (at least 4 of them): saved files store it at 2 bits per entry."""
    return tensor.dtype == torch.int8 and tensor.numel() >= 4 and bool((tensor.abs() <= 1).all())


def stored_nbytes(tensor: Tensor) -> int:
    """Bytes ``tensor`` takes in a saved file: a quarter byte per entry if :func:`is_ternary_int8`, else raw."""
    return (tensor.numel() + 3) // 4 if is_ternary_int8(tensor) else tensor.numel() * tensor.element_size()


def pack_ternary(values: Tensor) -> Tensor:
    """Entries in {-1, 0, 1} (any dtype) -> ``uint8`` bytes holding four 2-bit codes each (padded with zeros)."""
    flat = values.reshape(-1).to(torch.int16) + 1
    if flat.numel() and (flat.min() < 0 or flat.max() > 2):
        raise ValueError("ternary packing needs entries in {-1, 0, 1}")
    flat = torch.cat([flat, flat.new_ones((-flat.numel()) % 4)]).to(torch.uint8).reshape(-1, 4)
    return flat[:, 0] | (flat[:, 1] << 2) | (flat[:, 2] << 4) | (flat[:, 3] << 6)


def unpack_ternary(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_ternary`: int8 entries in {-1, 0, 1} of ``shape``."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 3) // 4:
        raise ValueError(f"packed buffer holds {packed.numel()} {packed.dtype} bytes; {numel} ternary entries need "
                         f"{(numel + 3) // 4} uint8 bytes")
    codes = torch.stack([(packed >> shift) & 0b11 for shift in (0, 2, 4, 6)], dim=-1).reshape(-1)[:numel]
    return (codes.to(torch.int8) - 1).reshape(shape)
