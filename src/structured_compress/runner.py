"""The one run skeleton every mode shares: seed -> data -> model -> trainer -> the mode's work -> test ->
metrics.json. A mode (train.py, eval.py, compress.py) is a :class:`Steps` subclass that fills in how the model is
built and what happens before the test; :func:`run` does the rest, the same way for all three."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from .errors import ConfigError
from .pipeline import Built
from .utils.checkpoints import lightning_weights_only
from .utils.loggers import resumable_loggers
from .utils.run_helpers import collect_run_metrics, instantiate_list, make_trainer, seed_run, write_metrics_json

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the steps of one run share; ``facts`` become top-level entries of metrics.json."""

    cfg: DictConfig
    datamodule: pl.LightningDataModule
    built: Built
    trainer: pl.Trainer
    started: float
    facts: dict[str, Any] = field(default_factory=dict)
    fit_metrics: dict[str, Any] = field(default_factory=dict)  # kept apart: trainer.test() clears the trainer's


class Steps:
    """A mode's part of the run; the defaults add nothing."""

    def build(self, cfg: DictConfig, datamodule: pl.LightningDataModule) -> Built:
        """The Lightning task holding the model this mode works on."""
        raise NotImplementedError

    def callbacks(self, cfg: DictConfig, built: Built) -> list[pl.Callback]:
        """Callbacks the mode needs besides ``cfg.callbacks``."""
        return []

    def work(self, state: RunState) -> None:
        """What the mode does before the test (fit; or compress and save)."""

    def tested(self, state: RunState) -> dict[str, Any]:
        """``{"tested_checkpoint": path or None (the weights in memory), "tested_because": why}``."""
        return {"tested_checkpoint": None, "tested_because": "the weights in memory"}

    def finish(self, state: RunState, metrics: dict) -> None:
        """Rank 0, before metrics.json is written: add what only the mode knows."""


def run(cfg: DictConfig, steps: Steps) -> tuple[dict, dict]:
    """Run ``steps`` inside the shared skeleton; returns ``(metrics, objects)``. ``cfg.test`` turns the test
    off (config_checks keeps ``cfg.train`` / ``cfg.test`` consistent with the mode)."""
    started = time.perf_counter()
    seed_run(cfg)
    datamodule = instantiate(cfg.datamodule)
    built = steps.build(cfg, datamodule)
    trainer = make_trainer(cfg, instantiate_list(cfg.get("callbacks")) + steps.callbacks(cfg, built),
                           instantiate_list(resumable_loggers(cfg.get("logger"), cfg.paths.output_dir,
                                                             built.resumed_step)), built.resumed_step)
    state = RunState(cfg, datamodule, built, trainer, started)
    steps.work(state)
    test_metrics = {}
    if cfg.get("test", True):
        tested = steps.tested(state)
        trainer.test(built.task, datamodule=datamodule, ckpt_path=tested["tested_checkpoint"],
                     weights_only=lightning_weights_only(bool(cfg.get("trust_checkpoint"))))
        state.facts.update(tested)
        test_metrics = trainer.callback_metrics
    metrics = collect_run_metrics({**state.fit_metrics, **test_metrics}, built.report, cfg.layer, {
        "experiment": cfg.get("experiment_name"), "output_dir": str(Path(cfg.paths.output_dir).resolve()),
        **state.facts})
    if trainer.is_global_zero:
        steps.finish(state, metrics)
        metrics["wall_time_s"] = round(time.perf_counter() - started, 2)
        write_metrics_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "task": built.task, "trainer": trainer,
                     "report": built.report}


def optimized_value(cfg: DictConfig, metrics: dict) -> float | None:
    """The value of ``optimized_metric`` for sweepers (``val/x`` falls back to ``test/x`` in modes that only
    test). Missing, it fails a multirun (the sweeper needs it) and is a warning in a single run."""
    target = cfg.get("optimized_metric")
    if not target or cfg.mode.name == "export":  # an export measures no metric
        return None
    logged = metrics["metrics"]
    if target not in logged and cfg.mode.name != "train":
        target = target.replace("val/", "test/", 1)
    if target in logged:
        return logged[target]
    message = (f"optimized_metric={target} is not among this run's metrics ({', '.join(sorted(logged))}); "
               "set optimized_metric to one of them")
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(message)
    log.warning(message)
    return None
