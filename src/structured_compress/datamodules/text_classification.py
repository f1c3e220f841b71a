"""Shared base for sentence (pair) classification and regression: tokenize with the model's own tokenizer,
pad each batch to its longest sequence (``DataCollatorWithPadding``)."""
from __future__ import annotations

import logging

import lightning.pytorch as pl

from ..sources import load_tokenizer
from .loaders import ResumableDataLoader, make_loader

log = logging.getLogger(__name__)

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


class TextClassificationDataModule(pl.LightningDataModule):
    """Subclasses return raw splits from :meth:`load_splits`; this class tokenizes them and serves batches.

    Batches are dicts with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for BERT) and ``labels``.
    ``val`` and ``test`` may hold several evaluation sets (MNLI matched + mismatched): one dataloader each.
    """

    text_keys: tuple[str, str | None] = ("sentence", None)

    def __init__(self, tokenizer: str, max_length: int = 128, batch_size: int = 32, eval_batch_size: int = 64,
                 num_workers: int = 0, max_train_samples: int | None = None, max_eval_samples: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = None
        self.collator = None
        self.splits: dict[str, list] = {}

    def load_splits(self) -> dict[str, list]:
        """``{"train": [Dataset], "val": [Dataset, ...], "test": [Dataset, ...]}`` with text and ``label`` columns."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.load_splits()  # fail fast, before the model trains, when the data is missing

    def _tokenize(self, dataset, limit: int | None):
        if limit is not None and len(dataset) > limit:
            dataset = dataset.select(range(limit))
        first, second = self.text_keys

        def encode(batch):
            texts = (batch[first],) if second is None else (batch[first], batch[second])
            return self.tokenizer(*texts, truncation=True, max_length=self.hparams.max_length)

        dataset = dataset.map(encode, batched=True, keep_in_memory=True, desc="tokenizing")
        dataset = dataset.rename_column("label", "labels")
        return dataset.select_columns([c for c in MODEL_COLUMNS if c in dataset.column_names])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from transformers import DataCollatorWithPadding

        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        self.collator = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        raw = self.load_splits()
        self.splits = {
            "train": [self._tokenize(raw["train"][0], self.hparams.max_train_samples)],
            "val": [self._tokenize(d, self.hparams.max_eval_samples) for d in raw["val"]],
            "test": [self._tokenize(d, self.hparams.max_eval_samples) for d in raw["test"]],
        }
        log.info("%s: %d train, %s val, %s test examples", type(self).__name__, len(self.splits["train"][0]),
                 [len(d) for d in self.splits["val"]], [len(d) for d in self.splits["test"]])

    def _loader(self, dataset, shuffle: bool, batch_size: int) -> ResumableDataLoader:
        return make_loader(dataset, batch_size, train=shuffle, num_workers=self.hparams.num_workers,
                           collate_fn=self.collator)

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.splits["train"][0], True, self.hparams.batch_size)

    def val_dataloader(self):
        loaders = [self._loader(d, False, self.hparams.eval_batch_size) for d in self.splits["val"]]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self):
        loaders = [self._loader(d, False, self.hparams.eval_batch_size) for d in self.splits["test"]]
        return loaders[0] if len(loaders) == 1 else loaders
