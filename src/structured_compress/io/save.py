"""Writing a compressed folder, in one piece (:func:`save_compressed`) or part by part
(:class:`CompressedWriter`: the sequential engine writes each block's part as soon as the block is done).

A part is a set of state tensors (with the structured layers among them) encoded under the storage policy
and streamed to its own shard (see ``shards``). The last part carries the sealed manifest body, which lists
every part's layers and tensors and every earlier shard's size and sha256; ``manifest.json`` is written last.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import UserInputError
from ..layers import StructuredLinear
from .dense_weights import DenseWeights
from .gguf_source import SourceBlocks, read_source_blocks
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, SEAL_KEY, canonical_json
from .shards import INDEX_FILE, PART_KEY, file_digest, read_part, shard_name, write_index, write_shard
from .source import describe_source, write_hf_config
from .storage import SAVE_WIDER, StoragePolicy, choose_codec, decode, dtype_name, embedding_keys, encode, model_dtype
from .structure import layer_entry, layer_problems, structured_layers

log = logging.getLogger(__name__)
CHECK_ROWS = 4096  # rows of an in-memory tensor checked against GGUF source blocks at a time


def _unique_keys(state: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[str, str]]:
    """Keys to store, and aliases (key -> stored key) for tensors that are the same view of the same memory
    as an earlier one (tied weights)."""
    keys, aliases, seen = [], {}, {}
    for key, tensor in state.items():
        storage = tensor.untyped_storage()  # meta tensors have no address: their storage object tells ties apart
        view = (tensor.device, storage._cdata if tensor.is_meta else storage.data_ptr(), tensor.storage_offset(),
                tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and view in seen:
            aliases[key] = seen[view]
        else:
            seen[view] = key
            keys.append(key)
    return keys, aliases


def _encoded_from_checkpoint(weights: DenseWeights | None, key: str, tied: list[str], dtype: torch.dtype,
                             entry: dict[str, Any], gram: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The file tensors of ``key`` read from ``weights`` (under whichever of the ``tied`` names the checkpoint
    holds it): a cast read straight into its stored dtype, chunk by chunk, so an LLM's embedding is never held
    in full precision and stored precision at once."""
    if weights is None:
        raise ValueError(f"tensor {key!r} is on the meta device: pass weights= (the DenseWeights the model's "
                         "blocks were read from) to read it from the checkpoint")
    name = next((name for name in tied if name in weights), key)
    if entry["codec"] != "cast":
        return encode(key, weights.read(name, dtype), entry, gram)
    return {key: weights.read(name, getattr(torch, entry["stored_dtype"]), SAVE_WIDER)}


def exact_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the structured layers' ``exact_tensors`` (kept in their own dtype by a save)."""
    return {f"{name}.{tensor}" if name else tensor for name, module in model.named_modules()
            if isinstance(module, StructuredLinear) for tensor in module.exact_tensors}


