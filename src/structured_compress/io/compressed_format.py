"""A compressed model on disk: one safetensors file with every state tensor and a JSON manifest that says how
to rebuild each structured layer and the dense model around them.

Layout of the directory ``path``::

    compressed.safetensors  every stored tensor (tensors that share memory once; see ``storage`` for codecs);
                            its metadata seals the manifest (see ``manifest``)
    manifest.json           format name and version; size and sha256 of the weights file; per structured layer
                            its qualified name, type, shape and ``config()``; per tensor its dtype, shape and
                            codec; tensor aliases; the storage policy; the model's source spec; the report
    config.json             transformers models only: their config, so ``AutoConfig`` recognises the folder

The weights file is not named ``model.safetensors`` on purpose: ``AutoModel.from_pretrained`` on the folder
then fails loudly instead of loading packed tensors as unexpected keys beside random linears.
Files are written atomically (temp file + rename), the manifest last. Loading checks the hash, the seal, and
every tensor's dtype and shape against its codec and its layer's ``config()``; then it rebuilds each layer
from its constructor -- no decomposition runs -- inside the given skeleton or the model the source spec
builds, so outputs are bit-identical to the saved model.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch
from torch import nn

from ..errors import UserInputError
from ..layers import StructuredLinear
from .storage import StoragePolicy, choose_codec, decode, dtype_name, embedding_keys, encode, model_dtype, \
    parse_dtype, stored_layout
from .manifest import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, SEAL_KEY, canonical_json, check_body,
                       check_sealed, check_weights_entry, read_manifest)
from .source import build_from_source, describe_source, is_hf_model, write_hf_config
from .structure import build_layer_from_entry, install_structured_layers, layer_entry, structured_layers

log = logging.getLogger(__name__)

WEIGHTS_FILE = "compressed.safetensors"
_CHUNK = 1 << 20
# save_pretrained keywords that only tune how transformers writes files; anything else is refused
_IGNORED_SAVE_PRETRAINED_KWARGS = ("safe_serialization", "max_shard_size")


def _layer_problems(entry: Mapping[str, Any], described: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every way the tensors ``described`` (key -> table entry) under layer ``entry['name']`` differ from what
    the layer's type and ``config()`` build: missing or extra tensors, shapes, dtypes (integer dtypes exactly,
    floating ones as floating)."""
    label = f"layer {entry['name']!r} ({entry['type']})"
    try:
        with torch.device("meta"):
            expected = build_layer_from_entry(entry).state_dict()
    except Exception as err:  # any constructor failure means the recorded config cannot rebuild the layer
        return [f"{label}: its config {entry['config']} does not build the layer: {err}"]
    prefix = entry["name"] + "."
    actual = {key[len(prefix):]: value for key, value in described.items() if key.startswith(prefix)}
    problems = [f"{label}: tensor {key!r} is missing" for key in expected if key not in actual]
    problems += [f"{label}: tensor {key!r} is not part of the layer its config builds" for key in actual
                 if key not in expected]
    for key, tensor in expected.items():
        if key not in actual:
            continue
        shape, dtype = actual[key]["shape"], parse_dtype(actual[key]["dtype"], f"tensors[{prefix}{key}]")
        if shape != list(tensor.shape):
            problems.append(f"{label}: tensor {key!r} has shape {shape}, its config implies {list(tensor.shape)}")
        if tensor.is_floating_point() != dtype.is_floating_point or (
                not dtype.is_floating_point and dtype != tensor.dtype):
            implied = "a floating dtype" if tensor.is_floating_point() else dtype_name(tensor.dtype)
            problems.append(f"{label}: tensor {key!r} has dtype {dtype_name(dtype)}, its config implies {implied}")
    return problems


def _unique_keys(state: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[str, str]]:
    """Keys to store, and aliases (key -> stored key) for tensors that are the same view of the same memory
    as an earlier one (tied weights)."""
    keys, aliases, seen = [], {}, {}
    for key, tensor in state.items():
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and view in seen:
            aliases[key] = seen[view]
        else:
            seen[view] = key
            keys.append(key)
    return keys, aliases


