"""Causal language modelling: next-token cross-entropy; perplexity = exp(mean NLL over every predicted token)."""
from __future__ import annotations

import fnmatch
import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from .example_input import ExampleInputFromData
from .metric_names import LANGUAGE_MODEL_METRICS
from .optim import build_optimizer
from .schedule import Schedule

log = logging.getLogger(__name__)


class TokenNLL(Metric):
    """Sum of token negative log-likelihoods and the token count (summed across processes); ``compute`` is the
    mean NLL, so ``exp(compute())`` is the perplexity of all windows together (§8)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, count: int) -> None:
        self.total += nll_sum.detach().double()
        self.count += count

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


NLL_CHUNK = 256  # positions per cross-entropy call: a 262k vocabulary's float copy stays ~0.27 GB per row


def shifted_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL of token t+1 given tokens <= t, over the ``L - 1`` predicted positions of every row; taken
    ``NLL_CHUNK`` positions at a time, so no float copy of the whole logits tensor is ever made."""
    predicted, vocabulary = logits.shape[1] - 1, logits.shape[-1]
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, predicted, NLL_CHUNK):
        end = min(start + NLL_CHUNK, predicted)
        total = total + F.cross_entropy(logits[:, start:end].reshape(-1, vocabulary).float(),
                                        input_ids[:, start + 1:end + 1].reshape(-1), reduction="sum")
    return total, input_ids.shape[0] * predicted


class LanguageModelTask(ExampleInputFromData, pl.LightningModule):
    """Trains a (compressed) causal LM on ``[B, L]`` token windows; logs ``{val,test}/{loss,perplexity}``.

    ``freeze``: fnmatch patterns of parameter names kept fixed (e.g. ``["*embed_tokens*"]`` for a large tied
    vocabulary on CPU).
    """

    def __init__(self, model: nn.Module, optimizer: Any, weight_decay: float = 0.1, warmup_fraction: float = 0.02,
                 min_lr_ratio: float = 0.0, structure_optim: dict | None = None, freeze: list[str] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.schedule = Schedule.from_task({**self.hparams, "optimizer": optimizer})
        self.model = model
        self.optimizer_factory = optimizer
        self.nll = nn.ModuleDict({"val": TokenNLL(), "test": TokenNLL()})
        frozen = [n for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, f) for f in freeze or [])]
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        if freeze:
            log.info("froze %d parameter tensors matching %s", len(frozen), list(freeze))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def model_inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """The token windows themselves, for FLOP counting."""
        return batch

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        nll, count = shifted_nll(self(batch), batch)
        loss = nll / count
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: torch.Tensor, stage: str) -> None:
        nll, count = shifted_nll(self(batch), batch)
        self.nll[stage].update(nll, count)

    def _log_epoch(self, stage: str) -> None:
        mean_nll = self.nll[stage].compute().item()
        self.nll[stage].reset()
        values = {"loss": mean_nll, "perplexity": math.exp(min(mean_nll, 700.0))}
        for name in LANGUAGE_MODEL_METRICS:
            self.log(f"{stage}/{name}", values[name], prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optimizer_factory, self.schedule, self.trainer)
