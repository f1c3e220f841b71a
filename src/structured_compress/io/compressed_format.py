"""A compressed model on disk: safetensors shards with every state tensor and a JSON manifest that says how
to rebuild each structured layer and the dense model around them.

Layout of the directory ``path``::

    compressed.safetensors  every stored tensor (tensors that share memory once; see ``storage`` for codecs);
                            its metadata seals the manifest (see ``manifest``)
      or compressed-0000k-of-0000n.safetensors + compressed.safetensors.index.json, when written part by part
                            (see ``shards``); the last shard seals the manifest and every other shard's sha256
    manifest.json           format name and version; size and sha256 of the weights file(s); per structured layer
                            its qualified name, type, shape and ``config()``; per tensor its dtype, shape and
                            codec; tensor aliases; the storage policy; the model's source spec; the report
    config.json             transformers models only: their config, so ``AutoConfig`` recognises the folder, with
                            ``quantization_config`` (``quant_method: structured_compress``, see ``hf_quantizer``)

The weights file is not named ``model.safetensors``: transformers finds it only through the quantizer that
``import structured_compress`` registers, so ``AutoModelFor*.from_pretrained(folder)`` either rebuilds the
compressed model or, without the registration, fails loudly instead of loading packed tensors as unexpected
keys beside random linears.
Files are written atomically (temp file + rename), the manifest last (``save``). Loading checks the hashes, the
seal, and every tensor's dtype and shape against its codec and its layer's ``config()``; then it rebuilds each
layer from its constructor -- no decomposition runs -- inside the given skeleton or the model the source spec
builds (on the meta device, filled shard by shard), so outputs are bit-identical to the saved model.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import UserInputError
from .manifest import check_body, check_sealed, check_weights_entry, read_manifest
from .save import save_compressed
from .shards import decoded_tensors, shard_layout, shard_metadata, verify_file
from .source import build_from_source, is_hf_model
from .storage import parse_dtype, stored_layout
from .structure import install_structured_layers, layer_problems

log = logging.getLogger(__name__)

# save_pretrained keywords that only tune how transformers writes files; anything else is refused
_IGNORED_SAVE_PRETRAINED_KWARGS = ("safe_serialization", "max_shard_size")


def _upgrade(manifest: dict[str, Any], layout: Mapping[str, tuple[str, list[int]]]) -> dict[str, Any]:
    """A version 1-2 manifest in version 3 form: its tensor table read off the file (those versions stored
    every tensor as held, ternary ones 2-bit packed)."""
    packed = manifest.get("ternary_packed", {})
    if not isinstance(packed, dict):
        raise UserInputError(f"manifest field ternary_packed must be a dict, got {packed!r}")
    table = {key: {"dtype": "int8", "shape": packed[key], "codec": "ternary2"} if key in packed
             else {"dtype": dtype, "shape": shape, "codec": "raw"} for key, (dtype, shape) in layout.items()}
    return {"aliases": {}, **manifest, "tensors": table, "embeddings": [], "source": None, "storage": None}


def _owner(key: str, names: list[str]) -> str:
    return next((f" (layer {name!r})" for name in names if key.startswith(name + ".")), "")


def _stored_problems(manifest: Mapping[str, Any], layout: Mapping[str, tuple[str, list[int]]]) -> list[str]:
    """Every file tensor that is missing, extra, or of another dtype/shape than its table entry's codec
    writes (``layout``: per file tensor, its dtype name and shape); aliases that point nowhere."""
    names = [entry["name"] for entry in manifest["layers"]]
    expected = {}
    for key, entry in manifest["tensors"].items():
        expected.update(stored_layout(key, entry))
    problems = []
    for key, (dtype, shape) in expected.items():
        if key not in layout:
            problems.append(f"tensor {key!r}{_owner(key, names)} is missing from the weights file")
        elif tuple(layout[key]) != (dtype, shape):
            problems.append(f"tensor {key!r}{_owner(key, names)} is stored as {layout[key][0]} "
                            f"{layout[key][1]}; the manifest implies {dtype} {shape}")
    problems += [f"tensor {key!r}{_owner(key, names)} in the weights file is not in the manifest's tensor table"
                 for key in layout if key not in expected]
    for alias, target in manifest["aliases"].items():
        if target not in manifest["tensors"] or alias in manifest["tensors"]:
            problems.append(f"alias {alias!r} -> {target!r} must point at a stored tensor and not shadow one")
    return problems


def check_saved(manifest: Mapping[str, Any], layout: Mapping[str, tuple[str, list[int]]]) -> None:
    """Raise one ValueError listing every inconsistency between the manifest, the file tensors (``layout``:
    dtype name and shape per stored tensor) and what each layer's config implies."""
    problems = _stored_problems(manifest, layout)
    described = {**manifest["tensors"], **{a: manifest["tensors"][t] for a, t in manifest["aliases"].items()
                                          if t in manifest["tensors"]}}
    problems += [line for entry in manifest["layers"] for line in layer_problems(entry, described)]
    if problems:
        raise UserInputError(f"the saved model is inconsistent ({len(problems)} problem(s)):\n  "
                             + "\n  ".join(problems))


