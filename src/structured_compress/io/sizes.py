"""What a saved folder weighs, whole and per part, against the dense model it stands for.

Parts: ``replaced`` (the structured layers), ``embeddings`` (``nn.Embedding`` weights and the LM head),
``rest`` (norms, biases, untouched layers) and ``metadata`` (safetensors header with the sealed manifest,
manifest.json, config.json). The dense reference counts every floating number of the dense model at 4
(fp32) or 2 (fp16) bytes -- a replaced layer as its ``out x in`` weight plus bias -- and other tensors at
their own size, tied tensors once. Everything comes from the folder, so the figures describe what is saved.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from .manifest import check_weights_entry, read_manifest
from .storage import stored_layout

PARTS = ("replaced", "embeddings", "rest")


def _tensor_bytes(file: Path) -> tuple[int, dict[str, int]]:
    """The safetensors header size (length prefix included) and each tensor's byte count."""
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return 8 + length, {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                        if k != "__metadata__"}


def _dense_numbers(entry: dict[str, Any]) -> tuple[int, int]:
    """``(floating numbers, bytes of the others)`` of one tensor-table entry as the dense model holds it."""
    numel, dtype = math.prod(entry["shape"]), getattr(torch, entry["dtype"])
    return (numel, 0) if dtype.is_floating_point else (0, numel * dtype.itemsize)


def stored_tensor_bytes(directory: Path) -> dict[str, int]:
    """Each stored tensor's byte count, over every safetensors file of a saved folder."""
    return {key: size for file in directory.glob("*.safetensors") for key, size in _tensor_bytes(file)[1].items()}


def ratio(dense: int, stored: int) -> float:
    return round(dense / stored, 3) if stored else 0.0


def folder_sizes(path: str | Path) -> dict[str, Any]:
    """Bytes on disk of a ``save_compressed`` folder, its ratio to the dense fp32 / fp16 checkpoint, and per
    part (``replaced``, ``embeddings``, ``rest``) the stored bytes, the fp32 bytes and both ratios."""
    directory = Path(path)
    manifest = read_manifest(directory)
    if manifest["version"] < 3:
        raise ValueError(f"{directory} has format version {manifest['version']}: size figures need version 3 "
                         f"(re-save it with save_compressed)")
    header_bytes, stored = 0, {}
    for file in [*(e["file"] for e in manifest.get("shards", [])), check_weights_entry(manifest)["file"]]:
        header, tensors = _tensor_bytes(directory / file)
        header_bytes, stored = header_bytes + header, {**stored, **tensors}
    layers = {entry["name"]: entry for entry in manifest["layers"]}
    embeddings = set(manifest["embeddings"])
    floats = dict.fromkeys(PARTS, 0)
    fixed = dict.fromkeys(PARTS, 0)
    on_disk = dict.fromkeys(PARTS, 0)
    for key, entry in manifest["tensors"].items():
        owner = next((name for name in layers if key.startswith(name + ".")), None)
        part = "replaced" if owner else "embeddings" if key in embeddings else "rest"
        on_disk[part] += sum(stored[k] for k in stored_layout(key, entry))
        if part != "replaced":
            numbers, other = _dense_numbers(entry)
            floats[part] += numbers
            fixed[part] += other
    for name, entry in layers.items():
        bias = manifest["tensors"].get(f"{name}.linear.bias" if entry["conv"] else f"{name}.bias")
        floats["replaced"] += entry["out_features"] * entry["in_features"] + (math.prod(bias["shape"]) if bias else 0)
    total = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    sizes: dict[str, Any] = {"bytes_on_disk": total, "metadata_bytes": total - sum(on_disk.values()),
                             "header_bytes": header_bytes}
    dense32, dense16 = (sum(floats[p] * width + fixed[p] for p in PARTS) for width in (4, 2))
    sizes.update(dense_fp32_bytes=dense32, dense_fp16_bytes=dense16, ratio_vs_fp32=ratio(dense32, total),
                 ratio_vs_fp16=ratio(dense16, total))
    for part in PARTS:
        part32, part16 = floats[part] * 4 + fixed[part], floats[part] * 2 + fixed[part]
        sizes.update({f"{part}_bytes": on_disk[part], f"{part}_fp32_bytes": part32,
                      f"{part}_ratio_vs_fp32": ratio(part32, on_disk[part]),
                      f"{part}_ratio_vs_fp16": ratio(part16, on_disk[part])})
    sizes["storage"] = manifest["storage"]
    return sizes
