"""Log MACs per sample (per layer and total) once per validation and test epoch."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl

from ..utils.files import atomic_write_text
from ..utils.flops import executed_flops_per_sample, linear_macs_per_sample

log = logging.getLogger(__name__)


class FlopCount(pl.Callback):
    """Counts on the first sample of the first batch of each validation/test epoch.

    Logs ``flops/linear_macs_per_sample`` (structure-aware, linear maps only) and
    ``flops/executed_flops_per_sample`` (every op, as run); writes the per-layer table to ``per_layer_path``.
    """

    def __init__(self, per_layer_path: str | None = None, samples: int = 1):
        self.per_layer_path = per_layer_path
        self.samples = samples
        self.latest: dict = {}

    def _count(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch) -> None:
        inputs = pl_module.model_inputs(batch)[: self.samples]
        was_training = pl_module.model.training
        pl_module.model.eval()
        try:
            per_layer = linear_macs_per_sample(pl_module.model, inputs)
            executed = executed_flops_per_sample(pl_module.model, inputs)
        finally:
            pl_module.model.train(was_training)
        self.latest = {"linear_macs_per_sample": sum(per_layer.values()), "executed_flops_per_sample": executed,
                       "per_layer": per_layer}
        if self.per_layer_path and trainer.is_global_zero:
            Path(self.per_layer_path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.per_layer_path, json.dumps(self.latest, indent=2))

    def _log(self, pl_module: pl.LightningModule) -> None:
        for key in ("linear_macs_per_sample", "executed_flops_per_sample"):
            if key in self.latest:
                pl_module.log(f"flops/{key}", float(self.latest[key]), sync_dist=False)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and dataloader_idx == 0:
            self._count(trainer, pl_module, batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and dataloader_idx == 0:
            self._count(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._log(pl_module)

    def on_test_epoch_end(self, trainer, pl_module):
        self._log(pl_module)
