"""``train(cfg)``: build the compressed model through the pipeline, fit (or resume), test, write metrics.json."""
from __future__ import annotations

import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from . import pipeline
from .utils.report_logging import log_report
from .utils.resume import resume_checkpoint
from .utils.run_helpers import (collect_run_metrics, instantiate_list, make_trainer, seed_run, tested_checkpoint,
                                write_metrics_json)


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train (optionally) and test the compressed model; returns ``(metrics, objects)``."""
    start = time.perf_counter()
    seed_run(cfg)
    resume_from = resume_checkpoint(cfg.get("ckpt_path"), cfg.get("resume"), cfg.paths.output_dir)
    datamodule = instantiate(cfg.datamodule)
    built = pipeline.build(cfg, datamodule, checkpoint=resume_from)
    callbacks = instantiate_list(cfg.get("callbacks"))
    trainer = make_trainer(cfg, callbacks + pipeline.run_callbacks(cfg, built.report), instantiate_list(cfg.get("logger")),
                           built.resumed_step)
    if built.report is not None and resume_from is None:  # a resumed run's loggers hold it already
        log_report(trainer.loggers, built.report)

    fit_metrics = {}
    if cfg.get("train", True):
        trainer.fit(built.task, datamodule=datamodule, ckpt_path=resume_from, weights_only=False)
        fit_metrics = dict(trainer.callback_metrics)  # trainer.test() clears them
    train_seconds = time.perf_counter() - start
    tested = {}
    if cfg.get("test", True):
        tested = tested_checkpoint(trainer, fallback=None if cfg.get("train", True) else resume_from)
        trainer.test(built.task, datamodule=datamodule, ckpt_path=tested["tested_checkpoint"], weights_only=False)

    metrics = collect_run_metrics({**fit_metrics, **trainer.callback_metrics}, built.report, cfg.layer, {
        "wall_time_s": round(time.perf_counter() - start, 2), "train_time_s": round(train_seconds, 2),
        "experiment": cfg.get("experiment_name"), "output_dir": str(Path(cfg.paths.output_dir).resolve()),
        "resumed_from": str(resume_from) if resume_from else None, **tested,
    })
    if trainer.is_global_zero:
        write_metrics_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "task": built.task, "trainer": trainer,
                     "report": built.report}
