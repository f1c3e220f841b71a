"""GLUE metrics of SequenceClassificationTask against sklearn / scipy on fixed predictions, and the
MNLI matched/mismatched logging through a real Lightning validation loop."""
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.utils.data import DataLoader

from structured_compress.tasks.glue import GLUE_METRICS, SequenceClassificationTask, build_metric

metrics_sk = pytest.importorskip("sklearn.metrics")

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 2, 200)
PREDS = np.where(RNG.random(200) < 0.75, LABELS, 1 - LABELS)
LABELS3 = RNG.integers(0, 3, 200)
PREDS3 = np.where(RNG.random(200) < 0.6, LABELS3, RNG.integers(0, 3, 200))
SCORES = RNG.uniform(0, 5, 200)
REGRESSED = SCORES + RNG.normal(0, 1.0, 200)

REFERENCE = {
    "matthews": lambda y, p: metrics_sk.matthews_corrcoef(y, p),
    "accuracy": lambda y, p: metrics_sk.accuracy_score(y, p),
    "f1": lambda y, p: metrics_sk.f1_score(y, p),  # positive class
    "f1_macro": lambda y, p: metrics_sk.f1_score(y, p, average="macro"),
    "pearson": lambda y, p: pearsonr(p, y)[0],
    "spearman": lambda y, p: spearmanr(p, y)[0],
}


@pytest.mark.parametrize("task", sorted(GLUE_METRICS))
def test_glue_metric_matches_reference(task):
    num_labels = {"stsb": 1, "mnli": 3}.get(task, 2)
    labels, preds = {1: (SCORES, REGRESSED), 3: (LABELS3, PREDS3), 2: (LABELS, PREDS)}[num_labels]
    for name in GLUE_METRICS[task]:
        metric = build_metric(name, num_labels)
        dtype = torch.float32 if num_labels == 1 else torch.long
        for chunk in np.array_split(np.arange(200), 4):  # accumulated over batches, as in validation
            metric.update(torch.tensor(preds[chunk], dtype=dtype), torch.tensor(labels[chunk], dtype=dtype))
        assert metric.compute().item() == pytest.approx(REFERENCE[name](labels, preds), abs=1e-5), (task, name)


def test_macro_f1_for_three_classes():
    metric = build_metric("f1_macro", 3)
    metric.update(torch.tensor(PREDS3), torch.tensor(LABELS3))
    assert metric.compute().item() == pytest.approx(REFERENCE["f1_macro"](LABELS3, PREDS3), abs=1e-6)


def test_correlation_metric_needs_regression():
    with pytest.raises(ValueError, match="regression"):
        build_metric("pearson", 2)


class FixedLogits(nn.Module):
    """Stands in for a HF classifier: logits are the one-hot of ``input_ids[:, 0]`` (the planted prediction)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        class Output:
            logits = nn.functional.one_hot(input_ids[:, 0], 3).float() + self.bias
        return Output()


def _loader(preds, labels):
    rows = [{"input_ids": torch.tensor([p, 0]), "labels": torch.tensor(y)} for p, y in zip(preds, labels)]
    return DataLoader(rows, batch_size=16)


def test_mnli_logs_matched_and_mismatched():
    task = SequenceClassificationTask(FixedLogits(), num_labels=3, optimizer=torch.optim.AdamW, glue_task="mnli")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    half = slice(0, 100), slice(100, 200)
    trainer.validate(task, dataloaders=[_loader(PREDS3[s], LABELS3[s]) for s in half], verbose=False)
    logged = trainer.callback_metrics
    for suffix, s in zip(("", "_mm"), half):
        expected = metrics_sk.accuracy_score(LABELS3[s], PREDS3[s])
        assert logged[f"val/accuracy{suffix}"].item() == pytest.approx(expected, abs=1e-6)
