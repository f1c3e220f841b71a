"""GGUF export: a compressed causal LM (a saved folder or a model in memory) as one ``.gguf`` file that llama.cpp
and ``gguf`` read, with its hyperparameters, tokenizer and a report of what each tensor lost.

A weight is written from its codes when it can be (an svdq whole matrix on a llama.cpp block grid: Q8_0, Q4_0,
Q4_1; see ``gguf_blocks.exact_type``), a tensor a folder keeps as its GGUF source's blocks (``storage.source_gguf``)
as those blocks; every other 2-D weight is dequantized and encoded as ``type`` (``f16`` by default), vectors as
F32. Each tensor is then decoded with gguf-py's dequantizer and compared with the project's weight in GGUF's layout
(llama.cpp's row order and norm shift applied), so every error in the report is measured.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import UserInputError
from ..io import load_compressed, read_manifest
from ..io.structure import structured_layers
from ..layers.svdq import SVDQuantLinear
from ..modeltree import dense_view, is_hf_conv1d
from ..progress import bars_enabled, progress_bar
from ..utils.files import atomic_path
from .gguf_arch import Arch, arch_of, name_map, row_order, shift
from .config import TYPES
from .gguf_blocks import decode, encode, exact_type, fits, layer_blocks, qtype
from .gguf_vocab import add_tokenizer, find_tokenizer

log = logging.getLogger(__name__)


def export_gguf(model_or_folder: nn.Module | str | Path, path: str | Path, type: str = "f16",
                tokenizer: str | None = None) -> dict[str, Any]:
    """Write ``model_or_folder`` (a ``save_compressed`` folder, or a transformers causal LM, compressed or not)
    to ``path`` atomically; returns the report (per tensor its GGUF type, whether it is exact and its relative
    error ``||W_gguf - W|| / ||W||``; the totals). ``type`` is the type of weights that cannot be written from
    their codes (``f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1``). ``tokenizer``: a GGUF file, a source string
    (``gguf-package:...``, a folder with tokenizer files), ``"none"``, or None to take the folder's own or its
    run's ``model.source``."""
    try:
        import gguf
    except ImportError as err:
        raise UserInputError("GGUF export needs the `gguf` package: pip install gguf==0.19.0 (it is in the "
                             "project's `offline` extra)") from err
    if type not in TYPES:
        raise UserInputError(f"export type {type!r} is not one gguf-py can write and read back; use one of "
                             f"{', '.join(TYPES)}")
    folder, stored = None, {}
    if isinstance(model_or_folder, (str, Path)):
        folder = Path(model_or_folder)
        model = load_compressed(folder)  # checks every file's hash first
        stored = source_blocks(folder)
    else:
        model = model_or_folder
    config = getattr(model, "config", None)
    if config is None:
        raise UserInputError(f"GGUF export needs a transformers causal LM; got a {model.__class__.__name__} "
                             "without a config")
    arch = arch_of(config)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_model_name(config, folder))
    arch.hparams(config, writer)
    vocab = _tokenizer(writer, tokenizer if tokenizer is not None else find_tokenizer(folder), config.vocab_size)
    rows = _write_tensors(writer, model, arch, config, type, stored)
    writer.add_file_type(_file_type(rows))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with atomic_path(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=bars_enabled())
        writer.close()
    report = _report(rows, Path(path), arch, type, vocab)
    log_report(report)
    return report


def _model_name(config: Any, folder: Path | None) -> str:
    """``general.name``: the name a GGUF source gave the model (transformers keeps it), else the folder's or
    the checkpoint's name."""
    name = getattr(config, "_model_name_or_path", None)
    if name:
        return str(name)
    if folder is not None:
        return folder.resolve().parent.name if folder.name == "compressed" else folder.name
    return Path(str(getattr(config, "_name_or_path", "") or "model")).name


def _tokenizer(writer: Any, source: str | None, vocab_size: int) -> str | None:
    if source == "none":
        return None
    if source is None:
        log.warning("no tokenizer found (no tokenizer files in the folder, no model.source of its run): the GGUF "
                    "has no tokenizer.* fields, so llama.cpp cannot run it; give export.tokenizer=<source>")
        return None
    return add_tokenizer(writer, source, vocab_size)


def _weights(model: nn.Module) -> Iterator[tuple[str, Callable[[], torch.Tensor], nn.Module | None]]:
    """``(hf_name, tensor getter, structured layer or None)`` in state-dict order: a structured layer's weight
    (dequantized when asked, so one layer's floats exist at a time), then its bias; every other tensor as the
    model holds it (a GPT-2 ``Conv1D`` weight as ``out x in``, like every GGUF matrix); tied tensors once."""
    layers = structured_layers(model)
    done: set[str] = set()
    seen: set[tuple[int, int]] = set()
    conv1d = {f"{name}.weight": dense_view(module)[1] for name, module in model.named_modules()
              if is_hf_conv1d(module)}
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        while owner and owner not in layers:
            owner = owner.rpartition(".")[0]
        if owner:
            if owner not in done:
                done.add(owner)
                layer = layers[owner]
                yield f"{owner}.weight", layer.to_dense_weight, layer
                if layer.bias is not None:
                    yield f"{owner}.bias", lambda bias=layer.bias: bias, None
            continue
        tied = (tensor.data_ptr(), tensor.numel())
        if tied not in seen:
            seen.add(tied)
            yield key, lambda value=conv1d.get(key, tensor): value, None


