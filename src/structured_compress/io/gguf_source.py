"""The quantized blocks of a model's GGUF source file, kept unchanged for the tensors no codec changed.

A model loaded from a GGUF K-quant file (llama.cpp's Q4_K_M, say) is that file dequantized: its embedding and
the layers a codec leaves alone already lie on llama.cpp's grids, and the file's own blocks store them exactly
in fewer bytes than any re-quantization. With ``storage.source_gguf`` a save writes those blocks as they are
(codec ``gguf``: the raw bytes and their ``ggml_type``), but only for a tensor whose blocks decode to exactly
the values the model holds -- a tensor the run changed, or one transformers rearranged on loading, falls back
to the policy. Decoding uses ``gguf``'s own dequantizers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserInputError

log = logging.getLogger(__name__)

# ggml types that hold floats as they are: nothing to keep (the storage dtype already applies)
_PLAIN_TYPES = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise UserInputError("tensors stored as GGUF blocks need the `gguf` package: pip install gguf==0.19.0 "
                             "(it is in the project's `offline` extra)") from err
    return gguf


def block_bytes(ggml_type: str, shape: list[int]) -> int:
    """Bytes the blocks of a tensor of ``shape`` take in ``ggml_type`` (rows run along the last HF axis)."""
    gguf = _gguf()
    kind = ggml_type_of(ggml_type)
    size, type_size = gguf.GGML_QUANT_SIZES[kind]
    if not shape or shape[-1] % size:
        raise ValueError(f"{ggml_type} blocks hold {size} entries: a row of {shape[-1] if shape else 0} does not split")
    return math.prod(shape) // size * type_size


def ggml_type_of(name: str):
    """The ``gguf.GGMLQuantizationType`` called ``name`` (e.g. ``"Q6_K"``), or a ValueError listing them."""
    gguf = _gguf()
    try:
        return gguf.GGMLQuantizationType[name]
    except KeyError:
        raise ValueError(f"unknown GGML type {name!r}; one of {[t.name for t in gguf.GGMLQuantizationType]}") \
            from None


def decode_blocks(raw: Tensor, ggml_type: str, shape: list[int], dtype: torch.dtype) -> Tensor:
    """The tensor that the GGUF blocks ``raw`` (uint8) of type ``ggml_type`` hold, as ``shape`` in ``dtype``."""
    gguf = _gguf()
    values = gguf.quants.dequantize(raw.numpy().reshape(-1, block_bytes(ggml_type, [shape[-1]])),
                                    ggml_type_of(ggml_type))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape).to(dtype)


@dataclass(frozen=True)
class SourceBlocks:
    """The quantized tensors of one GGUF file, by the model's state-dict key."""

    path: Path
    blocks: dict[str, tuple[str, np.ndarray]]  # key -> (ggml type name, raw uint8 bytes, memory-mapped)

    def matching(self, key: str, shape: list[int], chunks: Iterable[Tensor]) -> tuple[str, Tensor] | None:
        """``(ggml type, raw bytes)`` of ``key`` when the file holds it quantized and its blocks decode to
        exactly the tensor of ``shape`` whose consecutive row chunks ``chunks`` gives (compared in float32
        chunk by chunk: neither the tensor nor its decoded copy is ever needed whole); else None."""
        found = self.blocks.get(key)
        if found is None or not shape:
            return None
        ggml_type, raw = found
        if raw.size != block_bytes(ggml_type, shape):
            return None
        stored = torch.from_numpy(np.array(raw, dtype=np.uint8))
        row_bytes, offset = block_bytes(ggml_type, [shape[-1]]), 0
        for chunk in chunks:
            rows = chunk.reshape(-1, shape[-1])
            decoded = decode_blocks(stored[offset:offset + len(rows) * row_bytes], ggml_type, list(rows.shape),
                                    torch.float32)
            offset += len(rows) * row_bytes
            if not torch.equal(decoded, rows.detach().float()):
                log.info("%s: the source's %s blocks do not decode to the model's tensor; stored by the policy",
                         key, ggml_type)
                return None
        return ggml_type, stored


def source_gguf_file(spec: str) -> Path:
    """The GGUF file a ``storage.source_gguf`` value names: a path, or ``gguf-package:<module>`` (the file
    the package ships, assembled once into the cache)."""
    from ..sources import GGUF_PREFIX, gguf_package_file

    if spec.startswith(GGUF_PREFIX):
        return gguf_package_file(spec[len(GGUF_PREFIX):])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserInputError(f"storage.source_gguf: {path} is not a file; give the GGUF file the model was loaded "
                             "from, or gguf-package:<module>")
    return path


def read_source_blocks(model: nn.Module, spec: str) -> SourceBlocks:
    """The quantized tensors of the GGUF file ``spec`` names, keyed by ``model``'s state-dict names
    (transformers' own GGUF -> HF name map for the model's architecture)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    gguf = _gguf()
    path = source_gguf_file(spec)
    config = getattr(model, "config", None)
    if config is None:
        raise UserInputError("storage.source_gguf needs a transformers model (its config names the architecture)")
    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(model, processor)
    blocks = {names[t.name]: (t.tensor_type.name, t.data.reshape(-1).view(np.uint8)) for t in reader.tensors
              if t.name in names and t.tensor_type.name not in _PLAIN_TYPES}
    if not blocks:
        log.warning("storage.source_gguf: %s holds no quantized tensor of this model", path)
    return SourceBlocks(path, blocks)
