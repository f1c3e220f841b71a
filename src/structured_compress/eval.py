"""``evaluate(cfg)``: rebuild the model a checkpoint records, test it, write metrics.json."""
from __future__ import annotations

import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from . import pipeline
from .utils.run_helpers import collect_run_metrics, instantiate_list, make_trainer, seed_run, write_metrics_json


def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Test ``cfg.ckpt_path`` (a checkpoint of this project's train mode); returns ``(metrics, objects)``."""
    if not cfg.get("ckpt_path"):
        raise ValueError("evaluation needs a checkpoint: add ckpt_path=/path/to/run/checkpoints/last.ckpt")
    start = time.perf_counter()
    seed_run(cfg)
    datamodule = instantiate(cfg.datamodule)
    built = pipeline.build(cfg, datamodule, checkpoint=cfg.ckpt_path)
    trainer = make_trainer(cfg, instantiate_list(cfg.get("callbacks")), instantiate_list(cfg.get("logger")))
    trainer.test(built.task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=False)
    metrics = collect_run_metrics(trainer.callback_metrics, built.report, cfg.layer, {
        "wall_time_s": round(time.perf_counter() - start, 2), "tested_checkpoint": str(cfg.ckpt_path),
        "tested_because": "ckpt_path given to mode=eval", "experiment": cfg.get("experiment_name")})
    if trainer.is_global_zero:
        write_metrics_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    return metrics, {"cfg": cfg, "task": built.task, "trainer": trainer}
