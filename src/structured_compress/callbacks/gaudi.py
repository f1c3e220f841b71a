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

SHRINK_MODES = ("targeted", "adaptive", "plain", "mean")


def gaudi_layers(module: nn.Module) -> list[GaudiGBLRLinear]:
    """Every Gaudi-GBLR layer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, GaudiGBLRLinear)]


@torch.no_grad()
def mean_active_width(layers: Sequence[GaudiGBLRLinear]) -> float:
    """Mean over layers of ``mean_{d,i} w_{d,i} [w_{0,i} w_{1,i} > 0]``: the average width of live components."""
    per_layer = [(layer.widths * (layer.widths.prod(0) > 0)).mean() for layer in layers]
    return float(torch.stack(per_layer).mean()) if per_layer else 0.0


@torch.no_grad()
def macs_fraction(layers: Sequence[GaudiGBLRLinear]) -> float:
    """Effective MACs of the layers over their dense MACs (current train/eval behaviour)."""
    dense = sum(layer.in_features * layer.out_features for layer in layers)
    return sum(layer.macs_per_token() for layer in layers) / dense if dense else 0.0


def width_learning_rate(trainer: pl.Trainer, group_name: str | None) -> float:
    """The lr the shrink step scales with: the first optimizer's last parameter group (the reference's rule;
    the project's optimizer puts the structure group last), or the group named ``group_name``."""
    if not trainer.optimizers:
        raise RuntimeError("GaudiShrink needs an optimizer: none is configured")
    if group_name is None:
        return float(trainer.optimizers[0].param_groups[-1]["lr"])
    names = []
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            if group.get("name") == group_name:
                return float(group["lr"])
            names.append(group.get("name"))
    raise ValueError(f"callbacks.gaudi_shrink.param_group={group_name!r} names no optimizer group; the groups "
                     f"are {names} (null takes the last group, as the reference does)")


class GaudiShrink(pl.Callback):
    """Shrinks the Gaudi widths after every ``rate``-th training batch, then clamps them per axis to
    ``[min_widths, max_widths]`` and wraps the locations into [0, 1) (the reference's shrink callbacks).

    Proximal modes: ``widths <- softshrink(widths, tau * lr)`` with ``lr`` from :func:`width_learning_rate`.
    ``'plain'``: ``tau = thres``. ``'targeted'``: ``tau = 0`` once the mean live width is below
    ``target_width`` (if ``target_width > 0``), else ``thres`` -- or ``thres ((w - target)/(1 - target))^power``
    with ``cont``. ``'adaptive'``: ``init_thres`` before ``start_epoch``, the targeted rule from ``end_epoch``,
    a per-batch linear blend in between. ``'mean'`` (the reference's MeanShrink, GPT-2 recipe): while the mean
    live width ``w`` exceeds ``target_width``, ``widths <- widths - mean_step (w - target_width)``.
    ``freeze``: stop training widths/locations as soon as a step is 0, for whatever reason (the reference's rule).
    """

    def __init__(self, thres: float = 0.0, mode: str = "targeted", target_width: float = 0.0, cont: bool = False,
                 power: float = 1.0, init_thres: float = 0.0, start_epoch: int = 0, end_epoch: int = 0,
                 rate: int = 1, min_widths: Sequence[float] = (0.0, 0.0), max_widths: Sequence[float] = (1.0, 1.0),
                 freeze: bool = False, param_group: str | None = None, mean_step: float = 1.0):
        if mode not in SHRINK_MODES:
            raise ValueError(f"callbacks.gaudi_shrink.mode must be one of {SHRINK_MODES}, got {mode!r}")
        if rate < 1:
            raise ValueError(f"callbacks.gaudi_shrink.rate must be >= 1, got {rate}")
        if mode == "mean" and target_width <= 0:
            raise ValueError("callbacks.gaudi_shrink.mode=mean needs target_width > 0 (the mean width to reach)")
        self.thres, self.mode, self.target_width = thres, mode, target_width
        self.cont, self.power, self.init_thres = cont, power, init_thres
        self.start_epoch, self.end_epoch, self.rate = start_epoch, end_epoch, rate
        self.min_widths, self.max_widths = tuple(min_widths), tuple(max_widths)
        self.freeze, self.param_group, self.mean_step = freeze, param_group, mean_step
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
        """``tau`` for this batch under the chosen proximal schedule."""
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

    def step_size(self, trainer: pl.Trainer, batch_idx: int, mean_width: float) -> float:
        """How far this batch moves the widths: the softshrink ``lambda``, or the mean-mode shift."""
        if self.mode == "mean":
            return self.mean_step * max(mean_width - self.target_width, 0.0)
        return self.threshold(trainer, batch_idx, mean_width) * width_learning_rate(trainer, self.param_group)

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = gaudi_layers(pl_module)
        if self.frozen or not layers or (batch_idx + 1) % self.rate:
            return
        mean_width = mean_active_width(layers)
        step = self.step_size(trainer, batch_idx, mean_width)
        for layer in layers:
            if step > 0:
                shrunk = layer.widths - step if self.mode == "mean" else F.softshrink(layer.widths, step)
                layer.widths.copy_(shrunk)
            layer.project_structure_(self.min_widths, self.max_widths)
        if self.freeze and step == 0:
            self.frozen = True
            self._freeze(layers)
            log.info("Gaudi shrink step is 0 (mean width %.4f, target %.4f): structure frozen", mean_width,
                     self.target_width)

    @staticmethod
    def _freeze(layers: Sequence[GaudiGBLRLinear]) -> None:
        for layer in layers:
            for param in layer.structural_parameters().values():
                param.requires_grad_(False)

    def on_train_start(self, trainer, pl_module):
        if self.frozen:  # resumed after the structure was frozen
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
    """Logs ``gaudi/mean_width`` and ``gaudi/macs_fraction`` of the Gaudi layers every ``every_n_steps``
    training batches and at the end of each validation epoch."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps

    def _log(self, pl_module: pl.LightningModule) -> None:
        layers = gaudi_layers(pl_module)
        if layers:
            pl_module.log("gaudi/mean_width", mean_active_width(layers))
            pl_module.log("gaudi/macs_fraction", macs_fraction(layers))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.every_n_steps == 0:
            self._log(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._log(pl_module)
