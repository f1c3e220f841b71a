"""Sequence classification / regression (GLUE, tweets) with the GLUE metric of each task (algorithms.md §8).

Metrics are logged in [0, 1] (papers print them x100) as ``{val,test}/<metric>``; MNLI's mismatched set
adds ``{val,test}/<metric>_mm``.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from ..glue_tasks import GLUE_TASKS
from .example_input import ExampleInputFromData
from .metric_names import sequence_classification_metrics
from .optim import build_optimizer
from .schedule import Schedule

GLUE_METRICS = {name: task.metrics for name, task in GLUE_TASKS.items()}
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def build_metric(name: str, num_labels: int) -> Metric:
    """One torchmetrics object; ``f1`` is the F1 of the positive class (label 1), as GLUE reports."""
    factories = {
        "accuracy": lambda: MulticlassAccuracy(num_classes=num_labels, average="micro"),
        "f1": lambda: BinaryF1Score(),
        "f1_macro": lambda: MulticlassF1Score(num_classes=num_labels, average="macro"),
        "matthews": lambda: MulticlassMatthewsCorrCoef(num_classes=num_labels),
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    if name not in factories:
        raise ValueError(f"unknown metric {name!r}; choose from {sorted(factories)}")
    if (name in ("pearson", "spearman")) != (num_labels == 1):
        raise ValueError(f"metric {name!r} does not fit num_labels={num_labels} (correlations need regression)")
    return factories[name]()


class SequenceClassificationTask(ExampleInputFromData, pl.LightningModule):
    """Cross-entropy (or MSE when ``num_labels == 1``) on a HF sequence classifier; per-task metrics.

    ``glue_task`` picks the metrics and evaluation sets; ``metrics`` overrides the metric list (e.g. tweets).
    ``structure_lr_scale`` caps the structural learning rate (GLUE recipe, algorithms.md §3.12; see
    :class:`.schedule.Schedule`).
    """

    def __init__(self, model: nn.Module, num_labels: int, optimizer: Any, glue_task: str | None = None,
                 metrics: list[str] | None = None, weight_decay: float = 0.01, warmup_fraction: float = 0.06,
                 min_lr_ratio: float = 0.0, structure_optim: dict | None = None,
                 structure_lr_scale: float | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.schedule = Schedule.from_task({**self.hparams, "optimizer": optimizer})
        self.model = model
        self.optimizer_factory = optimizer
        self.metric_names, self.suffixes = sequence_classification_metrics(glue_task, metrics)
        self.metrics = nn.ModuleDict({
            f"{stage}{i}_{name}": build_metric(name, num_labels)
            for stage in ("val", "test") for i in range(len(self.suffixes)) for name in self.metric_names
        })

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(**{k: batch[k] for k in MODEL_KEYS if k in batch}).logits

    def model_inputs(self, batch: dict) -> torch.Tensor:
        """Token ids, for FLOP counting (padding included)."""
        return batch["input_ids"]

    def example_input(self, batch: dict) -> tuple[dict]:
        """One sequence's model inputs; a 1-tuple, since Lightning would spread a dict into keyword arguments."""
        return ({k: batch[k][:1] for k in MODEL_KEYS if k in batch},)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.hparams.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.float())
        return F.cross_entropy(logits, labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: dict, stage: str, index: int) -> None:
        logits = self(batch)
        labels = batch["labels"]
        suffix = self.suffixes[index]
        self.log(f"{stage}/loss{suffix}", self.loss(logits, labels), add_dataloader_idx=False, sync_dist=True,
                 prog_bar=stage == "val" and index == 0)
        preds = logits.squeeze(-1) if self.hparams.num_labels == 1 else logits.argmax(-1)
        for name in self.metric_names:
            metric = self.metrics[f"{stage}{index}_{name}"]
            metric(preds, labels)
            self.log(f"{stage}/{name}{suffix}", metric, add_dataloader_idx=False, prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test", dataloader_idx)

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optimizer_factory, self.schedule, self.trainer)
