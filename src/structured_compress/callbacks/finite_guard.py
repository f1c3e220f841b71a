"""Stop a run the moment its training loss or a structural parameter (Gaudi widths / locations) stops being
finite, instead of training on NaN for hours and checkpointing the damage."""
from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
import torch

from ..layers import StructuredLinear


class NonFiniteError(ValueError):
    """The loss or a structural parameter became NaN/Inf; the message names the step, what, and the last good
    checkpoint to resume from."""


class FiniteGuard(pl.Callback):
    """After every ``every_n_steps``-th training batch, check the loss and every structured layer's
    ``structural_parameters()``; raise :class:`NonFiniteError` on the first NaN/Inf. Runs before Lightning's
    ModelCheckpoint (checkpoint callbacks go last), so no checkpoint of the broken state is written.

    Under DDP the decision is collective: the ranks all-reduce a "found one" flag at each checked step, so a NaN on
    one rank stops every rank at the same step with the same message (naming that rank) instead of leaving the
    others waiting in the next collective until it times out."""

    def __init__(self, every_n_steps: int = 1):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"callbacks.finite_guard.every_n_steps={every_n_steps!r}: must be an integer >= 1")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        problem = local_problem(outputs, pl_module)
        found = trainer.strategy.reduce(torch.tensor(int(problem is not None), device=pl_module.device),
                                        reduce_op="max")
        if not int(found.item()):
            return
        what, fix = first_problem_of_all_ranks(trainer, problem)
        raise NonFiniteError(f"stopped at step {trainer.global_step} (epoch {trainer.current_epoch}): {what}; "
                             f"last good checkpoint: {last_good_checkpoint(trainer)}; {fix}")


def local_problem(outputs: Any, pl_module: pl.LightningModule) -> tuple[str, str] | None:
    """``(what is not finite, the fix)`` for this process's loss or structural parameters, or None."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
        return (f"the training loss is {loss.detach().float().mean().item()}",
                "lower task.optimizer.lr or set trainer.gradient_clip_val=1.0, then resume")
    for name, layer in pl_module.named_modules():
        if not isinstance(layer, StructuredLinear):
            continue
        for param_name, param in layer.structural_parameters().items():
            if not torch.isfinite(param.detach()).all():
                bad = int((~torch.isfinite(param.detach())).sum())
                return (f"layer {name}: {bad} of {param.numel()} {param_name} are NaN/Inf",
                        "lower task.structure_optim.lr (the structure learning rate), then resume")
    return None


def first_problem_of_all_ranks(trainer: pl.Trainer, problem: tuple[str, str] | None) -> tuple[str, str]:
    """The lowest rank's problem, the same on every rank (``rank N: `` in front under DDP); all ranks call it."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        assert problem is not None
        return problem
    gathered: list[tuple[str, str] | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, problem)
    rank, (what, fix) = next((r, p) for r, p in enumerate(gathered) if p is not None)
    return f"rank {rank}: {what}", fix


def last_good_checkpoint(trainer: pl.Trainer) -> str:
    """The newest checkpoint this run wrote (``last.ckpt`` if kept), else its best one, else a note."""
    callback = trainer.checkpoint_callback
    if callback is not None:
        for path in (getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")):
            if path:
                return str(path)
    return "none written yet (the run starts over)"
