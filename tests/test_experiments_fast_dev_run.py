"""Every experiment config runs end to end (train or compress mode) under debug=fast_dev_run, on the tiny
stand-ins of tests/stand_ins.py where its weights or data come from a hub or the user."""
from __future__ import annotations

import os

import numpy as np
import pytest

from .conftest import experiment_names
from .stand_ins import run_with_stand_ins

# real tweets and a real MiniLM, 20-30 s each on 2 busy cores (tweets/minilm-lowrank also runs in
# test_offline_experiments.py); test_configs.py composes and instantiates them in every run
SLOW = {"tweets/minilm-dense", "tweets/minilm-gaudi", "tweets/minilm-lowrank"}


def marked(name: str):
    """The experiment name, skipped unless RUN_SLOW=1 when it is in SLOW."""
    if name not in SLOW:
        return name
    return pytest.param(name, marks=[pytest.mark.slow, pytest.mark.skipif(
        not os.environ.get("RUN_SLOW"), reason="slow (real data and model, 20-30 s on CPU): set RUN_SLOW=1")])


@pytest.mark.parametrize("experiment", [marked(name) for name in experiment_names()])
def test_experiment_runs_under_fast_dev_run(experiment, stand_ins, tmp_path):
    metrics, cfg = run_with_stand_ins([f"experiment={experiment}"], stand_ins, tmp_path)
    target = cfg.optimized_metric
    assert target in metrics["metrics"], f"{target} not among {sorted(metrics['metrics'])}"
    assert np.isfinite(metrics["metrics"][target])
    assert metrics["params"]["replaced_layers"] > 0
