"""Perplexity windows and the LM task's perplexity against a hand computation (algorithms.md §8)."""
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from structured_compress.datamodules.language_modeling import WindowDataset, non_overlapping_windows, tokenize_joined
from structured_compress.tasks.language_model import LanguageModelTask, TokenNLL, shifted_nll


def test_windows_do_not_overlap_and_drop_the_tail():
    tokens = torch.arange(23)
    windows = non_overlapping_windows(tokens, 5)
    assert windows.tolist() == [list(range(0, 5)), list(range(5, 10)), list(range(10, 15)), list(range(15, 20))]
    assert non_overlapping_windows(torch.arange(4), 5).shape == (0, 5)
    with pytest.raises(ValueError):
        non_overlapping_windows(tokens, 1)


class CharTokenizer:
    """One id per character: makes the joined string visible in the ids."""

    def __call__(self, text, add_special_tokens=True, verbose=False):
        if isinstance(text, list):
            return {"input_ids": [[ord(c) for c in t] for t in text]}
        return {"input_ids": [ord(c) for c in text]}


def test_tokenize_joined_separates_documents_by_blank_line():
    ids = tokenize_joined(CharTokenizer(), ["ab", "c", "de"])
    assert "".join(map(chr, ids.tolist())) == "ab\n\nc\n\nde"
    grouped = tokenize_joined(CharTokenizer(), ["ab", "c", "de"], group_size=2)
    assert torch.equal(grouped, ids)


class BigramLM(nn.Module):
    """A fixed bigram table as a 'causal LM': logits at position t depend on token t only."""

    def __init__(self, vocab: int = 7):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, use_cache=False):
        class Output:
            logits = self.table[input_ids]
        return Output()


def hand_perplexity(table: torch.Tensor, windows: torch.Tensor) -> float:
    """exp(mean over every predicted token of -log p(next | current)), one token at a time."""
    nlls = []
    for row in windows.tolist():
        for current, nxt in zip(row[:-1], row[1:]):
            log_probs = table[current].double().log_softmax(-1)
            nlls.append(-log_probs[nxt].item())
    return math.exp(sum(nlls) / len(nlls))


def test_shifted_nll_and_metric_match_hand_computation():
    model = BigramLM()
    windows = non_overlapping_windows(torch.randint(0, 7, (53,), generator=torch.Generator().manual_seed(1)), 8)
    metric = TokenNLL()
    for batch in windows.split(2):  # uneven last batch
        nll, count = shifted_nll(model(batch).logits, batch)
        metric.update(nll, count)
    assert metric.count.item() == windows.shape[0] * 7
    assert math.exp(metric.compute().item()) == pytest.approx(hand_perplexity(model.table.detach(), windows), rel=1e-5)


def test_task_logs_val_and_test_perplexity():
    model = BigramLM()
    windows = non_overlapping_windows(torch.randint(0, 7, (64,), generator=torch.Generator().manual_seed(2)), 16)
    task = LanguageModelTask(model, optimizer=torch.optim.AdamW)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(WindowDataset(windows), batch_size=3)
    expected = hand_perplexity(model.table.detach(), windows)
    trainer.validate(task, dataloaders=loader, verbose=False)
    assert trainer.callback_metrics["val/perplexity"].item() == pytest.approx(expected, rel=1e-5)
    trainer.test(task, dataloaders=loader, verbose=False)
    assert trainer.callback_metrics["test/perplexity"].item() == pytest.approx(expected, rel=1e-5)
    assert trainer.callback_metrics["test/loss"].item() == pytest.approx(math.log(expected), rel=1e-5)


def test_freeze_patterns():
    task = LanguageModelTask(BigramLM(), optimizer=torch.optim.AdamW, freeze=["tab*"])
    assert not task.model.table.requires_grad