def _skeleton(manifest: Mapping[str, Any], directory: Path) -> nn.Module:
    """The dense model the manifest's source spec builds, in the saved model's dtype, its parameters on the
    meta device (the saved tensors replace them; nothing is allocated twice)."""
    from accelerate import init_empty_weights

    if manifest["source"] is None:
        raise UserInputError(f"{directory} records no source to rebuild the model from (saved from a model that is not "
                             f"a transformers model, without source=...): pass the dense model as "
                             f"load_compressed(path, model_skeleton)")
    dtype = parse_dtype(manifest["storage"].get("model_dtype", "float32") if manifest["storage"] else "float32",
                        "manifest field storage.model_dtype")
    try:
        with init_empty_weights():
            return build_from_source(manifest["source"], dtype)
    except ValueError:
        raise
    except Exception as err:  # timm / transformers / Hydra raise their own types for a spec they cannot build
        raise UserInputError(f"{directory}: the recorded source {manifest['source']} does not build a model: {err!r}; "
                             f"pass the dense model as load_compressed(path, model_skeleton)") from err


def weight_files(directory: Path, manifest: Mapping[str, Any]) -> list[Path]:
    """Every weights file of a saved folder, checked against its recorded size and sha256 and (from version
    3 on) the manifest against the copy sealed in the last one; in write order."""
    weights = directory / check_weights_entry(manifest)["file"]
    shards = manifest.get("shards", []) if manifest["version"] >= 4 else []
    if not isinstance(shards, list) or not all(isinstance(e, dict) and Path(str(e.get("file"))).name == e.get("file")
                                               for e in shards):
        raise UserInputError(f"manifest field shards must be a list of {{file, bytes, sha256}} beside the manifest, "
                             f"got {shards!r}")
    verify_file(weights, manifest["weights"])
    if manifest["version"] >= 3:
        check_sealed(manifest, shard_metadata(weights), weights)
    for entry in shards:  # sealed: their entries are part of the manifest body
        verify_file(directory / entry["file"], entry)
    return [directory / entry["file"] for entry in shards] + [weights]


def checked_folder(directory: Path) -> tuple[dict[str, Any], list[Path]]:
    """The manifest of a saved folder and its weight files, after every check made before a tensor is read:
    hashes, seal, the tensor table against the file headers and each layer's config (version 1-2 manifests
    come back in version 3 form). Shared by ``load_compressed`` and ``from_pretrained`` (``hf_quantizer``)."""
    manifest = read_manifest(directory)
    files = weight_files(directory, manifest)
    layout = {key: value for file in files for key, value in shard_layout(file).items()}
    if manifest["version"] < 3:
        log.warning("%s was saved with format version %d: its manifest is not sealed; re-save it for the checks",
                    directory, manifest["version"])
        manifest = _upgrade(manifest, layout)
    check_body(manifest)
    check_saved(manifest, layout)
    return manifest, files


def load_compressed(path: str | Path, model_skeleton: nn.Module | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """The model saved at ``path``, every tensor on ``device``: built from the recorded source spec (in eval
    mode, on the meta device until the saved tensors fill it, file by file), or, when given,
    ``model_skeleton`` (the dense model, or any model with the same module names) modified in place. Raises
    ``ValueError`` naming the problem for a missing, truncated, tampered, inconsistent or mismatched save."""
    directory = Path(path)
    manifest, files = checked_folder(directory)
    tensors = decoded_tensors(manifest["tensors"], manifest["aliases"], files, device)
    model = model_skeleton
    if model is None:
        from accelerate import init_empty_weights

        with torch.random.fork_rng(devices=[]):  # building the model may draw random inits; keep the caller's RNG
            model = _skeleton(manifest, directory)
        with init_empty_weights():  # the layers' parameters too: the saved tensors replace them
            install_structured_layers(model, manifest["layers"], tensors, "the manifest")
    else:
        install_structured_layers(model, manifest["layers"], tensors, "the manifest")
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise UserInputError(f"the saved state does not fit the model skeleton: {err}") from err
    guard_save_pretrained(model)
    log.info("loaded %d structured layers from %s (%d file(s))", len(manifest["layers"]), directory, len(files))
    return model


def _save_pretrained_compressed(model: nn.Module, save_directory, is_main_process: bool = True, **kwargs) -> None:
    """``save_pretrained`` of a compressed transformers model: writes the compressed format, which
    ``load_compressed(save_directory)`` and ``from_pretrained`` reload (transformers' writer cannot write it)."""
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