@dataclass
class _Encoded:
    """A model's state as it will be written: file tensors, per-tensor table, aliases, embedding keys, the
    storage dtype, and for each tensor stored lossily (cast, quantized) the value loading will return."""

    files: dict[str, torch.Tensor]
    table: dict[str, dict[str, Any]]
    aliases: dict[str, str]
    embeddings: list[str]
    dtype: torch.dtype
    rounded: dict[str, torch.Tensor]


def exact_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the structured layers' ``exact_tensors`` (kept in their own dtype by a save)."""
    return {f"{name}.{tensor}" if name else tensor for name, module in model.named_modules()
            if isinstance(module, StructuredLinear) for tensor in module.exact_tensors}


def _encode_state(state: Mapping[str, torch.Tensor], layer_names: list[str], embeddings: list[str],
                  policy: StoragePolicy, grams: Mapping[str, torch.Tensor] | None = None,
                  exact: set[str] = frozenset()) -> _Encoded:
    keys, aliases = _unique_keys(state)
    prefixes = tuple(name + "." for name in layer_names)
    in_layer = {key: key.startswith(prefixes) for key in keys}
    dtype = policy.storage_dtype(model_dtype({k: state[k] for k in keys if not in_layer[k]}))
    embeddings = sorted({aliases.get(k, k) for k in embeddings} - {k for k in keys if in_layer[k]})
    grams = {aliases.get(k, k): gram for k, gram in (grams or {}).items()}  # a tied head's Gram is its tensor's
    if policy.embeddings != "none" and policy.embeddings_rounding == "gptq" and not set(grams) & set(embeddings):
        raise ValueError("storage.embeddings_rounding=gptq needs the Gram matrix of the LM head's inputs: pass "
                         "save_compressed(..., calibration=collect_output_embedding_gram(model, batches)) "
                         f"(embedding keys: {embeddings})")
    encoded = _Encoded({}, {}, aliases, embeddings, dtype, {})
    for key in keys:
        tensor = state[key].detach().to("cpu", copy=True).contiguous()
        entry = choose_codec(tensor, in_layer[key], key in embeddings, policy, dtype, grams.get(key), key in exact)
        stored = encode(key, tensor, entry, grams.get(key))
        if entry["codec"] in ("cast", "int8", "int4"):
            encoded.rounded[key] = decode(key, entry, stored)
        encoded.files.update(stored)
        encoded.table[key] = entry
    return encoded


