"""Save the trained model's weights to a fixed path, so another experiment can start from them."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from safetensors.torch import save as safetensors_bytes

from ..utils.files import atomic_write_bytes

log = logging.getLogger(__name__)


class ExportWeights(pl.Callback):
    """At the end of fitting, write ``pl_module.model``'s state dict to ``path`` (safetensors, atomic)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        state = {k: v.detach().cpu().contiguous() for k, v in pl_module.model.state_dict().items()}
        atomic_write_bytes(self.path, safetensors_bytes(state))
        log.info("model weights exported to %s", self.path)
