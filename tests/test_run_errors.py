"""run.py's error policy: bad input is one line and exit 2; any other error keeps its traceback (terminal and
the run's log) and a non-zero status. A missing ``optimized_metric`` fails a multirun only."""
import logging
import os
import subprocess
import sys

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from structured_compress.config_checks import ConfigError
from structured_compress.runner import optimized_value

from .conftest import ROOT, compose_config, needs_fashion_mnist

SMALL_RUN = ["layer=dense", "logger=none", "trainer.max_steps=1", "trainer.max_epochs=1",
             "trainer.limit_test_batches=1", "datamodule.batch_size=8", "datamodule.num_workers=0"]


def run_py(args, tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={tmp_path / 'run'}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@needs_fashion_mnist
def test_error_inside_training_step_keeps_its_traceback(tmp_path):
    result = run_py([*SMALL_RUN, "task._target_=tests.broken_task.TrainingStepFails"], tmp_path)
    assert result.returncode not in (0, 2), result.stderr[-2000:]
    assert "Traceback" in result.stderr and "ValueError: boom inside training_step" in result.stderr
    assert not result.stderr.startswith("error: ")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "run failed\nTraceback (most recent call last):" in log
    assert "training_step" in log and "ValueError: boom inside training_step" in log


@needs_fashion_mnist
def test_missing_optimized_metric_is_a_warning_in_a_single_run(tmp_path):
    """No validation ran, so val/acc is missing: the run still succeeds and says so."""
    result = run_py([*SMALL_RUN, "trainer.limit_val_batches=0"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimized_metric=val/acc is not among this run's metrics" in result.stdout + result.stderr
    assert (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("mode", [RunMode.RUN, RunMode.MULTIRUN])
def test_missing_optimized_metric_fails_only_a_multirun(mode, tmp_path, caplog):
    cfg = compose_config([], tmp_path)
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.mode = mode
    HydraConfig.instance().set_config(cfg)
    metrics = {"metrics": {"test/acc": 0.5}}
    if mode == RunMode.MULTIRUN:
        with pytest.raises(ConfigError, match=r"^optimized_metric=val/acc is not among this run's metrics \(test/acc"):
            optimized_value(cfg, metrics)
    else:
        with caplog.at_level(logging.WARNING):
            assert optimized_value(cfg, metrics) is None
        assert "optimized_metric=val/acc is not among" in caplog.text
    assert optimized_value(cfg, {"metrics": {"val/acc": 0.7}}) == 0.7
