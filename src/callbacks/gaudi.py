"""Gaudi-GBLR training callbacks: proximal width shrinking, sigma annealing and width/FLOPs logging."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from ..layers.gaudi import GaudiGBLRLinear

log = logging.getLogger(__name__)

SHRINK_MODES = ("targeted", "adaptive", "plain")


def gaudi_layers(module: nn.Module) -> list[GaudiGBLRLinear]:
    """Every Gaudi-GBLR layer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, GaudiGBLRLinear)]


@torch.no_grad()
def mean_active_width(layers: Sequence[GaudiGBLRLinear]) -> float:
    """Mean over layers of ``mean_{d,i} w_{d,i} [w_{0,i} w_{1,i} > 0]``: the average width of live components."""
    per_layer = [(layer.widths * (layer.widths.prod(0) > 0)).mean() for layer in layers]
    return float(torch.stack(per_layer).mean()) if per_layer else 0.0


@torch.no_grad()
def flops_fraction(layers: Sequence[GaudiGBLRLinear]) -> float:
    """Effective MACs of the layers over their dense MACs (current train/eval behaviour)."""
    dense = sum(layer.in_features * layer.out_features for layer in layers)
    return sum(layer.flops_per_token() for layer in layers) / dense if dense else 0.0


def width_learning_rate(trainer: pl.Trainer, layers: Sequence[GaudiGBLRLinear], group_name: str | None) -> float:
    """The lr of the optimizer group named ``group_name``, else of the group that holds the widths. The
    reference took the last group's lr, whose identity is not guaranteed."""
    width_ids = {id(layer.widths) for layer in layers}
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            if group_name is not None and group.get("name") == group_name:
                return float(group["lr"])
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            if any(id(p) in width_ids for p in group["params"]):
                return float(group["lr"])
    raise RuntimeError("no optimizer group holds the Gaudi widths; put structural_parameters() in the optimizer")


