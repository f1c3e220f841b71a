"""Optimizer parameter groups and the warmup + cosine schedule shared by every task."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..layers import StructuredLinear
from .schedule import Schedule


def parameter_groups(model: nn.Module, weight_decay: float, structure: dict | None = None) -> list[dict]:
    """Three groups: weights with decay; biases/norms/1-D without; structural parameters (e.g. Gaudi
    widths and locations) with their own ``lr``/``betas`` and no decay, named ``"structure"``."""
    structural = {id(p) for m in model.modules() if isinstance(m, StructuredLinear)
                  for p in m.structural_parameters().values()}
    decay, no_decay, struct = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in structural:
            struct.append(param)
        elif param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if struct:
        groups.append({"params": struct, "weight_decay": 0.0, "name": "structure", **(structure or {})})
    return [g for g in groups if g["params"]]


def warmup_cosine(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear from 0 to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, optimizer_factory, schedule: Schedule, trainer):
    """Optimizer over :func:`parameter_groups` plus a per-step LambdaLR for Lightning; ``trainer`` gives the step
    count (and the batches per epoch that ``schedule.structure_lr_scale`` divides)."""
    total_steps = int(trainer.estimated_stepping_batches)
    structure = dict(schedule.structure_optim or {})
    if schedule.structure_lr_scale and structure.get("lr"):
        batches = max(1, total_steps // max(1, trainer.max_epochs))
        structure["lr"] = min(structure["lr"], schedule.structure_lr_scale / batches)
    optimizer = optimizer_factory(parameter_groups(model, schedule.weight_decay, structure))
    warmup = int(round(schedule.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup, schedule.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
