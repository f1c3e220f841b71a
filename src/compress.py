"""``compress(cfg)``: post-training compression -- evaluate, calibrate, compress, evaluate, save.

No training: the pretrained model is tested, its layers replaced as the ``layer`` config says (with
calibration batches for data-aware types), tested again, and written with ``save_compressed``; metrics.json
holds both evaluations, the true bytes on disk and the ratio to the dense fp32/fp16 checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from .io import folder_sizes, save_compressed
from .utils.run_helpers import apply_layer_config, collect_run_metrics, instantiate_list, write_metrics_json


def dense_bytes(model: torch.nn.Module, bytes_per_value: int) -> int:
    """Size of the model's state dict with every floating number at ``bytes_per_value`` bytes (other tensors at
    their own size, tied tensors once): the dense checkpoint ``folder_sizes`` compares a save against."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * (bytes_per_value if tensor.is_floating_point() else tensor.element_size())
    return total


def size_metrics(saved_dir: str | Path) -> dict:
    """The size figures metrics.json reports for a ``save_compressed`` folder: bytes on disk, ratios to the
    dense fp32/fp16 checkpoint, and the per-part breakdown (replaced layers, embeddings, rest)."""
    return folder_sizes(saved_dir)


def compress(cfg: DictConfig) -> tuple[dict, dict]:
    """Post-training compression run; returns ``(metrics, objects)``."""
    start = time.perf_counter()
    datamodule = instantiate(cfg.datamodule)
    task = instantiate(cfg.task, model=instantiate(cfg.model))
    trainer = instantiate(cfg.trainer, callbacks=instantiate_list(cfg.get("callbacks")),
                          logger=instantiate_list(cfg.get("logger")) or False)
    baseline = trainer.test(task, datamodule=datamodule)[0] if cfg.mode.get("eval_baseline", True) else {}

    compress_start = time.perf_counter()
    report = apply_layer_config(task, cfg.layer, datamodule)
    compress_seconds = time.perf_counter() - compress_start
    trainer.test(task, datamodule=datamodule)

    out_dir = save_compressed(task.model, Path(cfg.paths.output_dir) / "compressed", report)
    metrics = collect_run_metrics(trainer.callback_metrics, report, cfg.layer, {
        "baseline_metrics": {k: float(v) for k, v in baseline.items()},
        **size_metrics(out_dir),
        "compress_time_s": round(compress_seconds, 2), "wall_time_s": round(time.perf_counter() - start, 2),
        "compressed_path": str(out_dir.resolve()), "experiment": cfg.get("experiment_name"),
    })
    write_metrics_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    return metrics, {"cfg": cfg, "task": task, "trainer": trainer, "report": report}
