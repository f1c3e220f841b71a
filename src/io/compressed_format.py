"""A compressed model on disk: one safetensors file with every state tensor (packed integer payloads, scales,
factors, the untouched dense parts) and a JSON manifest that says how to rebuild each structured layer.

Layout of the directory ``path``::

    model.safetensors   the model's state dict (tensors that share memory are stored once; int8 tensors whose
                        entries are all in {-1, 0, 1}, e.g. ternary SVD factors, packed four per byte)
    manifest.json       format name and version, size and sha256 of model.safetensors, per structured layer
                        its qualified name, type, shape and ``config()`` (constructor options), tensor aliases,
                        the shapes of the 2-bit packed tensors, and optionally the compression report

Both files are written atomically (temp file + rename), the manifest last. Loading rebuilds each layer in a
dense skeleton from its constructor -- no decomposition runs -- and loads the tensors as saved (dtype
included), so outputs are bit-identical to the in-memory compressed model.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..layers import StructuredConv2d, StructuredLinear, get_layer_class
from ..layers.quant import is_ternary_int8, pack_ternary, unpack_ternary
from ..surgery import dense_view, replace_child

log = logging.getLogger(__name__)

FORMAT_NAME = "structured-compress"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 2 added 2-bit packing of ternary tensors ("ternary_packed")
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20


def structured_layers(model: nn.Module) -> dict[str, StructuredLinear | StructuredConv2d]:
    """Every structured layer by qualified name; a conv wrapper stands for the linear map inside it."""
    found: dict[str, nn.Module] = {}
    convs = set()
    for name, module in model.named_modules():
        if isinstance(module, StructuredConv2d):
            found[name] = module
            convs.add(name)
        elif isinstance(module, StructuredLinear) and name.rpartition(".")[0] not in convs:
            found[name] = module
    return found


def layer_entry(name: str, module: StructuredLinear | StructuredConv2d) -> dict[str, Any]:
    linear = module.linear if isinstance(module, StructuredConv2d) else module
    conv = None
    if isinstance(module, StructuredConv2d):
        conv = {"in_channels": module.in_channels, "kernel_size": list(module.kernel_size),
                "stride": list(module.stride), "padding": list(module.padding), "dilation": list(module.dilation)}
    return {"name": name, "type": linear.layer_type, "out_features": linear.out_features,
            "in_features": linear.in_features, "config": linear.config(), "conv": conv}


def build_layer_from_entry(entry: dict[str, Any]) -> nn.Module:
    """The layer an entry describes, freshly constructed (no weights yet)."""
    linear = get_layer_class(entry["type"])(entry["in_features"], entry["out_features"], **entry["config"])
    conv = entry.get("conv")
    if conv is None:
        return linear
    return StructuredConv2d(linear, conv["in_channels"], tuple(conv["kernel_size"]), tuple(conv["stride"]),
                            tuple(conv["padding"]), tuple(conv["dilation"]))


def _check_rebuildable(entry: dict[str, Any], module: nn.Module) -> None:
    """Fail at save time if ``config()`` does not rebuild the layer's state layout (e.g. QAT still on)."""
    with torch.device("meta"):
        rebuilt = build_layer_from_entry(entry).state_dict()
    saved = module.state_dict()
    layout = {k: tuple(v.shape) for k, v in saved.items()}
    if layout != {k: tuple(v.shape) for k, v in rebuilt.items()}:
        raise ValueError(
            f"cannot save layer {entry['name']!r} ({entry['type']}): its state {layout} differs from what its "
            f"config() rebuilds {({k: tuple(v.shape) for k, v in rebuilt.items()})}"
        )


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU copies, storing tensors that are the same view of the same memory (tied weights) once."""
    tensors, aliases, seen = {}, {}, {}
    for key, tensor in state.items():
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and view in seen:
            aliases[key] = seen[view]
            continue
        seen[view] = key
        tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def _pack_ternaries(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Replace, in place, every int8 tensor with entries in {-1, 0, 1} by its 2-bit packing; returns the
    original shapes by key (lossless: loading unpacks them to the same int8 values)."""
    shapes = {}
    for key, tensor in tensors.items():
        if is_ternary_int8(tensor):
            shapes[key] = list(tensor.shape)
            tensors[key] = pack_ternary(tensor)
    return shapes


