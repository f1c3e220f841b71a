"""Standard quantizers as baseline codecs for ``whole_file.py``: HQQ, optimum-quanto and llama.cpp's GGUF block
formats (through the ``gguf`` package), run on the same layers, evaluation and storage policy as the project's
codecs so that their rows compare byte for byte.

Each baseline quantizes the ``[out, in]`` weight of every selected layer (``dense_view``: linears, HF Conv1D,
Conv2d as ``out x in*kh*kw``) with the library's own quantizer and returns the dequantized weight and the bytes
of the library's packed tensors. HQQ and quanto quantize the fp16 weight (their scales and zeros are then fp16,
as for an fp16 checkpoint); GGUF formats quantize the fp32 weight into their blocks (fp16 scales inside).

Bytes (``save_reload``): the model with the dequantized weights is saved under the storage policy by the
project's ``save_compressed``; the folder's bytes minus the file bytes of the quantized weights, plus the
library's packed bytes, is ``bytes_on_disk``. So embeddings, norms, biases, headers and manifest are stored and
counted exactly as for the project's codecs; ``replaced_bytes`` is the packed bytes plus the replaced layers'
stored biases. A layer whose row length the format cannot hold (a GGUF block of 32, an HQQ group) is left as
the storage policy stores it and counted in ``rest``; the row names it in ``baseline_float_layers``.

Install the libraries with ``make install EXTRAS=baselines``; ``gguf`` comes with the ``offline`` extra.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import pathlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from structured_compress.io import folder_sizes, load_compressed, read_manifest, save_compressed
from structured_compress.io.gguf_source import decode_blocks, read_source_blocks
from structured_compress.io.sizes import ratio, stored_tensor_bytes
from structured_compress.io.storage import stored_layout
from structured_compress.modeltree import dense_view, select_layers

Quantizer = Callable[[str, Tensor], tuple[Tensor, int]]  # (layer name, [out, in] fp32) -> (dequantized, bytes)


@dataclass(frozen=True)
class Baseline:
    """A library's quantizer: ``module`` is what must import, ``distribution`` the package whose version a row
    records, ``fits`` whether a ``[out, in]`` weight has a row length the format can hold."""

    distribution: str
    module: str
    make: Callable[..., Quantizer]  # called with the bench's GGUF source file and the model (gguf-source)
    fits: Callable[[Tensor], bool]


def _row_multiple(size: int) -> Callable[[Tensor], bool]:
    return lambda weight: weight.shape[1] % size == 0


def hqq(bits: int, group: int) -> Baseline:
    """HQQ's ``HQQLinear`` with ``BaseQuantizeConfig(nbits, group_size)``: codes, fp16 scale and zero per group."""
    def quantize(name: str, weight: Tensor) -> tuple[Tensor, int]:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float16)
        linear.weight.data = weight.half()
        layer = HQQLinear(linear, BaseQuantizeConfig(nbits=bits, group_size=group), compute_dtype=torch.float16,
                          device="cpu", initialize=True)
        packed = layer.W_q.nbytes + layer.meta["scale"].nbytes + layer.meta["zero"].nbytes
        return layer.dequantize().float().reshape(weight.shape), packed

    return Baseline("hqq", "hqq", lambda source, model: quantize, _row_multiple(group))


def quanto(qtype: str) -> Baseline:
    """optimum-quanto's ``quantize`` + ``freeze`` of an ``nn.Linear`` (its default groups and optimizer): the
    bytes are those of the frozen weight's inner tensors (codes, scales, shifts)."""
    def quantize(name: str, weight: Tensor) -> tuple[Tensor, int]:
        import optimum.quanto as q

        wrapper = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float16))
        wrapper[0].weight.data = weight.half()
        q.quantize(wrapper, weights=getattr(q, qtype))
        q.freeze(wrapper)
        qweight = wrapper[0].weight
        return qweight.dequantize().float().reshape(weight.shape), _inner_bytes(qweight)

    return Baseline("optimum-quanto", "optimum.quanto", lambda source, model: quantize, lambda w: True)


def _inner_bytes(tensor: Tensor) -> int:
    """Bytes of a tensor subclass's stored tensors (recursively through nested subclasses)."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return tensor.nbytes
    names, _ = tensor.__tensor_flatten__()
    return sum(_inner_bytes(getattr(tensor, name)) for name in names)


def gguf_format(kind: str) -> Baseline:
    """llama.cpp's block format ``kind`` (Q8_0, Q5_0, ...) by ``gguf.quants.quantize``: the bytes are the blocks'."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType[kind]

    def quantize(name: str, weight: Tensor) -> tuple[Tensor, int]:
        from gguf import quants

        blocks = quants.quantize(weight.numpy(), qtype)
        return torch.from_numpy(quants.dequantize(blocks, qtype)).reshape(weight.shape), blocks.nbytes

    return Baseline("gguf", "gguf", lambda source, model: quantize, _row_multiple(GGML_QUANT_SIZES[qtype][0]))


def gguf_source() -> Baseline:
    """The source GGUF file's own blocks (e.g. its K-quants) for each layer: the model as the file holds it
    (tensor names mapped as ``storage.source_gguf`` maps them: transformers' GGUF name map)."""
    def make(source: Path | None, model: nn.Module) -> Quantizer:
        if source is None:
            raise ValueError("gguf-source needs a model loaded from a GGUF file (--model gemma)")
        blocks = read_source_blocks(model, str(source)).blocks

        def quantize(name: str, weight: Tensor) -> tuple[Tensor, int]:
            ggml_type, raw = blocks[f"{name}.weight"]
            stored = torch.from_numpy(np.array(raw, dtype=np.uint8))
            return decode_blocks(stored, ggml_type, list(weight.shape), torch.float32), raw.size

        return quantize

    return Baseline("gguf", "gguf", make, lambda w: True)