@dataclass
class Part:
    """One shard's share of the manifest: its structured layers, tensor table and aliases, and the report
    rows of its layers (so a resumed run can report them)."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    report: list[dict[str, Any]] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)


class CompressedWriter:
    """Writes the folder ``directory`` in ``parts`` parts, in order; the last one (:meth:`finish`) seals it.

    ``dtype`` is the whole model's floating dtype (it picks the storage dtype once for every part);
    ``fingerprint`` identifies the run: a part already on disk from a run with the same fingerprint counts as
    done (:meth:`done_part`), one from another run is an error rather than silently mixed in. ``model`` (its
    state-dict names; meta tensors suffice) is needed only when the policy keeps a GGUF source's blocks.
    """

    def __init__(self, directory: str | Path, parts: int = 1, storage=None, dtype: torch.dtype = torch.float32,
                 fingerprint: Mapping[str, Any] | None = None, model: nn.Module | None = None):
        self.directory, self.parts = Path(directory), parts
        self.policy = StoragePolicy.from_config(storage)
        self.model_dtype, self.storage_dtype = dtype, self.policy.storage_dtype(dtype)
        self.fingerprint = dict(fingerprint or {})
        self.written: list[tuple[Part, dict[str, Any]]] = []  # (part, shard entry) of parts 0..k-1
        self.source_blocks: SourceBlocks | None = None
        if self.policy.source_gguf is not None:
            if model is None:
                raise ValueError("storage.source_gguf: pass the model to CompressedWriter(..., model=) so the GGUF's "
                                 "tensor names can be mapped to its state-dict keys")
            self.source_blocks = read_source_blocks(model, self.policy.source_gguf)

    def _kept_blocks(self, key: str, tensor: torch.Tensor, tied: list[str],
                     weights: DenseWeights | None) -> tuple[dict[str, Any], torch.Tensor] | None:
        """``(table entry, raw bytes)`` when the policy keeps the GGUF source's blocks for ``key`` (under any
        of its ``tied`` names) and they decode to exactly the tensor (read from ``weights`` if it is on meta)."""
        name = next((name for name in tied if self.source_blocks.blocks.get(name)), None)
        if name is None:
            return None
        entry = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "codec": "gguf"}
        if not tensor.is_meta:
            chunks = tensor.reshape(-1, tensor.shape[-1]).split(CHECK_ROWS) if tensor.dim() else []
        elif weights is not None:
            chunks = weights.rows(next((n for n in tied if n in weights), key), tensor.dtype)
        else:
            return None
        kept = self.source_blocks.matching(name, list(tensor.shape), chunks)
        if kept is None:
            return None
        ggml_type, raw = kept
        return {**entry, "ggml_type": ggml_type}, raw

    def done_part(self, index: int) -> Part | None:
        """Part ``index`` as an earlier run with this fingerprint left it on disk (None: not written yet)."""
        path = self.directory / shard_name(index, self.parts)
        if not path.is_file() or index >= self.parts - 1:
            return None
        recorded = read_part(path)
        if recorded is None or recorded.get("fingerprint") != canonical_json(self.fingerprint):
            raise UserInputError(f"{path} was written by another run (other settings or model); delete "
                                 f"{self.directory} or write to another folder")
        entry = {"file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path)}
        part = Part(recorded["layers"], recorded["tensors"], recorded["aliases"], recorded["report"])
        self.written.append((part, entry))
        return part

    def _encode(self, state: Mapping[str, torch.Tensor], layers: list[dict[str, Any]], embeddings: list[str],
                grams: Mapping[str, torch.Tensor] | None, exact: set[str],
                weights: DenseWeights | None = None) -> tuple[Part, dict, dict]:
        """The part's table, its file tensors, and per lossily stored tensor the value loading returns."""
        keys, aliases = _unique_keys(state)
        prefixes = tuple(entry["name"] + "." for entry in layers)
        in_layer = {key: key.startswith(prefixes) for key in keys}
        embeddings = sorted({aliases.get(k, k) for k in embeddings} & set(keys) - {k for k in keys if in_layer[k]})
        grams = {aliases.get(k, k): gram for k, gram in (grams or {}).items()}
        policy = self.policy
        if policy.embeddings != "none" and policy.embeddings_rounding == "gptq" and embeddings \
                and not set(grams) & set(embeddings):
            raise ValueError("storage.embeddings_rounding=gptq needs the Gram matrix of the LM head's inputs: pass "
                             "save_compressed(..., calibration=collect_output_embedding_gram(model, batches)) "
                             f"(embedding keys: {embeddings})")
        part, files, rounded = Part(layers=layers, aliases=aliases, embeddings=embeddings), {}, {}
        storages: set[int] = set()
        for key in keys:
            tensor = state[key].detach()
            tied = [key, *(alias for alias, target in aliases.items() if target == key)]
            kept = None if self.source_blocks is None or in_layer[key] or key in exact else \
                self._kept_blocks(key, tensor, tied, weights)
            if kept is not None:  # the source file's own blocks: exact, so nothing to round in place
                part.tensors[key], files[key] = kept
                continue
            if tensor.is_meta:  # freed by a block-by-block run: read from the checkpoint, straight into its codec
                entry = choose_codec(tensor, in_layer[key], key in embeddings, policy, self.storage_dtype,
                                     grams.get(key), key in exact)
                files.update(_encoded_from_checkpoint(weights, key, tied, tensor.dtype, entry, grams.get(key)))
                part.tensors[key] = entry
                continue
            # the model's own CPU tensor where it can be written as it is (no second copy of a 7B model's
            # embeddings); a copy where it lives elsewhere or shares memory with another stored tensor
            pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
            if tensor.device.type != "cpu" or not tensor.is_contiguous() or pointer in storages:
                tensor = tensor.to("cpu", copy=True).contiguous()
            storages.add(pointer)
            entry = choose_codec(tensor, in_layer[key], key in embeddings, policy, self.storage_dtype,
                                 grams.get(key), key in exact)
            stored = encode(key, tensor, entry, grams.get(key))
            if entry["codec"] == "cast":  # rounding in place casts the stored copy back: no decoded copy
                rounded[key] = stored[key]
            elif entry["codec"] in ("int8", "int4"):
                rounded[key] = decode(key, entry, stored)
            files.update(stored)
            part.tensors[key] = entry
        described = {**part.tensors, **{alias: part.tensors[target] for alias, target in aliases.items()}}
        problems = [line for entry in layers for line in layer_problems(entry, described)]
        if problems:
            raise ValueError("cannot save: a layer's config() does not rebuild its state (e.g. QAT still on):\n  "
                             + "\n  ".join(problems))
        return part, files, rounded

    @staticmethod
    def _round_in_place(state: Mapping[str, torch.Tensor], rounded: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, value in rounded.items():
                state[key].copy_(value)  # the model in memory is now the one on disk

    def write_part(self, state: Mapping[str, torch.Tensor], layers: list[dict[str, Any]],
                   report: list[dict[str, Any]] | None = None, exact: set[str] = frozenset()) -> Part:
        """Encode and write the next part (not the last): ``state`` holds its tensors under their full
        names, ``layers`` the entries of its structured layers. Stored-lossily tensors are rounded in place."""
        index = len(self.written)
        if index >= self.parts - 1:
            raise ValueError(f"part {index} of {self.parts} is the last one: write it with finish()")
        part, files, rounded = self._encode(state, layers, [], None, exact)
        part.report = list(report or [])
        recorded = {"fingerprint": canonical_json(self.fingerprint), "layers": part.layers, "tensors": part.tensors,
                    "aliases": part.aliases, "report": part.report}
        entry = write_shard(self.directory / shard_name(index, self.parts), files,
                            {PART_KEY: canonical_json(recorded)})
        self._round_in_place(state, rounded)
        self.written.append((part, entry))
        return part

    def finish(self, model: nn.Module, source: Any = None, report=None,
               calibration: Mapping[str, torch.Tensor] | None = None, weights: DenseWeights | None = None) -> Path:
        """Write the last part -- every tensor and structured layer of ``model`` that no earlier part holds --,
        the index and the manifest. ``weights``: the dense checkpoint the tensors ``model`` holds on the meta
        device are read from (a block-by-block run with ``release`` frees everything outside the blocks)."""
        if len(self.written) != self.parts - 1:
            raise ValueError(f"finish() after {len(self.written)} of {self.parts - 1} earlier parts")
        done = {key for part, _ in self.written for key in [*part.tensors, *part.aliases]}
        done_layers = {entry["name"] for part, _ in self.written for entry in part.layers}
        state = {key: value for key, value in model.state_dict().items() if key not in done}
        layers = [layer_entry(name, module) for name, module in structured_layers(model).items()
                  if name not in done_layers]
        exact = exact_keys(model) - done
        last, files, rounded = self._encode(state, layers, embedding_keys(model), calibration, exact, weights)
        parts = [part for part, _ in self.written] + [last]
        body = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "layers": [entry for part in parts for entry in part.layers],
            "aliases": {k: v for part in parts for k, v in part.aliases.items()},
            "tensors": {k: v for part in parts for k, v in part.tensors.items()},
            "embeddings": sorted({key for part in parts for key in part.embeddings}),
            "source": describe_source(model, source),
            "report": report.to_dict() if hasattr(report, "to_dict") else report,
            "storage": {"dtype": dtype_name(self.storage_dtype), **self.policy.describe(),
                        "model_dtype": dtype_name(self.model_dtype)},
            "shards": [entry for _, entry in self.written],
        }
        weights = write_shard(self.directory / shard_name(self.parts - 1, self.parts), files,
                              {SEAL_KEY: canonical_json(body)})
        if self.parts > 1:
            weight_map = {key: entry["file"] for (part, entry) in [*self.written, (last, weights)]
                          for key in part.tensors}
            write_index(self.directory, weight_map, sum(e["bytes"] for _, e in self.written) + weights["bytes"])
        write_hf_config(model, self.directory)
        from ..utils.files import atomic_write_text  # deferred: that module imports Lightning
        atomic_write_text(self.directory / MANIFEST_FILE, json.dumps({**body, "weights": weights}, indent=1,
                                                                     sort_keys=True))
        self._round_in_place(state, rounded)
        log.info("saved %d structured layers, %d tensors in %d file(s) (%d bytes; untouched tensors in %s) to %s",
                 len(body["layers"]), len(body["tensors"]), self.parts,
                 sum(e["bytes"] for _, e in self.written) + weights["bytes"], body["storage"]["dtype"],
                 self.directory)
        return self.directory


