"""``mode`` name -> the function that runs it: the one dispatch ``run.py`` and the tests share."""
from __future__ import annotations

from omegaconf import DictConfig

from .compress import compress
from .eval import evaluate
from .export.mode import export
from .train import train

MODES = {"train": train, "eval": evaluate, "compress": compress, "export": export}


def run_mode(cfg: DictConfig) -> tuple[dict, dict]:
    """Run ``cfg.mode.name`` (train | eval | compress | export); returns ``(metrics, objects)``."""
    return MODES[cfg.mode.name](cfg)