BASELINES = {
    **{f"hqq-int{bits}-g{group}": hqq(bits, group) for bits, group in ((8, 64), (4, 64), (4, 128), (3, 64), (2, 32))},
    "quanto-qint8": quanto("qint8"),
    "quanto-qint4": quanto("qint4"),
    **{f"gguf-{kind.lower()}": gguf_format(kind) for kind in ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")},
    "gguf-source": gguf_source(),
}
SOURCE_FILE = "gguf-file"  # not a codec: the source GGUF file as it is (whole_file.py writes it before gguf-source)


def available(name: str) -> bool:
    """Whether the library of baseline ``name`` imports; if not, says so on stderr (its rows are skipped)."""
    baseline = BASELINES[name]
    if importlib.util.find_spec(baseline.module.split(".")[0]) is not None and \
            importlib.util.find_spec(baseline.module) is not None:
        return True
    print(f"note: skipped {name}: {baseline.distribution} is not installed (make install EXTRAS=baselines)",
          file=sys.stderr)
    return False


def library(name: str) -> dict:
    """The row fields naming baseline ``name``'s library and its installed version."""
    distribution = BASELINES[name].distribution
    return {"library": distribution, "library_version": importlib.metadata.version(distribution)}


@dataclass
class Quantized:
    """What a baseline made of a model: the dequantized weight and packed bytes per layer, the layers left float."""

    weights: dict[str, Tensor]
    packed: dict[str, int]
    left_float: list[str]


def quantize_model(model: nn.Module, include: list[str], name: str, source: Path | None = None) -> Quantized:
    """Quantize every selected layer of ``model`` with baseline ``name`` and put the dequantized weights in
    place (the model then computes as the library's quantized weights do)."""
    baseline = BASELINES[name]
    quantize = baseline.make(source, model)
    result = Quantized({}, {}, [])
    with torch.no_grad():
        for layer, module in select_layers(model, include).items():
            weight = dense_view(module)[1]
            if not baseline.fits(weight):
                result.left_float.append(layer)
                continue
            values, packed = quantize(layer, weight.detach().float().contiguous())
            weight.copy_(values)
            result.weights[layer], result.packed[layer] = values, packed
    return result


def baseline_sizes(folder: Path, model: nn.Module, quantized: Quantized) -> dict:
    """``folder_sizes`` of a saved baseline model with the quantized weights' stored bytes swapped for the
    library's packed bytes (module docstring). Dense references are unchanged; the rest's fp16 reference is
    the folder's minus the quantized layers' (embeddings hold only floating tensors)."""
    sizes = folder_sizes(folder)
    tensors, stored = read_manifest(folder)["tensors"], stored_tensor_bytes(folder)

    def on_disk(key: str) -> int:
        return sum(stored[k] for k in stored_layout(key, tensors[key])) if key in tensors else 0

    weights = sum(on_disk(f"{layer}.weight") for layer in quantized.packed)
    biases = sum(on_disk(f"{layer}.bias") for layer in quantized.packed)
    packed = sum(quantized.packed.values())
    total = sizes["bytes_on_disk"] - weights + packed
    layers = [model.get_submodule(layer) for layer in quantized.packed]
    replaced16 = sum(2 * (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)) for m in layers)
    floats = (sizes["dense_fp32_bytes"] - sizes["dense_fp16_bytes"]) // 2 - sizes["embeddings_fp32_bytes"] // 4
    rest16 = sizes["rest_fp32_bytes"] - 2 * floats - replaced16
    rest = sizes["rest_bytes"] - weights - biases
    keep = ("dense_fp32_bytes", "dense_fp16_bytes", "embeddings_bytes", "embeddings_ratio_vs_fp16",
            "metadata_bytes", "header_bytes", "storage")
    return {**{key: sizes[key] for key in keep}, "bytes_on_disk": total,
            "ratio_vs_fp32": ratio(sizes["dense_fp32_bytes"], total),
            "ratio_vs_fp16": ratio(sizes["dense_fp16_bytes"], total), "replaced_bytes": packed + biases,
            "replaced_ratio_vs_fp16": ratio(replaced16, packed + biases), "rest_bytes": rest,
            "rest_ratio_vs_fp16": ratio(rest16, rest)}


def save_reload(model: nn.Module, quantized: Quantized, skeleton: Callable[[], nn.Module], storage=None,
                calibration=None) -> tuple[nn.Module, dict]:
    """Save ``model`` under ``storage``, reload it into ``skeleton()`` and put the baseline's exact dequantized
    weights back (the storage policy must not round them again); returns ``(restored, baseline_sizes)``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_compressed(model, pathlib.Path(tmp) / "model", storage=storage, calibration=calibration)
        sizes = baseline_sizes(folder, model, quantized)
        restored = load_compressed(folder, skeleton()).eval()
    with torch.no_grad():
        for layer, values in quantized.weights.items():
            dense_view(restored.get_submodule(layer))[1].copy_(values)
    return restored, sizes


def packed_bits_per_weight(quantized: Quantized, model: nn.Module) -> float:
    """Packed bits per quantized weight over all the layers the baseline quantized."""
    numel = sum(dense_view(model.get_submodule(layer))[1].numel() for layer in quantized.packed)
    return round(8 * sum(quantized.packed.values()) / numel, 4) if numel else math.nan
