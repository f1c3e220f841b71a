"""``evaluate(cfg)``: rebuild the compressed model, load a checkpoint, test it, write metrics.json."""
from __future__ import annotations

import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from .utils.run_helpers import apply_layer_config, collect_run_metrics, instantiate_list, write_metrics_json


def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Test ``cfg.ckpt_path`` (a Lightning checkpoint of the same experiment); returns ``(metrics, objects)``."""
    if not cfg.get("ckpt_path"):
        raise ValueError("evaluation needs a checkpoint: add ckpt_path=/path/to/run/checkpoints/last.ckpt")
    if not Path(cfg.ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
    start = time.perf_counter()
    datamodule = instantiate(cfg.datamodule)
    task = instantiate(cfg.task, model=instantiate(cfg.model))
    report = apply_layer_config(task, cfg.layer)
    trainer = instantiate(cfg.trainer, callbacks=instantiate_list(cfg.get("callbacks")),
                          logger=instantiate_list(cfg.get("logger")) or False)
    trainer.test(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=False)
    metrics = collect_run_metrics(trainer.callback_metrics, report, cfg.layer, {"wall_time_s": round(time.perf_counter() - start, 2),
                                                               "ckpt_path": str(cfg.ckpt_path)})
    write_metrics_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    return metrics, {"cfg": cfg, "task": task, "trainer": trainer}
