"""``evaluate(cfg)``: rebuild the model a checkpoint records, test it, write metrics.json."""
from __future__ import annotations

import lightning.pytorch as pl
from omegaconf import DictConfig

from . import pipeline
from .errors import ConfigError
from .runner import RunState, Steps, run


class EvalSteps(Steps):
    """mode=eval: the structure and weights of ``ckpt_path`` (a checkpoint of this project's train mode)."""

    def build(self, cfg: DictConfig, datamodule: pl.LightningDataModule) -> pipeline.Built:
        built = pipeline.build(cfg, datamodule, checkpoint=cfg.ckpt_path)
        return pipeline.Built(built.task, built.report)  # a new run folder: its loggers start fresh

    def tested(self, state: RunState) -> dict:
        return {"tested_checkpoint": str(state.cfg.ckpt_path), "tested_because": "ckpt_path given to mode=eval"}


def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Test ``cfg.ckpt_path``; returns ``(metrics, objects)``."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path=null: mode=eval tests a checkpoint but none was given; "
                          "add ckpt_path=<run dir>/checkpoints/last.ckpt")
    return run(cfg, EvalSteps())
