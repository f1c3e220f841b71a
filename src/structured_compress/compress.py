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
from omegaconf import DictConfig, OmegaConf

from . import pipeline
from .io import folder_sizes, save_compressed
from .utils.report_logging import log_report
from .utils.run_helpers import collect_run_metrics, instantiate_list, make_trainer, seed_run, write_metrics_json


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
    seed_run(cfg)
    datamodule = instantiate(cfg.datamodule)
    task = pipeline.build_pretrained_task(cfg)
    trainer = make_trainer(cfg, instantiate_list(cfg.get("callbacks")), instantiate_list(cfg.get("logger")))
    baseline = trainer.test(task, datamodule=datamodule)[0] if cfg.mode.get("eval_baseline", True) else {}

    compress_start = time.perf_counter()
    report = pipeline.compress_task_model(task, cfg.layer, datamodule)
    compress_seconds = time.perf_counter() - compress_start
    # save first: storing the untouched tensors at the storage dtype rounds them in the model too, so the test
    # below scores exactly the saved model (rank 0 saves; other DDP ranks keep the unrounded tensors)
    out_dir = Path(cfg.paths.output_dir) / "compressed"
    if trainer.is_global_zero:
        storage = OmegaConf.to_container(cfg.mode.storage, resolve=True) if cfg.mode.get("storage") else None
        head_gram = pipeline.output_embedding_calibration(task, storage, int(cfg.layer.get("calibration_batches") or 8),
                                                          datamodule)
        save_compressed(task.model, out_dir, report, source=pipeline.dense_model_factory_config(cfg),
                        storage=storage, calibration=head_gram)
    trainer.test(task, datamodule=datamodule)

    metrics = collect_run_metrics(trainer.callback_metrics, report, cfg.layer, {
        "baseline_metrics": {k: float(v) for k, v in baseline.items()},
        "compress_time_s": round(compress_seconds, 2), "experiment": cfg.get("experiment_name"),
        "compressed_path": str(out_dir.resolve()),
    })
    if trainer.is_global_zero:
        metrics.update(size_metrics(out_dir), wall_time_s=round(time.perf_counter() - start, 2))
        log_report(trainer.loggers, report, size_metrics(out_dir))
        write_metrics_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    return metrics, {"cfg": cfg, "task": task, "trainer": trainer, "report": report}
