"""How each tensor of a saved model is stored: the storage policy and the per-tensor codecs.

Integer tensors inside structured layers are stored as their layer holds them (int8 tensors with entries in
{-1, 0, 1}, e.g. ternary SVD factors, packed four per byte); their floating tensors (factors, blocks, biases) are
cast to the storage dtype, except the few a layer lists in ``exact_tensors`` (Gaudi widths and locations, the
scales whose rounding would break a verified error). Every other floating tensor follows the
:class:`StoragePolicy`: cast to the chosen dtype (``cast``), or quantized to int8/int4 codes with fp16 scales
(and int8 zero codes on a zero-point grid) per row or per group (``int8`` / ``int4``): embeddings and LM heads
by ``embeddings``, other tensors of two or more dimensions (unreplaced convs and linears) by ``rest``; or, with
``source_gguf``, kept as the blocks of the GGUF file the model came from (``gguf``, see ``gguf_source``). An
output embedding (LM head, tied or not) can be GPTQ-rounded against the Gram matrix of its inputs, so its
rows are rounded to keep the logits right rather than each weight. Loading decodes each tensor back to the
dtype the model held it in. ``decode(encode(x))`` is the loaded value, and saving writes that value
back into the model, so the model in memory is exactly the one on disk.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn

from ..layers.gptq import gptq_quantize
from ..typed_config import OptionError, TypedConfig, option
from .gguf_source import block_bytes, decode_blocks
from ..layers.quant import dequantize, is_ternary_int8, num_groups, pack, pack_ternary, packed_numel, \
    quantize_grid, unpack, unpack_ternary

CODECS = ("raw", "cast", "ternary2", "int8", "int4", "gguf")
SCALES_SUFFIX = "#scales"  # file key of an int8/int4 tensor's scales ('#' never occurs in a state-dict key)
ZEROS_SUFFIX = "#zeros"  # file key of an int8/int4 tensor's zero codes (zero-point grid)
DTYPE_NAMES = {"fp16": "float16", "float16": "float16", "half": "float16", "bf16": "bfloat16",
               "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32", "float": "float32"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any, field: str) -> torch.dtype:
    """The torch dtype a manifest names (e.g. ``"float16"``), or a ValueError naming ``field``."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{field}: {name!r} is not a torch dtype name")
    return dtype


@dataclass
class StoragePolicy(TypedConfig):
    """How tensors that no structured layer owns are stored (``mode.storage``; each field checked when built)."""

    dtype: Literal["fp16", "float16", "half", "bf16", "bfloat16", "fp32", "float32", "float"] | None = option(
        None, "every floating tensor (structured layers' factors included, their exact_tensors aside); null = the "
        "model's own dtype when it is half precision, else fp16")
    embeddings: Literal["none", "int8", "int4"] = option(
        "none", "every nn.Embedding and the output embedding (LM head, tied or not): stored like the rest, or "
        "quantized with fp16 scales")
    group_size: int | None = option(None, "entries per scale along each embedding row (null = one per row)", ge=1)
    zero_point: bool = option(False, "quantize on the zero-point grid (all 2^B levels over [min, 0, max], an int8 "
                              "zero code per group) instead of the symmetric one")
    embeddings_rounding: Literal["nearest", "gptq"] = option(
        "nearest", "gptq: the output embedding rounded against the Gram matrix of the LM head's inputs (input-only "
        "embeddings are looked up row by row, so nearest is already their best)")
    rest: Literal["none", "int8"] = option(
        "none", "every other floating tensor of two or more dimensions (depthwise convs, linears no codec "
        "replaced): int8 with one scale per output channel")
    source_gguf: str | None = option(
        None, "the GGUF file the model was loaded from (a path or gguf-package:<module>): every tensor no codec "
        "changed that the file holds quantized keeps the file's own blocks, unchanged and exact (before the "
        "embeddings and rest choices)")

    @classmethod
    def from_config(cls, config: "StoragePolicy | Mapping | None") -> "StoragePolicy":
        """A policy from ``None``, a policy, or a dict such as ``{"dtype": "fp16", "embeddings": "int8"}``."""
        if config is None or isinstance(config, StoragePolicy):
            return config or cls()
        if not isinstance(config, Mapping):
            raise OptionError("storage", config, f"must be a mapping with keys {', '.join(cls.keys())}",
                              "e.g. {dtype: fp16, embeddings: int8}")
        cls.check_keys(config, cls.keys(), "storage")
        return cls(**config)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def describe(self) -> dict[str, Any]:
        """The policy's fields as the manifest records them (``dtype`` aside: the manifest has the resolved one)."""
        return {key: value for key, value in asdict(self).items() if key != "dtype"}

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype floating tensors outside structured layers are written in."""
        if self.dtype is not None:
            return getattr(torch, DTYPE_NAMES[self.dtype])
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def model_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype:
    """The floating dtype holding most numbers among ``tensors`` (float32 when there is none)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def embedding_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every ``nn.Embedding`` weight and of the output embedding (an ``nn.Linear`` LM head
    that ``get_output_embeddings`` returns), in module order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or (module is head and isinstance(module, nn.Linear)):
            keys.append(f"{name}.weight" if name else "weight")
    return keys


