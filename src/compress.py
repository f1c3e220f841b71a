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

from . import pipeline
from .io import save_compressed
from .io.compressed_format import structured_layers
from .layers import StructuredConv2d
from .utils.run_helpers import collect_run_metrics, instantiate_list, make_trainer, seed_run, write_metrics_json


def dense_bytes(model: torch.nn.Module, bytes_per_value: int) -> int:
    """Size of the model's state dict stored at ``bytes_per_value`` per number (tied tensors once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * bytes_per_value
    return total


def structured_bytes(model: torch.nn.Module) -> int:
    """Bytes of the structured layers' stored state: what the codec is responsible for (embeddings, norms and
    untouched layers excluded)."""
    return sum((layer.linear if isinstance(layer, StructuredConv2d) else layer).storage_bytes()
               for layer in structured_layers(model).values())


def size_metrics(dense_fp32_bytes: int, dense_fp16_bytes: int, compressed: torch.nn.Module, report,
                 saved_dir: str | Path) -> dict:
    """True bytes on disk of a ``save_compressed`` folder and its ratios: the whole save against the dense
    model at fp32/fp16 (``dense_bytes`` taken before surgery), the replaced layers against their fp32 weights."""
    disk = sum(f.stat().st_size for f in Path(saved_dir).iterdir() if f.is_file())
    replaced_fp32, replaced = report.params_before * 4, structured_bytes(compressed)
    return {"bytes_on_disk": disk, "dense_fp32_bytes": dense_fp32_bytes, "dense_fp16_bytes": dense_fp16_bytes,
            "ratio_vs_fp32": round(dense_fp32_bytes / disk, 3), "ratio_vs_fp16": round(dense_fp16_bytes / disk, 3),
            "replaced_fp32_bytes": replaced_fp32, "replaced_bytes": replaced,
            "replaced_ratio_vs_fp32": round(replaced_fp32 / max(1, replaced), 3)}


def compress(cfg: DictConfig) -> tuple[dict, dict]:
    """Post-training compression run; returns ``(metrics, objects)``."""
    start = time.perf_counter()
    seed_run(cfg)
    datamodule = instantiate(cfg.datamodule)
    task = pipeline.build_pretrained_task(cfg)
    trainer = make_trainer(cfg, instantiate_list(cfg.get("callbacks")), instantiate_list(cfg.get("logger")))
    baseline = trainer.test(task, datamodule=datamodule)[0] if cfg.mode.get("eval_baseline", True) else {}
    fp32_bytes, fp16_bytes = dense_bytes(task.model, 4), dense_bytes(task.model, 2)

    compress_start = time.perf_counter()
    report = pipeline.compress_task_model(task, cfg.layer, datamodule)
    compress_seconds = time.perf_counter() - compress_start
    trainer.test(task, datamodule=datamodule)

    metrics = collect_run_metrics(trainer.callback_metrics, report, cfg.layer, {
        "baseline_metrics": {k: float(v) for k, v in baseline.items()},
        "compress_time_s": round(compress_seconds, 2), "experiment": cfg.get("experiment_name"),
    })
    if trainer.is_global_zero:
        out_dir = save_compressed(task.model, Path(cfg.paths.output_dir) / "compressed", report)
        metrics.update(size_metrics(fp32_bytes, fp16_bytes, task.model, report, out_dir),
                       compressed_path=str(out_dir.resolve()), wall_time_s=round(time.perf_counter() - start, 2))
        write_metrics_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    return metrics, {"cfg": cfg, "task": task, "trainer": trainer, "report": report}