def save_compressed(model: nn.Module, path: str | Path, report=None) -> Path:
    """Write ``model`` (after ``compress_``) to the directory ``path``; returns it.

    report: a ``CompressionReport`` (or a plain dict) stored in the manifest for reference.
    """
    from ..utils.files import atomic_write_bytes, atomic_write_text  # deferred: that module imports Lightning

    directory = Path(path)
    layers = []
    for name, module in structured_layers(model).items():
        entry = layer_entry(name, module)
        _check_rebuildable(entry, module)
        layers.append(entry)
    tensors, aliases = _unique_tensors(model.state_dict())
    ternary_shapes = _pack_ternaries(tensors)
    data = safetensors.torch.save(tensors, metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "weights": {"file": WEIGHTS_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "layers": layers,
        "aliases": aliases,
        "ternary_packed": ternary_shapes,
        "report": report.to_dict() if hasattr(report, "to_dict") else report,
    }
    atomic_write_bytes(directory / WEIGHTS_FILE, data)
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=1))
    log.info("saved %d structured layers, %d tensors (%d bytes) to %s", len(layers), len(tensors), len(data), directory)
    return directory


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a saved model, checked for format name and version."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise ValueError(f"no compressed model at {path}: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON (truncated or corrupted): {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{file} is not a {FORMAT_NAME!r} manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{file} has format version {manifest.get('version')!r}; this reader supports "
                         f"versions {READABLE_VERSIONS} (a newer save needs a newer structured-compress)")
    return manifest


def _verify_weights(file: Path, expected: dict[str, Any]) -> None:
    if not file.is_file():
        raise ValueError(f"{file} is missing")
    size = file.stat().st_size
    if size != expected["bytes"]:
        problem = "is truncated" if size < expected["bytes"] else "is longer than recorded"
        raise ValueError(f"{file} {problem}: {size} bytes, the manifest records {expected['bytes']}")
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected["sha256"]:
        raise ValueError(f"{file} failed its sha256 check (tampered or corrupted): "
                         f"{digest.hexdigest()} != {expected['sha256']}")


def _install(model: nn.Module, entry: dict[str, Any]) -> None:
    """Replace the skeleton's layer ``entry['name']`` by the structured layer the entry describes."""
    name = entry["name"]
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"layer {name!r} recorded in the manifest is missing from the model skeleton") from None
    if isinstance(current, StructuredConv2d):
        current = current.linear
    if isinstance(current, StructuredLinear):
        shape = (current.out_features, current.in_features)
    elif (view := dense_view(current)) is not None:
        shape = tuple(view[1].shape)
    else:
        raise ValueError(f"skeleton module {name!r} is a {type(current).__name__}, not a layer that a "
                         f"{entry['type']!r} layer can replace")
    if shape != (entry["out_features"], entry["in_features"]):
        raise ValueError(f"shape mismatch for layer {name!r}: the manifest records "
                         f"{entry['out_features']}x{entry['in_features']}, the skeleton has {shape[0]}x{shape[1]}")
    replace_child(model, name, build_layer_from_entry(entry))


def load_compressed(path: str | Path, model_skeleton: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the structured layers recorded at ``path`` inside ``model_skeleton`` (the dense model, or any
    model with the same module names) and load every tensor onto ``device``. Returns the skeleton, modified
    in place. Raises ``ValueError`` for a missing, truncated, tampered or mismatched save."""
    directory = Path(path)
    manifest = read_manifest(directory)
    weights = directory / manifest["weights"]["file"]
    _verify_weights(weights, manifest["weights"])
    try:
        tensors = safetensors.torch.load_file(weights, device=str(device))
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err
    try:
        for key, shape in manifest.get("ternary_packed", {}).items():
            tensors[key] = unpack_ternary(tensors[key], tuple(shape))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{weights}: a 2-bit packed tensor does not match the manifest: {err}") from err
    for alias, target in manifest["aliases"].items():
        tensors[alias] = tensors[target]
    with torch.random.fork_rng(devices=[]):  # constructors may draw random inits; keep the caller's RNG
        for entry in manifest["layers"]:
            _install(model_skeleton, entry)
    try:
        model_skeleton.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"the saved state does not fit the model skeleton: {err}") from err
    log.info("loaded %d structured layers from %s", len(manifest["layers"]), directory)
    return model_skeleton