def choose_codec(tensor: Tensor, in_layer: bool, embedding: bool, policy: StoragePolicy,
                 dtype: torch.dtype, gram: Tensor | None = None, exact: bool = False) -> dict[str, Any]:
    """The table entry (codec and its options) a tensor is stored with; ``dtype`` is the storage dtype,
    ``gram`` the Gram matrix of an output embedding's inputs (GPTQ rounding when the policy asks for it) and
    ``exact`` marks a layer's ``exact_tensors``. A structured layer's other floating tensors (factors, blocks,
    bias) take the storage dtype but are never quantized again."""
    entry = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
    if exact or not tensor.is_floating_point():
        return {**entry, "codec": "ternary2" if is_ternary_int8(tensor) else "raw"}
    if in_layer:
        return {**entry, "codec": "raw"} if tensor.dtype == dtype else \
            {**entry, "codec": "cast", "stored_dtype": dtype_name(dtype)}
    quantized = {**entry, "zero_point": policy.zero_point, "rounding": "nearest"}
    if embedding and policy.embeddings != "none" and tensor.dim() == 2:
        gptq = policy.embeddings_rounding == "gptq" and gram is not None
        return {**quantized, "codec": policy.embeddings, "group_size": policy.group_size,
                "rounding": "gptq" if gptq else "nearest"}
    if not embedding and policy.rest != "none" and tensor.dim() >= 2 and tensor.numel():
        return {**quantized, "codec": policy.rest, "group_size": None}
    if tensor.dtype == dtype:
        return {**entry, "codec": "raw"}
    return {**entry, "codec": "cast", "stored_dtype": dtype_name(dtype)}


def refuse_overflow(key: str, tensor: Tensor, stored: Tensor, remedy: str) -> None:
    """A ``ValueError`` naming ``key`` and ``remedy`` when a finite value of ``tensor`` became infinite in its
    cast ``stored``; checked in chunks, so no temporary as large as the tensor is made (an LLM's embedding is
    the largest tensor saved or read)."""
    chunk = 1 << 22
    if any(bool((cast.isinf() & value.isfinite()).any())
           for value, cast in zip(tensor.reshape(-1).split(chunk), stored.reshape(-1).split(chunk))):
        raise ValueError(f"tensor {key!r} has values beyond {dtype_name(stored.dtype)}'s range (max |x| = "
                         f"{tensor.abs().max().item():.4g}); {remedy}")


SAVE_WIDER = "save with storage.dtype=bf16 or fp32"


def encode(key: str, tensor: Tensor, entry: Mapping[str, Any], gram: Tensor | None = None) -> dict[str, Tensor]:
    """The file tensors that store ``tensor`` (a CPU tensor) under ``entry``'s codec (``gram``: the Gram matrix
    of its inputs, for ``rounding: gptq``)."""
    codec = entry["codec"]
    if codec == "raw":
        return {key: tensor}
    if codec == "ternary2":
        return {key: pack_ternary(tensor)}
    if codec == "gguf":
        raise ValueError(f"tensor {key!r}: GGUF blocks are copied from the source file, never encoded")
    if codec == "cast":
        stored = tensor.to(getattr(torch, entry["stored_dtype"]))
        refuse_overflow(key, tensor, stored, SAVE_WIDER)
        return {key: stored}
    bits, symmetric = int(codec[3:]), not entry.get("zero_point", False)
    rows = tensor.reshape(tensor.shape[0], -1)
    if entry.get("rounding") == "gptq":
        if gram is None:
            raise ValueError(f"tensor {key!r}: GPTQ rounding needs the Gram matrix of its inputs")
        codes, scales, zeros = gptq_quantize(rows, gram.to(rows.device), bits, entry["group_size"], symmetric)
    else:
        codes, scales, zeros = quantize_grid(rows, bits, entry["group_size"], symmetric)
    files = {key: pack(codes, bits), key + SCALES_SUFFIX: scales}
    return files if zeros is None else {**files, key + ZEROS_SUFFIX: zeros}


def stored_layout(key: str, entry: Mapping[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """``{file key: (dtype name, shape)}`` that ``encode`` writes for a tensor described by ``entry``."""
    shape, codec = list(entry["shape"]), entry["codec"]
    if codec == "raw":
        return {key: (entry["dtype"], shape)}
    if codec == "cast":
        return {key: (entry["stored_dtype"], shape)}
    if codec == "ternary2":
        return {key: ("uint8", [(math.prod(shape) + 3) // 4])}
    if codec == "gguf":
        return {key: ("uint8", [block_bytes(entry["ggml_type"], shape)])}
    bits, groups = int(codec[3:]), [shape[0], num_groups(math.prod(shape[1:]), entry["group_size"])]
    layout = {key: ("uint8", [packed_numel(math.prod(shape), bits)]), key + SCALES_SUFFIX: ("float16", groups)}
    return {**layout, key + ZEROS_SUFFIX: ("int8", groups)} if entry.get("zero_point") else layout


def decode(key: str, entry: Mapping[str, Any], stored: Mapping[str, Tensor]) -> Tensor:
    """The tensor as the model held it, from the file tensors ``stored_layout`` describes."""
    codec, shape, dtype = entry["codec"], tuple(entry["shape"]), getattr(torch, entry["dtype"])
    if codec == "raw":
        return stored[key]
    if codec == "cast":
        return stored[key].to(dtype)
    if codec == "ternary2":
        return unpack_ternary(stored[key], shape)
    if codec == "gguf":
        return decode_blocks(stored[key], entry["ggml_type"], list(shape), dtype)
    bits, rows = int(codec[3:]), (shape[0], math.prod(shape[1:]))
    codes = unpack(stored[key], bits, rows)
    zeros = stored[key + ZEROS_SUFFIX] if entry.get("zero_point") else None
    return dequantize(codes, stored[key + SCALES_SUFFIX], entry["group_size"], zeros).reshape(shape).to(dtype)
