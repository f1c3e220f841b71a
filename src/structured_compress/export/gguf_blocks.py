"""Weights as GGUF tensor data: llama.cpp blocks built straight from an svdq layer's codes (no rounding added),
or a float weight encoded to a chosen type with ``gguf``'s own quantizers; and the decoding that checks both.

Block layouts (32 weights each, as ``gguf.quants`` reads them): Q8_0 = fp16 scale + 32 int8 codes; Q4_0 = fp16
scale + 16 bytes holding ``code + 8`` (weight ``j`` in the low nibble of byte ``j``, weight ``j + 16`` in its high
nibble); Q4_1 = fp16 scale + fp16 min + the same 16 bytes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..io.gguf_source import ggml_type_of
from ..layers.quant import GGUF_BLOCK, gguf_type
from ..layers.svdq import SVDQuantLinear
from .config import FLOAT_TYPES


def qtype(name: str):
    """The ``GGMLQuantizationType`` of a lower-case type name (``q4_0``)."""
    return ggml_type_of(name.upper())


def exact_type(layer: SVDQuantLinear) -> str | None:
    """The GGUF type that stores ``layer``'s codes as they are, or None: a whole quantized matrix (``qdense``) in
    groups of 32 whose grid is a llama.cpp block grid. The symmetric int8 grid is Q8_0 and the symmetric int4 one
    (codes in [-7, 7]) fits Q4_0; the project's integer zero-point grid has no GGUF twin."""
    if layer.mode != "qdense" or layer.group_size != GGUF_BLOCK or layer.in_features % GGUF_BLOCK:
        return None
    if layer.symmetric or layer.gguf:
        return gguf_type(layer.bits, layer.symmetric)
    return None


def layer_blocks(layer: SVDQuantLinear, kind: str) -> np.ndarray:
    """``out_features x bytes`` uint8 blocks of ``layer``'s stored codes in type ``kind`` (see :func:`exact_type`)."""
    codes, scales, offsets = layer.quantized("w")
    rows, groups = scales.shape
    grouped = codes.reshape(rows, groups, GGUF_BLOCK)
    head = [_bytes(scales)]
    if kind == "q8_0":
        body = grouped.numpy().view(np.uint8)
    else:
        nibbles = (grouped.to(torch.int16) + 8).to(torch.uint8)
        body = (nibbles[..., :GGUF_BLOCK // 2] | (nibbles[..., GGUF_BLOCK // 2:] << 4)).numpy()
        if kind == "q4_1":
            head.append(_bytes(offsets))
    return np.concatenate(head + [body], axis=-1).reshape(rows, -1)


def _bytes(half: Tensor) -> np.ndarray:
    """``rows x groups`` fp16 values as ``rows x groups x 2`` little-endian bytes."""
    return half.to(torch.float16).numpy().view(np.uint8).reshape(*half.shape, 2)


def encode(weight: np.ndarray, kind: str) -> np.ndarray:
    """``weight`` (float32) encoded as type ``kind`` by gguf-py's quantizers (llama.cpp's rounding)."""
    from gguf.quants import quantize

    return quantize(np.ascontiguousarray(weight, dtype=np.float32), qtype(kind))


def decode(data: np.ndarray, kind: str) -> np.ndarray:
    """The float32 weight that ``data`` of type ``kind`` holds, by gguf-py's dequantizers (what readers see)."""
    from gguf.quants import dequantize

    return dequantize(data, qtype(kind)).astype(np.float32, copy=False)


def fits(shape: tuple[int, ...], kind: str) -> bool:
    """Whether a tensor of ``shape`` can be stored as ``kind`` (block types need rows of whole blocks)."""
    import gguf

    return kind in FLOAT_TYPES or shape[-1] % gguf.GGML_QUANT_SIZES[qtype(kind)][0] == 0
