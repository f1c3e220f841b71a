"""What the compression benchmarks share: the named codecs, and one compress -> save -> reload round trip that
measures time and true bytes on disk (``compress_minilm.py``, ``compress_efficientnet.py``)."""
from __future__ import annotations

import copy
import pathlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from structured_compress.io import folder_sizes
from structured_compress.io import load_compressed, save_compressed
from structured_compress.modeltree import select_layers
from structured_compress.surgery import collect_input_gram, compress_


@dataclass(frozen=True)
class Codec:
    layer: str
    budget: float = 1.0
    options: dict = field(default_factory=dict)
    calibrate: bool = False  # data-aware: needs the layers' calibration inputs / Gram matrices


CODECS = {
    "lowrank-0.5": Codec("lowrank", 0.5),
    "lowrank-whiten-0.5": Codec("lowrank", 0.5, {"init": "whiten"}, calibrate=True),
    "svdq-int8-e0.05": Codec("svdq", options={"bits": 8, "max_error": 0.05}, calibrate=True),
    "svdq-int4-g64-e0.1": Codec("svdq", options={"bits": 4, "group_size": 64, "max_error": 0.1}, calibrate=True),
    "hyper": Codec("hyper"),
    "tsvd-0.05": Codec("tsvd", options={"tolerance": 0.05}),
}


def compress_copy(original: nn.Module, codec: Codec, include: list[str], calibration_batches: Iterable,
                  forward: Callable[[nn.Module, object], object]) -> tuple[nn.Module, dict]:
    """A copy of ``original`` compressed with ``codec`` (timed, calibration included) and its stats."""
    model = copy.deepcopy(original)
    start = time.perf_counter()
    stats = None
    if codec.calibrate:
        stats = collect_input_gram(model, calibration_batches, select_layers(model, include), forward=forward)
    report = compress_(model, codec.layer, codec.budget, include=include, options=codec.options, calibration=stats)
    return model, {"compress_s": round(time.perf_counter() - start, 2), "threads": torch.get_num_threads(),
                   "replaced_layers": len(report.layers)}


def save_reload(model: nn.Module, skeleton: Callable[[], nn.Module], storage=None,
                calibration=None, measure: Callable[[pathlib.Path], dict] | None = None) -> tuple[nn.Module, dict]:
    """Save ``model`` under the storage policy ``storage`` (``calibration``: its Gram matrices, see
    ``save_compressed``), load it into ``skeleton()``, return ``(restored model, size figures)``; ``measure``
    adds its figures of the saved folder (e.g. a GGUF export of it)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_compressed(model, pathlib.Path(tmp) / "model", storage=storage, calibration=calibration)
        sizes = folder_sizes(folder) | (measure(folder) if measure else {})
        restored = load_compressed(folder, skeleton()).eval()
    return restored, sizes


def round_trip(original: nn.Module, codec: Codec, include: list[str], calibration_batches: Iterable,
               forward: Callable[[nn.Module, object], object],
               skeleton: Callable[[], nn.Module]) -> tuple[nn.Module, dict]:
    """Compress a copy of ``original`` with ``codec`` (timed, calibration included), save it, load it into
    ``skeleton()`` and return ``(restored model, stats)``; stats hold time, bytes on disk and ratios."""
    model, stats = compress_copy(original, codec, include, calibration_batches, forward)
    restored, sizes = save_reload(model, skeleton)
    return restored, {**stats, **sizes}
