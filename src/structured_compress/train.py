"""``train(cfg)``: build the compressed model through the pipeline, fit (or resume), test, write metrics.json."""
from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig

from . import pipeline
from .runner import RunState, Steps, run
from .utils.checkpoints import lightning_weights_only
from .utils.report_logging import log_report
from .utils.resume import resume_checkpoint
from .utils.run_helpers import tested_checkpoint


class TrainSteps(Steps):
    """mode=train: the compressed model (or the structure of ``ckpt_path`` / ``resume``), fitted unless
    ``train=false``, tested at the best validated checkpoint."""

    def __init__(self) -> None:
        self.resume_from: Path | None = None

    def build(self, cfg: DictConfig, datamodule: pl.LightningDataModule) -> pipeline.Built:
        self.resume_from = resume_checkpoint(cfg.get("ckpt_path"), cfg.get("resume"), cfg.paths.output_dir,
                                             trust=bool(cfg.get("trust_checkpoint")))
        return pipeline.build(cfg, datamodule, checkpoint=self.resume_from)

    def callbacks(self, cfg: DictConfig, built: pipeline.Built) -> list[pl.Callback]:
        return pipeline.run_callbacks(cfg, built.report)

    def work(self, state: RunState) -> None:
        if state.built.report is not None and self.resume_from is None:  # a resumed run's loggers hold it already
            log_report(state.trainer.loggers, state.built.report)
        if state.cfg.train:
            state.trainer.fit(state.built.task, datamodule=state.datamodule, ckpt_path=self.resume_from,
                              weights_only=lightning_weights_only(bool(state.cfg.get("trust_checkpoint"))))
            state.fit_metrics = dict(state.trainer.callback_metrics)
        state.facts.update(train_time_s=round(time.perf_counter() - state.started, 2),
                           resumed_from=str(self.resume_from) if self.resume_from else None)

    def tested(self, state: RunState) -> dict:
        return tested_checkpoint(state.trainer, fallback=None if state.cfg.train else self.resume_from)


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Train (unless ``train=false``) and test the compressed model; returns ``(metrics, objects)``."""
    return run(cfg, TrainSteps())
