"""Glue between Hydra configs and Lightning: seeding, the trainer, which checkpoint is tested, metrics.json."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..surgery import CompressionReport
from .files import atomic_write_text

log = logging.getLogger(__name__)


def seed_run(cfg: DictConfig) -> None:
    """Seed every generator (and the data order, through ``PL_GLOBAL_SEED``) from ``cfg.seed``."""
    if cfg.get("seed") is not None:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers); skip null entries."""
    if not group:
        return []
    return [instantiate(cfg) for cfg in group.values() if isinstance(cfg, DictConfig) and "_target_" in cfg]


def make_trainer(cfg: DictConfig, callbacks: list, loggers: list, resumed_step: int | None = None) -> pl.Trainer:
    """The Lightning trainer of ``cfg.trainer``; sync BatchNorm only where it can run (CUDA), loggers told
    where a resumed run continues so their history stays one unbroken record."""
    overrides = {}
    if cfg.trainer.get("sync_batchnorm") and not torch.cuda.is_available():
        overrides["sync_batchnorm"] = False
        log.info("sync_batchnorm needs CUDA; BatchNorm statistics stay per process on this machine")
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
    if resumed_step is not None:
        for logger in loggers:
            if hasattr(logger, "resume_at"):
                logger.resume_at(resumed_step)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer


def tested_checkpoint(trainer: pl.Trainer, fallback: str | Path | None = None) -> dict[str, Any]:
    """Which weights ``trainer.test`` should score, and why: the best checkpoint by the monitored validation
    metric (saved only right after validation, so its score is current), else the final weights."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.monitor and callback.best_model_path:
        score = callback.best_model_score
        return {"tested_checkpoint": callback.best_model_path,
                "tested_because": f"best {callback.monitor} ({float(score):.4f}) among validated checkpoints"
                                  if score is not None else f"best {callback.monitor}"}
    if fallback is not None:
        return {"tested_checkpoint": str(fallback), "tested_because": "the checkpoint given (ckpt_path)"}
    return {"tested_checkpoint": None, "tested_because": "final weights (no validated checkpoint)"}


def collect_run_metrics(logged: dict, report: CompressionReport | None, layer_cfg: DictConfig,
                        extra: dict) -> dict:
    """Everything a results table needs from one run (``logged``: Lightning's callback metrics), as JSON."""
    metrics = {k: float(v) for k, v in logged.items() if v.numel() == 1}
    out = {
        "metrics": {k: v for k, v in sorted(metrics.items()) if not k.startswith(("train/", "lr-"))},
        "train_loss": metrics.get("train/loss"),
        "layer_type": (OmegaConf.to_container(layer_cfg.name) if isinstance(layer_cfg.name, DictConfig)
                       else layer_cfg.name),
        "budget": (OmegaConf.to_container(layer_cfg.budget) if isinstance(layer_cfg.budget, DictConfig)
                   else layer_cfg.budget),
        **extra,
    }
    if report is not None:
        out["params"] = report.summary()
        out["layers"] = report.to_dict()["layers"]
    return out


def write_metrics_json(path: str | Path, metrics: dict) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2, default=str))
    log.info("metrics written to %s", path)
