"""Each log line once: ``import lightning`` gives the ``lightning`` logger a console handler of its own while its
records also propagate to the root logger, whose console and file handlers Hydra sets up, so every Lightning
line was printed twice (``INFO: Seed set to 42`` and ``[...][lightning.fabric...][INFO] - Seed set to 42``)."""
from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.experimental.callback import Callback

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")


def route_lightning_logs_to_root() -> None:
    """When the root logger has handlers, drop the console handlers Lightning added to its own loggers and let
    its records propagate, so they print once, formatted like every other line, and reach Hydra's log file."""
    import lightning  # noqa: F401  (importing it adds the handlers removed here)

    if not logging.getLogger().handlers:
        return  # no root handler (plain script): Lightning's own handlers are the only output
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True


class LightningLogsOnce(Callback):
    """Hydra callback (``hydra.callbacks`` in configs/hydra/default.yaml): fixes the handlers once Hydra has
    configured logging for the job, before the task function runs."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        route_lightning_logs_to_root()


def record_failure(message: str, with_traceback: bool = False) -> None:
    """Write an ERROR line (and the current exception's traceback) to the run's log files only: the terminal
    already gets the error on stderr, and the line lets results tables tell a failed run from a running one."""
    logger = logging.getLogger("run")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None,
                               sys.exc_info() if with_traceback else None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
