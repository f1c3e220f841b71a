"""The manifest of a saved model: reading it, sealing it into the weights file, and checking its fields.

The manifest minus its ``weights`` entry (size and sha256 of the weights file) is *sealed*: written, as
canonical JSON, into the weights file's safetensors metadata, which the sha256 covers. A sharded folder's
``shards`` list (size and sha256 of every other file) is part of what is sealed. An edit of
``manifest.json`` therefore either breaks the hash or no longer matches the sealed copy; the error names
every field that differs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserInputError
from .gguf_source import block_bytes
from .storage import CODECS, parse_dtype

FORMAT_NAME = "structured-compress"
FORMAT_VERSION = 4
# 2 added 2-bit packing of ternary tensors; 3 the sealed manifest, the tensor table and the storage policy;
# 4 shards (written part by part, each earlier shard's size and sha256 sealed in the last one)
READABLE_VERSIONS = (1, 2, 3, 4)
MANIFEST_FILE = "manifest.json"
SEAL_KEY = "structured-compress-manifest"  # the only metadata key: one key keeps the header byte-identical


def canonical_json(value: Any) -> str:
    """One spelling per value (sorted keys, no spaces), so identical manifests give identical bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def sealed_part(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the weights file seals: everything but the ``weights`` entry, which describes that file."""
    return {k: v for k, v in manifest.items() if k != "weights"}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a saved model, checked for format name and version."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise UserInputError(f"no compressed model at {path}: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserInputError(f"{file} is not valid JSON (truncated or corrupted): {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserInputError(f"{file} is not a {FORMAT_NAME!r} manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise UserInputError(f"{file} has format version {manifest.get('version')!r}; this reader supports "
                             f"versions {READABLE_VERSIONS} (a newer save needs a newer structured-compress)")
    return manifest


def differences(ours: Any, sealed: Any, path: str = "") -> list[str]:
    """Every field where ``ours`` and ``sealed`` differ, as ``path: ours != sealed`` (list items that are
    dicts with a ``name`` are labelled by it, e.g. ``layers[encoder.0.fc].config.classes``)."""
    if isinstance(ours, dict) and isinstance(sealed, dict):
        found = []
        for key in sorted(set(ours) | set(sealed), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in sealed:
                found.append(f"{where}: {ours[key]!r} is not in the sealed copy")
            elif key not in ours:
                found.append(f"{where}: missing (sealed copy has {sealed[key]!r})")
            else:
                found += differences(ours[key], sealed[key], where)
        return found
    if isinstance(ours, list) and isinstance(sealed, list) and len(ours) == len(sealed):
        return [line for i, (a, b) in enumerate(zip(ours, sealed))
                for line in differences(a, b, f"{path}[{a['name'] if isinstance(a, dict) and 'name' in a else i}]")]
    return [] if ours == sealed else [f"{path}: {ours!r} != sealed {sealed!r}"]


def check_sealed(manifest: Mapping[str, Any], metadata: Mapping[str, str] | None, weights: Path) -> None:
    """Fail, naming each differing field, unless ``manifest.json`` equals the copy sealed in ``weights``."""
    text = (metadata or {}).get(SEAL_KEY)
    if text is None:
        raise ValueError(f"{weights} carries no sealed manifest (metadata key {SEAL_KEY!r}): not written by "
                         f"save_compressed version {FORMAT_VERSION}, or rewritten since")
    try:
        sealed = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{weights}: the sealed manifest is not valid JSON: {err}") from err
    if canonical_json(sealed) == canonical_json(sealed_part(manifest)):
        return
    found = differences(sealed_part(manifest), sealed) or ["a value that differs only in spelling (e.g. NaN)"]
    raise ValueError(f"{MANIFEST_FILE} was edited after saving; it differs from the copy sealed in "
                     f"{weights.name}:\n  " + "\n  ".join(found))


def _field(container: Mapping, key: str, kinds: type | tuple, where: str) -> Any:
    """``container[key]``, or a ValueError naming the field when it is missing or of another type."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    name = f"{where}.{key}" if where else key
    if key not in container:
        raise ValueError(f"manifest field {name} is missing")
    value = container[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"manifest field {name} must be {names}, got {value!r}")
    return value


def check_weights_entry(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The ``weights`` entry (file name, bytes, sha256), checked; the file must sit beside the manifest."""
    weights = _field(manifest, "weights", dict, "")
    name = _field(weights, "file", str, "weights")
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"manifest field weights.file must be a file name beside {MANIFEST_FILE}, got {name!r}")
    _field(weights, "bytes", int, "weights")
    _field(weights, "sha256", str, "weights")
    return weights


def check_layer_entry(entry: Any, index: int) -> None:
    """One ``layers`` item: name, type, positive feature counts, a config dict, an optional conv dict."""
    where = f"layers[{entry.get('name', index) if isinstance(entry, dict) else index}]"
    if not isinstance(entry, dict):
        raise ValueError(f"manifest field {where} must be a dict, got {entry!r}")
    _field(entry, "name", str, where)
    _field(entry, "type", str, where)
    for key in ("out_features", "in_features"):
        if _field(entry, key, int, where) < 1:
            raise ValueError(f"manifest field {where}.{key} must be >= 1, got {entry[key]}")
    _field(entry, "config", dict, where)
    conv = entry.get("conv")
    if conv is not None:
        _field(entry, "conv", dict, where)
        for key in ("in_channels", "kernel_size", "stride", "padding", "dilation"):
            _field(conv, key, int if key == "in_channels" else list, f"{where}.conv")


def check_tensor_entry(key: str, entry: Any) -> None:
    """One ``tensors`` item: dtype, shape, codec and the codec's own fields."""
    where = f"tensors[{key}]"
    if not isinstance(entry, dict):
        raise ValueError(f"manifest field {where} must be a dict, got {entry!r}")
    dtype = parse_dtype(_field(entry, "dtype", str, where), f"manifest field {where}.dtype")
    shape = _field(entry, "shape", list, where)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"manifest field {where}.shape must be a list of non-negative integers, got {shape!r}")
    codec = _field(entry, "codec", str, where)
    if codec not in CODECS:
        raise ValueError(f"manifest field {where}.codec must be one of {CODECS}, got {codec!r}")
    if codec == "ternary2" and dtype != parse_dtype("int8", ""):
        raise ValueError(f"manifest field {where}.dtype must be int8 for codec ternary2, got {entry['dtype']!r}")
    if codec in ("cast", "int8", "int4", "gguf") and not dtype.is_floating_point:
        raise ValueError(f"manifest field {where}.dtype must be a floating dtype for codec {codec}, "
                         f"got {entry['dtype']!r}")
    if codec == "cast" and not parse_dtype(_field(entry, "stored_dtype", str, where),
                                           f"manifest field {where}.stored_dtype").is_floating_point:
        raise ValueError(f"manifest field {where}.stored_dtype must be a floating dtype, got {entry['stored_dtype']!r}")
    if codec == "gguf":
        try:
            block_bytes(_field(entry, "ggml_type", str, where), shape)
        except ValueError as err:
            raise ValueError(f"manifest field {where}.ggml_type: {err}") from None
    if codec in ("int8", "int4"):
        if len(shape) < 2:
            raise ValueError(f"manifest field {where}.shape must have 2 or more dimensions for codec {codec}, "
                             f"got {shape}")
        size = _field(entry, "group_size", (int, type(None)), where)
        if size is not None and size < 1:
            raise ValueError(f"manifest field {where}.group_size must be >= 1 or null, got {size}")
        if "zero_point" in entry:  # absent in folders saved before zero-point grids: symmetric
            _field(entry, "zero_point", bool, where)


def check_body(manifest: Mapping[str, Any]) -> None:
    """Types of every field the loader reads (so a bad manifest is a ValueError, never a KeyError)."""
    layers = _field(manifest, "layers", list, "")
    for index, entry in enumerate(layers):
        check_layer_entry(entry, index)
    names = [entry["name"] for entry in layers]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"manifest field layers names a layer twice: {twice}")
    aliases = _field(manifest, "aliases", dict, "")
    for alias, target in aliases.items():
        if not isinstance(target, str):
            raise ValueError(f"manifest field aliases[{alias}] must be a tensor name, got {target!r}")
    for key, entry in _field(manifest, "tensors", dict, "").items():
        check_tensor_entry(key, entry)
    for key in ("source", "storage"):
        _field(manifest, key, (dict, type(None)), "")
    _field(manifest, "embeddings", list, "")
