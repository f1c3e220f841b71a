"""Weight files of a compressed folder: one shard per part, streamed to disk and renamed into place.

A folder saved in one piece holds ``compressed.safetensors``. A folder written part by part (the sequential
engine writes one part per block, then the rest) holds ``compressed-0000k-of-0000n.safetensors`` and a
``compressed.safetensors.index.json`` (``weight_map``: tensor -> file, as hub tooling expects). Each
earlier shard carries its own part of the manifest in its metadata (``PART_KEY``), so a killed run can tell
which parts are done and what they hold; the last shard seals the whole manifest (``manifest.SEAL_KEY``),
including every earlier shard's size and sha256.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

from ..errors import UserInputError
from .storage import decode, stored_layout

SINGLE_FILE = "compressed.safetensors"
INDEX_FILE = "compressed.safetensors.index.json"
PART_KEY = "structured-compress-part"
_CHUNK = 1 << 20
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def shard_name(index: int, count: int) -> str:
    """The file of part ``index`` (0-based) of ``count``: hub-style ``-0000k-of-0000n`` names, or the single
    file's name when there is one part."""
    return SINGLE_FILE if count == 1 else f"compressed-{index + 1:05d}-of-{count:05d}.safetensors"


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, Any]:
    """Stream ``tensors`` to ``path`` (temp file, fsync, rename: never a torn shard); returns its manifest
    entry ``{"file", "bytes", "sha256"}``."""
    from ..utils.files import atomic_path  # deferred: that module imports Lightning

    with atomic_path(path) as tmp:
        safetensors.torch.save_file(dict(tensors), tmp, metadata=dict(metadata))
        entry = {"file": path.name, "bytes": tmp.stat().st_size, "sha256": file_digest(tmp)}
    return entry


def shard_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of a shard (reads the header only)."""
    try:
        with safetensors.safe_open(path, "pt", device="cpu") as handle:
            return handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise UserInputError(f"{path} is not a readable safetensors file: {err}") from err


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    try:
        with safetensors.safe_open(file, "pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise UserInputError(f"{file} is not a readable safetensors file: {err}") from err


def decoded_tensors(table: Mapping[str, Mapping[str, Any]], aliases: Mapping[str, str], files: list[Path],
                    device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a tensor table (key -> codec entry), decoded onto ``device`` and read one file at a
    time (at most one file's stored tensors beside the decoded ones), plus its aliases."""
    wanted = {key: stored_layout(key, entry) for key, entry in table.items()}
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        stored = read_tensors(file)
        for key, layout in wanted.items():
            if key not in tensors and all(name in stored for name in layout):
                tensors[key] = decode(key, table[key], stored).to(device)
        del stored
    tensors.update({alias: tensors[target] for alias, target in aliases.items()})
    return tensors


def read_part(path: Path) -> dict[str, Any] | None:
    """The part of the manifest an earlier shard carries (None when it carries none)."""
    text = shard_metadata(path).get(PART_KEY)
    return None if text is None else json.loads(text)


def verify_file(file: Path, expected: Mapping[str, Any]) -> None:
    """Fail, naming the file, unless it exists with the recorded size and sha256."""
    if not file.is_file():
        raise UserInputError(f"{file} is missing")
    size = file.stat().st_size
    if size != expected["bytes"]:
        problem = "is truncated" if size < expected["bytes"] else "is longer than recorded"
        raise UserInputError(f"{file} {problem}: {size} bytes, the manifest records {expected['bytes']}")
    digest = file_digest(file)
    if digest != expected["sha256"]:
        raise UserInputError(f"{file} failed its sha256 check (tampered or corrupted): {digest} != "
                             f"{expected['sha256']}")


def write_index(directory: Path, weight_map: Mapping[str, str], total_bytes: int) -> None:
    """The hub-style index of a sharded folder: which file holds each stored tensor."""
    from ..utils.files import atomic_write_text  # deferred: that module imports Lightning

    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=1))


def shard_layout(file: Path) -> dict[str, tuple[str, list[int]]]:
    """Per tensor of a shard, its dtype name (as ``storage.dtype_name`` spells it) and shape, from the header
    alone (no tensor is read)."""
    with safetensors.safe_open(file, "pt", device="cpu") as handle:
        slices = {key: handle.get_slice(key) for key in handle.keys()}
        return {key: (_DTYPE_NAMES.get(s.get_dtype(), s.get_dtype()), list(s.get_shape())) for key, s in slices.items()}