def source_blocks(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    """State-dict key -> ``(ggml type, raw bytes)`` of the tensors ``folder`` keeps as its GGUF source's blocks
    (codec ``gguf``), tied names included."""
    from safetensors import safe_open

    manifest = read_manifest(folder)
    wanted = {key: entry["ggml_type"] for key, entry in manifest["tensors"].items() if entry["codec"] == "gguf"}
    found: dict[str, tuple[str, np.ndarray]] = {}
    for file in sorted(folder.glob("compressed*.safetensors")) if wanted else []:
        with safe_open(file, framework="np") as handle:
            for key in set(handle.keys()) & set(wanted):
                found[key] = (wanted[key].lower(), handle.get_tensor(key))
    found.update({alias: found[key] for alias, key in manifest.get("aliases", {}).items() if key in found})
    return found


def _write_tensors(writer: Any, model: nn.Module, arch: Arch, config: Any, kind: str,
                   stored: dict[str, tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Add every tensor to ``writer``; one report row per tensor (with the squared norms the totals need)."""
    to_gguf = name_map(arch, config)
    rows = []
    entries = list(_weights(model))
    with torch.no_grad(), progress_bar(len(entries), "GGUF tensors", unit="tensor") as bar:
        for hf_name, tensor, layer in entries:
            name = to_gguf(hf_name)
            target = tensor().detach().float().cpu().numpy()
            if shift(arch, name):
                target = target + np.float32(shift(arch, name))
            order = row_order(arch, config, name, target.shape[0])
            target = target if order is None else target[order]
            source = None if shift(arch, name) else stored.get(hf_name)
            data, written, origin = _encode(target, layer, kind, order, source)
            writer.add_tensor(name, data, raw_dtype=qtype(written))
            error = decode(data, written).reshape(target.shape).astype(np.float64) - target
            rows.append({"name": name, "hf_name": hf_name, "type": written, "from": origin,
                         "exact": not error.any(), "shape": list(target.shape), "_error_sq": float((error ** 2).sum()),
                         "_norm_sq": float((target.astype(np.float64) ** 2).sum())})
            bar.update()
    return rows


def _encode(target: np.ndarray, layer: nn.Module | None, kind: str, order: np.ndarray | None,
            source: tuple[str, np.ndarray] | None) -> tuple[np.ndarray, str, str]:
    """``(data, type, origin)`` of one tensor: the GGUF source's blocks the folder kept; from an svdq layer's
    codes when they fit a block type; else the float values encoded (vectors as f32; a row that is not whole
    blocks as f16)."""
    if source is not None:
        blocks = source[1].reshape(target.shape[0], -1) if target.ndim > 1 else source[1]
        return (blocks if order is None else blocks[order]), source[0], "source"
    exact = exact_type(layer) if isinstance(layer, SVDQuantLinear) else None
    if exact is not None:
        blocks = layer_blocks(layer, exact)
        return (blocks if order is None else blocks[order]), exact, "codes"
    written = "f32" if target.ndim < 2 else kind if fits(target.shape, kind) else "f16"
    return encode(target, written), written, "float"


def _file_type(rows: list[dict[str, Any]]) -> int:
    """llama.cpp's ``general.file_type``: the type holding most of the matrices' weights."""
    import gguf

    counts = Counter()
    for row in rows:
        if len(row["shape"]) > 1:
            counts[row["type"]] += math.prod(row["shape"])
    kind = counts.most_common(1)[0][0].upper() if counts else "F32"
    if kind == "F32":
        return gguf.LlamaFileType.ALL_F32
    names = gguf.LlamaFileType.__members__  # K-quants name a mix: Q4_K -> MOSTLY_Q4_K_M
    return names.get(f"MOSTLY_{kind}") or names.get(f"MOSTLY_{kind}_M") or gguf.LlamaFileType.GUESSED


def _relative(rows: list[dict[str, Any]]) -> float:
    norm = sum(row["_norm_sq"] for row in rows)
    return math.sqrt(sum(row["_error_sq"] for row in rows) / norm) if norm else 0.0


def _report(rows: list[dict[str, Any]], path: Path, arch: Arch, kind: str, vocab: str | None) -> dict[str, Any]:
    tensors = [{**{k: v for k, v in row.items() if not k.startswith("_")}, "rel_error": _relative([row])}
               for row in rows]
    from_codes = [row for row in rows if row["from"] == "codes"]
    from_source = [row for row in rows if row["from"] == "source"]
    return {"file": str(path), "bytes": path.stat().st_size, "architecture": arch.gguf_arch.lower(),
            "type": kind, "tokenizer": vocab, "tensors": tensors,
            "total": {"tensors": len(rows), "exact": sum(row["exact"] for row in rows),
                      "from_codes": len(from_codes), "from_source": len(from_source), "rel_error": _relative(rows),
                      "rel_error_matrices": _relative([row for row in rows if len(row["shape"]) > 1])}}


def log_report(report: dict[str, Any]) -> None:
    """The report as a table in the log: one line per tensor, then the totals."""
    lines = [f"{'tensor':<36} {'type':<5} {'from':<6} {'exact':<5} rel. error"]
    for row in report["tensors"]:
        lines.append(f"{row['name']:<36} {row['type']:<5} {row['from']:<6} {str(row['exact']).lower():<5} "
                     f"{row['rel_error']:.3e}")
    total = report["total"]
    lines.append(f"total: {total['exact']}/{total['tensors']} tensors exact ({total['from_codes']} from codes, "
                 f"{total['from_source']} the source's blocks), "
                 f"relative error {total['rel_error']:.3e} (matrices {total['rel_error_matrices']:.3e}); "
                 f"{report['bytes'] / 1e6:.1f} MB")
    log.info("GGUF export to %s:\n%s", report["file"], "\n".join(lines))
