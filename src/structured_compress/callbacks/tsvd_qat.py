"""Quantization-aware training for ternary-SVD layers: train a latent full-precision weight, keep the forward
ternary, and re-ternarize after every optimizer step."""
from __future__ import annotations

import logging

import lightning.pytorch as pl
from torch import nn

from ..layers.tsvd import TernarySVDLinear, requantize_

log = logging.getLogger(__name__)


def tsvd_layers(model: nn.Module) -> list[TernarySVDLinear]:
    return [m for m in model.modules() if isinstance(m, TernarySVDLinear)]


class TernaryQAT(pl.Callback):
    """For every :class:`TernarySVDLinear` in the module: add a trainable ``latent_weight`` before the
    optimizer is built (``setup``), re-ternarize from it after each optimizer step (with the layer's own
    tolerance and ``prune_rate``), and at the end of training re-ternarize once more and drop the latent
    weights, leaving the deployable factored layers.

    The forward during training is the ternary reconstruction; its gradient reaches the latent weight
    unchanged (straight-through), so the latent weight accumulates updates too small to flip a ternary.
    With ``prune_rate=inf`` every step re-decomposes from scratch (seconds per layer at BERT-mini sizes);
    a finite ``prune_rate`` (3-5 in the paper) mostly just refits the scales, and ``every_n_steps`` thins it.
    """

    def __init__(self, every_n_steps: int = 1):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers = tsvd_layers(pl_module)
        if not layers:
            log.warning("TernaryQAT: the model has no tsvd layer; nothing to train quantization-aware")
        for layer in layers:
            if layer.latent_weight is None:
                layer.enable_qat()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0:  # an optimizer step just happened
            self._last_step = step
            for layer in tsvd_layers(pl_module):
                requantize_(layer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for layer in tsvd_layers(pl_module):
            if layer.latent_weight is not None:
                requantize_(layer)
                layer.disable_qat()