def save_compressed(model: nn.Module, path: str | Path, report=None, source=None, storage=None,
                    calibration: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (after ``compress_``) to the directory ``path``; returns it.

    report: a ``CompressionReport`` (or a plain dict) stored in the manifest for reference.
    source: how to rebuild the dense model on load (see ``structured_compress.io.source``): a source spec or a
        Hydra model config; ``None`` records a transformers model's class and config, and nothing for other
        models (then loading needs a skeleton).
    storage: a ``StoragePolicy`` or a dict (``dtype``, ``embeddings``, ``group_size``, ``zero_point``,
        ``embeddings_rounding``, ``rest``) for the tensors no structured layer owns; default fp16 (or the
        model's own half dtype).
    calibration: per state-dict key of an output embedding (e.g. ``lm_head.weight``), the Gram matrix of its
        inputs, for ``embeddings_rounding: gptq`` (``structured_compress.surgery.collect_output_embedding_gram``).
    Once the files are written, tensors stored lossily are rounded *in place* in ``model`` to what was saved,
    so evaluating ``model`` afterwards measures the saved model.
    """
    from ..utils.files import atomic_write_bytes, atomic_write_text  # deferred: that module imports Lightning

    directory = Path(path)
    policy = StoragePolicy.from_config(storage)
    layers = [layer_entry(name, module) for name, module in structured_layers(model).items()]
    spec = describe_source(model, source)
    state = model.state_dict()
    encoded = _encode_state(state, [entry["name"] for entry in layers], embedding_keys(model), policy, calibration,
                            exact_keys(model))
    described = {**encoded.table, **{alias: encoded.table[target] for alias, target in encoded.aliases.items()}}
    problems = [line for entry in layers for line in _layer_problems(entry, described)]
    if problems:
        raise ValueError("cannot save: a layer's config() does not rebuild its state (e.g. QAT still on):\n  "
                         + "\n  ".join(problems))
    body = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": layers, "aliases": encoded.aliases,
        "tensors": encoded.table, "embeddings": encoded.embeddings, "source": spec,
        "report": report.to_dict() if hasattr(report, "to_dict") else report,
        "storage": {"dtype": dtype_name(encoded.dtype), **policy.describe(),
                    "model_dtype": dtype_name(model_dtype(state))},
    }
    data = safetensors.torch.save(encoded.files, metadata={SEAL_KEY: canonical_json(body)})
    weights_entry = {"file": WEIGHTS_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {**body, "weights": weights_entry}
    atomic_write_bytes(directory / WEIGHTS_FILE, data)
    write_hf_config(model, directory)
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))
    with torch.no_grad():
        for key, value in encoded.rounded.items():
            state[key].copy_(value)  # the model in memory is now the one on disk
    log.info("saved %d structured layers, %d tensors (%d bytes; untouched tensors in %s, embeddings %s) to %s",
             len(layers), len(encoded.table), len(data), body["storage"]["dtype"], policy.embeddings, directory)
    return directory


def _verify_weights(file: Path, expected: dict[str, Any]) -> None:
    if not file.is_file():
        raise UserInputError(f"{file} is missing")
    size = file.stat().st_size
    if size != expected["bytes"]:
        problem = "is truncated" if size < expected["bytes"] else "is longer than recorded"
        raise UserInputError(f"{file} {problem}: {size} bytes, the manifest records {expected['bytes']}")
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected["sha256"]:
        raise UserInputError(f"{file} failed its sha256 check (tampered or corrupted): "
                             f"{digest.hexdigest()} != {expected['sha256']}")


def _read_weights(file: Path) -> tuple[dict[str, str] | None, dict[str, torch.Tensor]]:
    """The metadata and every tensor (on CPU) of a safetensors file."""
    try:
        with safetensors.safe_open(file, "pt", device="cpu") as handle:
            return handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise UserInputError(f"{file} is not a readable safetensors file: {err}") from err


def _upgrade(manifest: dict[str, Any], stored: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A version 1-2 manifest in version 3 form: its tensor table read off the file (those versions stored
    every tensor as held, ternary ones 2-bit packed)."""
    packed = manifest.get("ternary_packed", {})
    if not isinstance(packed, dict):
        raise UserInputError(f"manifest field ternary_packed must be a dict, got {packed!r}")
    table = {key: {"dtype": "int8", "shape": packed[key], "codec": "ternary2"} if key in packed
             else {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "codec": "raw"}
             for key, t in stored.items()}
    return {"aliases": {}, **manifest, "tensors": table, "embeddings": [], "source": None, "storage": None}


def _owner(key: str, names: list[str]) -> str:
    return next((f" (layer {name!r})" for name in names if key.startswith(name + ".")), "")


def _stored_problems(manifest: Mapping[str, Any], stored: Mapping[str, torch.Tensor]) -> list[str]:
    """Every file tensor that is missing, extra, or of another dtype/shape than its table entry's codec
    writes; aliases that point nowhere."""
    names = [entry["name"] for entry in manifest["layers"]]
    expected = {}
    for key, entry in manifest["tensors"].items():
        expected.update(stored_layout(key, entry))
    problems = []
    for key, (dtype, shape) in expected.items():
        if key not in stored:
            problems.append(f"tensor {key!r}{_owner(key, names)} is missing from the weights file")
        elif (dtype_name(stored[key].dtype), list(stored[key].shape)) != (dtype, shape):
            problems.append(f"tensor {key!r}{_owner(key, names)} is stored as {dtype_name(stored[key].dtype)} "
                            f"{list(stored[key].shape)}; the manifest implies {dtype} {shape}")
    problems += [f"tensor {key!r}{_owner(key, names)} in the weights file is not in the manifest's tensor table"
                 for key in stored if key not in expected]
    for alias, target in manifest["aliases"].items():
        if target not in manifest["tensors"] or alias in manifest["tensors"]:
            problems.append(f"alias {alias!r} -> {target!r} must point at a stored tensor and not shadow one")
    return problems


def check_saved(manifest: Mapping[str, Any], stored: Mapping[str, torch.Tensor]) -> None:
    """Raise one ValueError listing every inconsistency between the manifest, the file tensors and what each
    layer's config implies."""
    problems = _stored_problems(manifest, stored)
    described = {**manifest["tensors"], **{a: manifest["tensors"][t] for a, t in manifest["aliases"].items()
                                          if t in manifest["tensors"]}}
    problems += [line for entry in manifest["layers"] for line in _layer_problems(entry, described)]
    if problems:
        raise UserInputError(f"the saved model is inconsistent ({len(problems)} problem(s)):\n  "
                             + "\n  ".join(problems))


def _skeleton(manifest: Mapping[str, Any], directory: Path) -> nn.Module:
    """The dense model the manifest's source spec builds, in the saved model's dtype."""
    if manifest["source"] is None:
        raise UserInputError(f"{directory} records no source to rebuild the model from (saved from a model that is not "
                             f"a transformers model, without source=...): pass the dense model as "
                             f"load_compressed(path, model_skeleton)")
    dtype = parse_dtype(manifest["storage"].get("model_dtype", "float32") if manifest["storage"] else "float32",
                        "manifest field storage.model_dtype")
    try:
        return build_from_source(manifest["source"], dtype)
    except ValueError:
        raise
    except Exception as err:  # timm / transformers / Hydra raise their own types for a spec they cannot build
        raise UserInputError(f"{directory}: the recorded source {manifest['source']} does not build a model: {err!r}; "
                             f"pass the dense model as load_compressed(path, model_skeleton)") from err


def load_compressed(path: str | Path, model_skeleton: nn.Module | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """The model saved at ``path``, every tensor on ``device``: built from the recorded source spec (in eval
    mode), or, when given, ``model_skeleton`` (the dense model, or any model with the same module names)
    modified in place. Raises ``ValueError`` naming the problem for a missing, truncated, tampered,
    inconsistent or mismatched save."""
    directory = Path(path)
    manifest = read_manifest(directory)
    weights = directory / check_weights_entry(manifest)["file"]
    _verify_weights(weights, manifest["weights"])
    metadata, stored = _read_weights(weights)
    if manifest["version"] >= 3:
        check_sealed(manifest, metadata, weights)
    else:
        log.warning("%s was saved with format version %d: its manifest is not sealed; re-save it for the checks",
                    directory, manifest["version"])
        manifest = _upgrade(manifest, stored)
    check_body(manifest)
    check_saved(manifest, stored)
    tensors = {key: decode(key, entry, stored).to(device) for key, entry in manifest["tensors"].items()}
    for alias, target in manifest["aliases"].items():
        tensors[alias] = tensors[target]
    model = model_skeleton
    if model is None:
        with torch.random.fork_rng(devices=[]):  # building the model may draw random inits; keep the caller's RNG
            model = _skeleton(manifest, directory)
    install_structured_layers(model, manifest["layers"], tensors, "the manifest")
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise UserInputError(f"the saved state does not fit the model skeleton: {err}") from err
    guard_save_pretrained(model)
    log.info("loaded %d structured layers from %s", len(manifest["layers"]), directory)
    return model


def _save_pretrained_compressed(model: nn.Module, save_directory, is_main_process: bool = True, **kwargs) -> None:
    """``save_pretrained`` of a compressed transformers model: writes the compressed format, which
    ``load_compressed(save_directory)`` reloads (``from_pretrained`` cannot read packed layers)."""
    refused = sorted(k for k in kwargs if k not in _IGNORED_SAVE_PRETRAINED_KWARGS)
    if refused:
        raise ValueError(f"this model has structured (compressed) layers: save_pretrained writes the compressed "
                         f"format and does not take {refused}; call structured_compress.save_compressed(model, path) "
                         f"instead")
    if is_main_process:
        save_compressed(model, save_directory)


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the compressed format (instead of a state dict that transformers
    would reload with random linears); called by whatever puts structured layers into a transformers model:
    ``load_compressed`` and the pipeline (``compress_`` itself leaves ``save_pretrained`` alone)."""
    if is_hf_model(model):
        model.save_pretrained = functools.partial(_save_pretrained_compressed, model)
