"""Stop a run that is told to go -- SIGTERM (SLURM preemption, Kubernetes, cloud spot reclaim) or SIGUSR1 (SLURM and
submitit, shortly before the time limit) -- at the next optimizer step, with a checkpoint of exactly that step, and
a non-zero exit status, so ``resume=auto`` loses no step and a job script does not see success."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

# 128 + the signal's number: the status a shell reports for a process the signal ended
EXIT_STATUS = {signal.SIGTERM: 143, signal.SIGUSR1: 138}


class Preempted(Exception):
    """The run stopped on a signal after writing its checkpoint; ``run.py`` exits with ``exit_status``."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class PreemptionCheckpoint(pl.Callback):
    """While training, SIGTERM and SIGUSR1 only note the signal. After each optimizer step every rank all-reduces
    the note (max), so all ranks agree on the same step; then ``trainer.save_checkpoint`` writes ``last.ckpt``
    (rank 0 writes, atomically through AtomicCheckpointIO; the others wait) and the run raises :class:`Preempted`.

    Lightning's own SIGTERM handling is replaced for the fit: it broadcasts from inside the signal handler and ends
    the process with status 0 and no checkpoint. Its handlers are back once the fit ends (Lightning restores the
    ones from before the fit). A SIGUSR1 handler that was there before (submitit's requeue, Lightning's SLURM
    auto-requeue) still runs, after the checkpoint is written."""

    def __init__(self) -> None:
        self.received = 0  # the number of the signal noted, 0 for none
        self._previous: dict[int, Any] = {}

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.fit_loop.epoch_loop._should_accumulate():  # a step boundary: the checkpoint resumes exactly
            self._stop_if_signalled(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_signalled(trainer, pl_module)  # a signal during the last validation

    def _install(self) -> None:
        """Take SIGTERM and SIGUSR1 over from the handlers Lightning registered for this fit (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in EXIT_STATUS:
            if signal.getsignal(signum) != self._note:
                self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        """The signal handler: only a note (no I/O, no collectives); SIGTERM outranks SIGUSR1."""
        self.received = max(self.received, signum)

    def _stop_if_signalled(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        agreed = trainer.strategy.reduce(torch.tensor(self.received, device=pl_module.device), reduce_op="max")
        signum = int(agreed.item())
        if not signum:
            return
        name = signal.Signals(signum).name
        path = last_checkpoint_path(trainer)
        log.warning("%s received: saving step %d to %s and stopping", name, trainer.global_step, path)
        trainer.save_checkpoint(path, weights_only=False)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                callback.last_model_path = str(path)
        previous = self._previous.get(signum)
        if signum == signal.SIGUSR1 and callable(previous):
            previous(signum, None)  # e.g. submitit requeues the job (and exits on rank 0)
        raise Preempted(f"{name} at step {trainer.global_step} (epoch {trainer.current_epoch}): checkpoint {path} "
                        f"written; run the same command with resume=auto to continue", EXIT_STATUS[signum])


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """``last.ckpt`` of the checkpoint callback that keeps one, else ``<default_root_dir>/checkpoints/last.ckpt``."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
