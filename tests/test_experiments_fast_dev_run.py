"""Every experiment config runs end to end (train or compress mode) under debug=fast_dev_run, on the tiny
stand-ins of tests/stand_ins.py where its weights or data come from a hub or the user."""
from __future__ import annotations

import numpy as np
import pytest

from .conftest import experiment_names
from .stand_ins import marked_slow, run_with_stand_ins


@pytest.mark.parametrize("experiment", [marked_slow(name, name) for name in experiment_names()])
def test_experiment_runs_under_fast_dev_run(experiment, stand_ins, tmp_path):
    metrics, cfg = run_with_stand_ins([f"experiment={experiment}"], stand_ins, tmp_path)
    target = cfg.optimized_metric
    assert target in metrics["metrics"], f"{target} not among {sorted(metrics['metrics'])}"
    assert np.isfinite(metrics["metrics"][target])
    assert metrics["params"]["replaced_layers"] > 0
