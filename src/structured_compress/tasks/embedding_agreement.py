"""Agreement of a compressed encoder with its uncompressed self: the mean cosine similarity of the pooled
embeddings of the same inputs (algorithms.md §8, the SVD + quantization study's BERT metric).

For post-training runs (``mode=compress``) of an encoder such as BERT (``model.kind: encoder``): the task keeps
a frozen copy of the model as it is built -- with its pretrained weights, before surgery -- as the reference,
and surgery replaces layers in ``task.model`` only. Logs ``{val,test}/cosine`` (1 = the same embeddings) and
``{val,test}/embedding_rel_error`` (``||p_hat - p|| / ||p||``, averaged over inputs).
"""
from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from .glue import MODEL_KEYS
from .metric_names import EMBEDDING_AGREEMENT_METRICS


class PooledEmbeddingAgreementTask(pl.LightningModule):
    """Evaluation only: there is nothing to train towards (``mode=compress`` or ``mode=eval``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.metrics = nn.ModuleDict({f"{stage}_{name}": MeanMetric() for stage in ("val", "test")
                                      for name in EMBEDDING_AGREEMENT_METRICS})

    def pooled(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The encoder's pooled output (BERT: tanh of a linear map of the [CLS] state) in float32."""
        return model(**{k: batch[k] for k in MODEL_KEYS if k in batch}).pooler_output.float()

    def model_inputs(self, batch: dict) -> torch.Tensor:
        """Token ids, for calibration and FLOP counting."""
        return batch["input_ids"]

    def _evaluate(self, batch: dict, stage: str) -> None:
        pooled = self.pooled(self.model, batch)
        with torch.no_grad():
            reference = self.pooled(self.reference, batch)
        values = {"cosine": F.cosine_similarity(pooled, reference, dim=-1),
                  "embedding_rel_error": (pooled - reference).norm(dim=-1) / reference.norm(dim=-1)}
        for name in EMBEDDING_AGREEMENT_METRICS:
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(values[name])
            self.log(f"{stage}/{name}", metric, add_dataloader_idx=False, prog_bar=name == "cosine")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")
