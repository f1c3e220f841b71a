"""Causal language-modelling data: a corpus joined with ``"\\n\\n"``, tokenized once, cut into contiguous
blocks for training and non-overlapping windows for perplexity (algorithms.md §8: the tail is dropped)."""
from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

from ..sources import load_tokenizer
from .loaders import ResumableDataLoader, make_loader

log = logging.getLogger(__name__)

SEPARATOR = "\n\n"


def tokenize_joined(tokenizer, texts: list[str], group_size: int | None = None,
                    separator: str = SEPARATOR) -> torch.Tensor:
    """Token ids of ``separator.join(texts)`` (by default ``"\\n\\n"``) as one 1-D tensor.

    ``group_size=None`` tokenizes the whole string in one call (exact, for evaluation). For large training
    corpora ``group_size`` texts are joined and tokenized at a time, the separator kept between groups.
    """
    texts = [t for t in texts if t is not None]
    if group_size is None:
        return torch.tensor(tokenizer(separator.join(texts), verbose=False)["input_ids"], dtype=torch.long)
    groups = [separator.join(texts[i:i + group_size]) + (separator if i + group_size < len(texts) else "")
              for i in range(0, len(texts), group_size)]
    ids = tokenizer(groups, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([t for chunk in ids for t in chunk], dtype=torch.long)


def non_overlapping_windows(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``[N // length, length]``: window i is ``tokens[length*i : length*(i+1)]``; the incomplete tail is dropped."""
    if length < 2:
        raise ValueError(f"window length must be at least 2 tokens, got {length}")
    count = tokens.numel() // length
    return tokens[: count * length].view(count, length)


class WindowDataset(Dataset):
    """Rows of a ``[N, L]`` token tensor; a batch is a ``[B, L]`` LongTensor of input ids (labels = inputs)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.windows[index]


class LanguageModelingDataModule(pl.LightningDataModule):
    """Subclasses return ``{"train", "val", "test"}`` lists of documents from :meth:`load_texts`.

    ``block_size``: training sequence length; ``eval_length``: perplexity window (the model's context, e.g.
    1024 for GPT-2, 2048 for OPT/LLaMA). ``max_eval_windows`` evaluates only the first windows -- such numbers
    are not comparable to full-split perplexities and a warning says so. ``separator`` joins the documents
    (GPTQ's PTB and C4 protocols join with a space).
    """

    def __init__(self, tokenizer: str, block_size: int = 1024, eval_length: int = 1024, batch_size: int = 8,
                 eval_batch_size: int = 8, num_workers: int = 0, train_group_size: int = 2000,
                 max_train_blocks: int | None = None, max_eval_windows: int | None = None,
                 separator: str = SEPARATOR):
        super().__init__()
        self.save_hyperparameters()
        self.windows: dict[str, torch.Tensor] = {}

    def load_texts(self) -> dict[str, list[str]]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.load_texts()

    def setup(self, stage: str | None = None) -> None:
        if self.windows:
            return
        hp = self.hparams
        tokenizer = load_tokenizer(hp.tokenizer)
        texts = self.load_texts()
        train_tokens = tokenize_joined(tokenizer, texts["train"], group_size=hp.train_group_size,
                                      separator=hp.separator)
        self.windows["train"] = non_overlapping_windows(train_tokens, hp.block_size)[: hp.max_train_blocks]
        for split in ("val", "test"):
            windows = non_overlapping_windows(tokenize_joined(tokenizer, texts[split], separator=hp.separator),
                                              hp.eval_length)
            if hp.max_eval_windows is not None and windows.shape[0] > hp.max_eval_windows:
                log.warning("%s perplexity over the first %d of %d windows only: not comparable to full-split "
                            "numbers", split, hp.max_eval_windows, windows.shape[0])
                windows = windows[: hp.max_eval_windows]
            self.windows[split] = windows
        log.info("%s: %s windows (train block %d, eval window %d tokens)", type(self).__name__,
                 {k: tuple(v.shape) for k, v in self.windows.items()}, hp.block_size, hp.eval_length)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> ResumableDataLoader:
        return make_loader(WindowDataset(self.windows[split]), batch_size, train=shuffle,
                           num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader("train", True, self.hparams.batch_size)

    def val_dataloader(self) -> ResumableDataLoader:
        return self._loader("val", False, self.hparams.eval_batch_size)

    def test_dataloader(self) -> ResumableDataLoader:
        return self._loader("test", False, self.hparams.eval_batch_size)