class GaudiShrink(pl.Callback):
    """Proximal L1 step on the widths after every ``rate``-th training batch:
    ``widths <- clamp(softshrink(widths, tau * lr_width), min_widths, max_widths)``, locations wrapped into [0, 1).

    ``mode='plain'``: ``tau = thres``. ``'targeted'``: ``tau = 0`` once the mean live width is below
    ``target_width`` (if ``target_width > 0``), else ``thres`` -- or ``thres ((w - target)/(1 - target))^power``
    with ``cont``. ``'adaptive'``: ``init_thres`` before ``start_epoch``, the targeted rule from ``end_epoch``,
    a per-batch linear blend in between. ``freeze`` stops training widths/locations once the target is reached.
    """

    def __init__(self, thres: float = 0.0, mode: str = "targeted", target_width: float = 0.0, cont: bool = False,
                 power: float = 1.0, init_thres: float = 0.0, start_epoch: int = 0, end_epoch: int = 0,
                 rate: int = 1, min_widths: Sequence[float] = (0.0, 0.0), max_widths: Sequence[float] = (1.0, 1.0),
                 freeze: bool = False, param_group: str | None = "structure"):
        if mode not in SHRINK_MODES:
            raise ValueError(f"mode must be one of {SHRINK_MODES}, got {mode!r}")
        if rate < 1:
            raise ValueError(f"rate must be >= 1, got {rate}")
        self.thres, self.mode, self.target_width = thres, mode, target_width
        self.cont, self.power, self.init_thres = cont, power, init_thres
        self.start_epoch, self.end_epoch, self.rate = start_epoch, end_epoch, rate
        self.min_widths, self.max_widths = tuple(min_widths), tuple(max_widths)
        self.freeze, self.param_group = freeze, param_group
        self.frozen = False

    def targeted_threshold(self, mean_width: float) -> float:
        if self.target_width <= 0:
            return self.thres
        if mean_width < self.target_width:
            return 0.0
        if self.cont:
            return self.thres * ((mean_width - self.target_width) / (1 - self.target_width)) ** self.power
        return self.thres

    def threshold(self, trainer: pl.Trainer, batch_idx: int, mean_width: float) -> float:
        """``tau`` for this batch under the chosen schedule."""
        if self.mode == "plain":
            return self.thres
        if self.mode == "targeted" or trainer.current_epoch >= self.end_epoch:
            return self.targeted_threshold(mean_width)
        if trainer.current_epoch < self.start_epoch:
            return self.init_thres
        batches = trainer.num_training_batches
        within = batch_idx / batches if math.isfinite(batches) and batches > 0 else 0.0
        progress = (trainer.current_epoch - self.start_epoch + within) / (self.end_epoch - self.start_epoch)
        return self.init_thres + (self.targeted_threshold(mean_width) - self.init_thres) * progress

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = gaudi_layers(pl_module)
        if self.frozen or not layers or (batch_idx + 1) % self.rate:
            return
        mean_width = mean_active_width(layers)
        step = self.threshold(trainer, batch_idx, mean_width) * width_learning_rate(trainer, layers, self.param_group)
        for layer in layers:
            if step > 0:
                layer.widths.copy_(F.softshrink(layer.widths, step))
            layer.project_structure_(self.min_widths, self.max_widths)
        if self.freeze and 0 < self.target_width and mean_width < self.target_width and self.mode != "plain":
            self.frozen = True
            self._freeze(layers)
            log.info("mean Gaudi width %.4f reached the target %.4f: structure frozen", mean_width, self.target_width)

    @staticmethod
    def _freeze(layers: Sequence[GaudiGBLRLinear]) -> None:
        for layer in layers:
            for param in layer.structural_parameters().values():
                param.requires_grad_(False)

    def on_train_start(self, trainer, pl_module):
        if self.frozen:  # resumed after the target was reached
            self._freeze(gaudi_layers(pl_module))

    def state_dict(self) -> dict:
        return {"frozen": self.frozen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.frozen = state_dict.get("frozen", False)


class SigmaAnnealing(pl.Callback):
    """At each epoch start set every Gaudi layer's ``sigma``: ``start_sigma`` before ``start_epoch``, a
    linear ramp to ``end_sigma`` at ``end_epoch`` (default: ``max_epochs``), ``end_sigma`` after."""

    def __init__(self, start_sigma: float = 1.0, end_sigma: float = 100.0, start_epoch: int = 0,
                 end_epoch: int | None = None):
        self.start_sigma, self.end_sigma = start_sigma, end_sigma
        self.start_epoch, self.end_epoch = start_epoch, end_epoch

    def sigma_at(self, epoch: int, end_epoch: int) -> float:
        if epoch < self.start_epoch:
            return self.start_sigma
        if epoch >= end_epoch:
            return self.end_sigma
        fraction = (epoch - self.start_epoch) / (end_epoch - self.start_epoch)
        return self.start_sigma + (self.end_sigma - self.start_sigma) * fraction

    @torch.no_grad()
    def on_train_epoch_start(self, trainer, pl_module):
        end_epoch = self.end_epoch if self.end_epoch is not None else max(1, trainer.max_epochs or 1)
        sigma = self.sigma_at(trainer.current_epoch, end_epoch)
        for layer in gaudi_layers(pl_module):
            layer.sigma.fill_(sigma)
        log.debug("epoch %d: Gaudi sigma %.3f", trainer.current_epoch, sigma)


class WidthMonitor(pl.Callback):
    """Logs ``gaudi/mean_width`` and ``gaudi/flops_fraction`` of the Gaudi layers every ``every_n_steps``
    training batches and at the end of each validation epoch."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps

    def _log(self, pl_module: pl.LightningModule) -> None:
        layers = gaudi_layers(pl_module)
        if layers:
            pl_module.log("gaudi/mean_width", mean_active_width(layers))
            pl_module.log("gaudi/flops_fraction", flops_fraction(layers))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.every_n_steps == 0:
            self._log(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._log(pl_module)
