"""Image classification: cross-entropy, top-1/top-5 accuracy, AdamW + warmup-cosine."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .example_input import ExampleInputFromData
from .metric_names import CLASSIFICATION_TOP_K
from .optim import build_optimizer
from .schedule import Schedule


class ClassificationTask(ExampleInputFromData, pl.LightningModule):
    """Trains ``model`` (already compressed by surgery) and logs ``{train,val,test}/{loss,acc,acc_top5}``."""

    def __init__(self, model: nn.Module, num_classes: int, optimizer: Any, weight_decay: float = 0.05,
                 warmup_fraction: float = 0.05, min_lr_ratio: float = 0.01, label_smoothing: float = 0.0,
                 structure_optim: dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.schedule = Schedule.from_task({**self.hparams, "optimizer": optimizer})
        self.model = model
        self.optimizer_factory = optimizer
        self.metrics = nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro")
            for stage in ("val", "test") for name, k in CLASSIFICATION_TOP_K.items()
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def model_inputs(self, batch) -> torch.Tensor:
        """The tensor the model consumes, for FLOP counting."""
        return batch[0]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.schedule.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), prog_bar=stage == "val", sync_dist=True)
        for name in CLASSIFICATION_TOP_K:
            metric = self.metrics[f"{stage}_{name}"]
            metric(logits, labels)
            self.log(f"{stage}/{name}", metric, prog_bar=name == "acc")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optimizer_factory, self.schedule, self.trainer)
