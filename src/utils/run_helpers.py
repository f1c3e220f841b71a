"""Glue between Hydra configs and the library: layer surgery from the ``layer`` group, metrics.json."""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..surgery import CompressionReport, collect_input_gram, compress_, select_layers
from .files import atomic_write_text

log = logging.getLogger(__name__)


def instantiate_list(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers); skip null entries."""
    if not group:
        return []
    return [instantiate(cfg) for cfg in group.values() if isinstance(cfg, DictConfig) and "_target_" in cfg]


def apply_layer_config(task: pl.LightningModule, layer_cfg: DictConfig,
                       datamodule: pl.LightningDataModule | None = None) -> CompressionReport:
    """Run :func:`compress_` on ``task.model`` as the ``layer`` config says (incl. calibration batches)."""
    cfg = OmegaConf.to_container(layer_cfg, resolve=True)
    calibration = None
    n_batches = int(cfg.get("calibration_batches", 0) or 0)
    if n_batches > 0:
        if datamodule is None:
            raise ValueError("layer.calibration_batches > 0 needs a datamodule to draw calibration batches from")
        datamodule.prepare_data()
        datamodule.setup("fit")
        names = select_layers(task.model, cfg.get("include"), cfg.get("exclude"))
        batches = itertools.islice(iter(datamodule.train_dataloader()), n_batches)
        task.model.eval()
        calibration = collect_input_gram(task.model, batches, names, forward=lambda m, b: m(task.model_inputs(b)))
        task.model.train()
    report = compress_(task.model, cfg["name"], cfg.get("budget", 1.0), include=cfg.get("include"),
                       exclude=cfg.get("exclude"), options=cfg.get("options"), calibration=calibration)
    log.info("layer surgery (%s):\n%s", cfg["name"], report.format_table())
    task.compression_report = report  # read by InitFromPretrained and metrics.json
    return report


def collect_run_metrics(logged: dict, report: CompressionReport | None, layer_cfg: DictConfig,
                        extra: dict) -> dict:
    """Everything a results table needs from one run (``logged``: Lightning's callback metrics), as JSON."""
    metrics = {k: float(v) for k, v in logged.items() if v.numel() == 1}
    out = {
        "metrics": {k: v for k, v in sorted(metrics.items()) if not k.startswith("train/")},
        "train_loss": metrics.get("train/loss"),
        "layer_type": OmegaConf.to_container(layer_cfg.name) if isinstance(layer_cfg.name, DictConfig) else layer_cfg.name,
        "budget": OmegaConf.to_container(layer_cfg.budget) if isinstance(layer_cfg.budget, DictConfig) else layer_cfg.budget,
        **extra,
    }
    if report is not None:
        out["params"] = report.summary()
        out["layers"] = report.to_dict()["layers"]
    return out


def write_metrics_json(path: str | Path, metrics: dict) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2, default=str))
    log.info("metrics written to %s", path)