def save_compressed(model: nn.Module, path: str | Path, report=None, source=None, storage=None,
                    calibration: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (after ``compress_``) to the directory ``path`` in one file; returns it.

    report: a ``CompressionReport`` (or a plain dict) stored in the manifest for reference.
    source: how to rebuild the dense model on load (see ``structured_compress.io.source``): a source spec or a
        Hydra model config; ``None`` records a transformers model's class and config, and nothing for other
        models (then loading needs a skeleton).
    storage: a ``StoragePolicy`` or a dict (``dtype``, ``embeddings``, ``group_size``, ``zero_point``,
        ``embeddings_rounding``, ``rest``, ``source_gguf``) for the tensors no structured layer owns; default fp16
        (or the model's own half dtype).
    calibration: per state-dict key of an output embedding (e.g. ``lm_head.weight``), the Gram matrix of its
        inputs, for ``embeddings_rounding: gptq`` (``structured_compress.surgery.collect_output_embedding_gram``).
    Once the files are written, tensors stored lossily are rounded *in place* in ``model`` to what was saved,
    so evaluating ``model`` afterwards measures the saved model.
    """
    for stale in [Path(path) / INDEX_FILE, *Path(path).glob("compressed-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a sharded save of an earlier run in this folder
    return CompressedWriter(path, 1, storage, dense_dtype(model), model=model).finish(model, source, report,
                                                                                  calibration)


def dense_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of most of ``model``'s tensors outside its structured layers (meta ones count): what
    picks the storage dtype."""
    prefixes = tuple(name + "." for name in structured_layers(model))
    return model_dtype({k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)})
