"""Learning-rate logging that also runs without a logger (debug=fast_dev_run, logger=none)."""
from __future__ import annotations

from lightning.pytorch import callbacks


class LearningRateMonitor(callbacks.LearningRateMonitor):
    """Lightning's monitor (one curve per optimizer parameter group, e.g. ``lr-AdamW/pg1`` for Gaudi's
    structural group), except that a run without a logger skips it instead of raising."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
