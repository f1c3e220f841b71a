"""Test-only callbacks that inject faults into a training run: a signal from outside, a NaN on one rank."""
import os
import signal
import time

import lightning.pytorch as pl
import torch


class SignalAtStep(pl.Callback):
    """Send the signal ``name`` to this process as the batch after optimizer step ``step`` starts (on ``rank``
    only), as a scheduler would during that step: under DDP, rank 0 is the launcher process."""

    def __init__(self, step: int, name: str = "SIGTERM", rank: int = 0):
        self.step, self.signum, self.rank = step, getattr(signal, name), rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class NaNOnRank(pl.Callback):
    """Make every parameter NaN on ``rank`` only as the batch after step ``step`` starts, so that rank's loss is
    NaN while the others' is finite; prints when, for the test to time the stop."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            with torch.no_grad():
                for param in pl_module.parameters():
                    param.fill_(float("nan"))
            print(f"NaN injected at {time.time():.3f}", flush=True)

