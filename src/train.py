"""``train(cfg)``: instantiate datamodule, model, surgery, task, callbacks, loggers and trainer; fit and test."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .utils.run_helpers import apply_layer_config, collect_run_metrics, instantiate_list, write_metrics_json

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train (optionally) and test the compressed model; returns ``(metrics, objects)``."""
    start = time.perf_counter()
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.datamodule)
    task = instantiate(cfg.task, model=instantiate(cfg.model))
    report = apply_layer_config(task, cfg.layer, datamodule)
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = instantiate_list(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    fit_metrics = {}
    if cfg.get("train", True):
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        fit_metrics = dict(trainer.callback_metrics)  # trainer.test() clears them
    train_seconds = time.perf_counter() - start
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt = best if cfg.get("train", True) and best else (None if cfg.get("train", True) else cfg.get("ckpt_path"))
        trainer.test(task, datamodule=datamodule, ckpt_path=ckpt, weights_only=False)

    metrics = collect_run_metrics({**fit_metrics, **trainer.callback_metrics}, report, cfg.layer, {
        "wall_time_s": round(time.perf_counter() - start, 2), "train_time_s": round(train_seconds, 2),
        "experiment": cfg.get("experiment_name"), "output_dir": str(Path(cfg.paths.output_dir).resolve()),
    })
    write_metrics_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "task": task, "trainer": trainer, "report": report}
