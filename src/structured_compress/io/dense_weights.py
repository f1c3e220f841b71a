"""A dense checkpoint read on demand, tensor by tensor: what lets a model larger than memory be compressed
block by block (``sequential.compress_sequential``) from a skeleton on the meta device.

Reads safetensors: one file, or a folder with ``model.safetensors`` or shards and their
``model.safetensors.index.json`` (a Hugging Face folder). Each tensor is read in the checkpoint's own dtype
and cast to the dtype of the skeleton's tensor it fills, so at most one block is ever held in full precision.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Iterator

import safetensors
import torch
from torch import nn

from ..errors import UserInputError
from .storage import refuse_overflow

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


CHUNK_BYTES = 64 << 20


LOAD_WIDER = "give the model a wider dtype (float32 or bfloat16)"


def _row_chunks(file: Path, key: str, itemsize: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, rows)`` of tensor ``key`` of ``file``, about ``CHUNK_BYTES`` at ``itemsize`` bytes per
    entry each, the file opened per chunk. safetensors reads through a mapping of the whole file whose touched
    pages count as the process's memory until it is closed, and ``get_tensor`` returns views of it; reading a 7B
    model's embedding in one piece would hold it twice, more so when it is cast."""
    with safetensors.safe_open(file, "pt", device="cpu") as handle:
        shape = handle.get_slice(key).get_shape()
        if len(shape) == 0 or math.prod(shape) * itemsize <= CHUNK_BYTES:
            yield 0, handle.get_tensor(key)
            return
    rows = max(1, CHUNK_BYTES * shape[0] // (math.prod(shape) * itemsize))
    for start in range(0, shape[0], rows):
        with safetensors.safe_open(file, "pt", device="cpu") as handle:
            yield start, handle.get_slice(key)[start:start + rows]


def _read(file: Path, key: str, dtype: torch.dtype, remedy: str) -> torch.Tensor:
    """Tensor ``key`` of ``file`` as a new ``dtype`` tensor, read and cast in row chunks (``_row_chunks``); a
    cast that turns finite values infinite is refused, naming ``remedy``."""
    with safetensors.safe_open(file, "pt", device="cpu") as handle:
        out = torch.empty(handle.get_slice(key).get_shape(), dtype=dtype)
    for start, values in _row_chunks(file, key, out.element_size()):
        _fill(out, slice(start, start + len(values)) if out.dim() else ..., values, key, remedy)
    return out


def _fill(out: torch.Tensor, index, values: torch.Tensor, key: str, remedy: str) -> None:
    out[index] = values
    if out.dtype != values.dtype and out.is_floating_point():
        refuse_overflow(key, values, out[index], remedy)


class DenseWeights:
    """The tensors of a safetensors checkpoint (file or folder), by state-dict key, read when asked for."""

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        if path.is_file():
            files = [path]
        elif (path / INDEX_FILE).is_file():
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            files = sorted({path / name for name in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise UserInputError(f"{path} holds no safetensors weights (model.safetensors, or shards with "
                                 f"{INDEX_FILE}); block-by-block loading reads safetensors only")
        self.path = path
        self.location: dict[str, Path] = {}
        for file in files:
            with safetensors.safe_open(file, "pt", device="cpu") as handle:
                self.location.update(dict.fromkeys(handle.keys(), file))
        self.bytes_read = 0

    def __contains__(self, key: str) -> bool:
        return key in self.location

    def read(self, key: str, dtype: torch.dtype, remedy: str = LOAD_WIDER) -> torch.Tensor:
        """The checkpoint's tensor ``key`` as ``dtype``, cast chunk by chunk (never held in two dtypes at once);
        a ``ValueError`` naming ``remedy`` when a value does not fit ``dtype``."""
        if key not in self.location:
            raise UserInputError(f"{self.path} has no tensor {key!r}: the checkpoint does not fit the model config")
        tensor = _read(self.location[key], key, dtype, remedy)
        self.bytes_read += tensor.nbytes
        return tensor

    def rows(self, key: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The checkpoint's tensor ``key`` as consecutive row chunks in ``dtype`` (about ``CHUNK_BYTES`` each):
        for a check that never needs the whole tensor."""
        if key not in self.location:
            raise UserInputError(f"{self.path} has no tensor {key!r}: the checkpoint does not fit the model config")
        for _, values in _row_chunks(self.location[key], key, dtype.itemsize):
            self.bytes_read += values.numel() * dtype.itemsize
            yield values.to(dtype)

    def load(self, module: nn.Module, prefix: str = "", skip: Iterable[str] = ()) -> None:
        """Fill ``module``'s parameters and buffers (checkpoint keys ``prefix + name``) in place, except those
        under the ``skip`` prefixes; tensors the checkpoint leaves out must be tied to one it holds (an LM
        head tied to the embeddings) or already hold values (buffers computed at construction)."""
        skip = tuple(skip)
        if not prefix and hasattr(module, "tie_weights"):
            module.tie_weights()  # a skeleton built from a config may not have tied its LM head yet
        wanted = {name: tensor for name, tensor in module.state_dict(keep_vars=True).items()
                  if not (prefix + name).startswith(skip)}
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            if prefix + name in self.location:
                by_file.setdefault(self.location[prefix + name], []).append(name)
        loaded: dict[str, torch.Tensor] = {}
        for names in by_file.values():
            for name in names:
                loaded[name] = self.read(prefix + name, wanted[name].dtype)
        for name, tensor in wanted.items():
            if name in loaded or tensor.device.type != "meta":
                continue
            tied = next((other for other, t in wanted.items() if t is tensor and other in loaded), None)
            if tied is None:
                raise UserInputError(f"{self.path} has no tensor {prefix + name!r} for the model's "
                                     f"{type(module).__name__}: the checkpoint does not fit the model config")
            loaded[name] = loaded[tied]
        module.load_state_dict(loaded, strict=False, assign=True)
        if not prefix and hasattr(module, "tie_weights"):
            module.tie_weights()
