"""The launcher and sweeper configs users run (`pip install -e '.[cluster]'`): each composes, the Optuna direction
follows optimized_mode, and a 2-trial Optuna sweep runs in 2 parallel local jobs under fast_dev_run."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

from .conftest import ROOT, compose_config, needs_fashion_mnist


def plugin(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} not installed: pip install -e '.[cluster]' "
                                     "(make install EXTRAS=cluster)")


needs_submitit = plugin("hydra_plugins.hydra_submitit_launcher")
needs_joblib = plugin("hydra_plugins.hydra_joblib_launcher")
needs_optuna = plugin("hydra_plugins.hydra_optuna_sweeper")


@needs_submitit
def test_slurm_launcher_composes(tmp_path):
    cfg = compose_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"],
                         tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 4, 1440)
    assert launcher.max_num_timeout > 0  # requeued after a time-out, resuming with ckpt_path=last


@needs_joblib
def test_local_launcher_composes(tmp_path):
    cfg = compose_config(["hydra/launcher=local"], tmp_path)
    assert cfg.hydra.launcher._target_.endswith("joblib_launcher.JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


@needs_optuna
@pytest.mark.parametrize("overrides,direction", [([], "maximize"), (["optimized_mode=min"], "minimize"),
                                                 (["experiment=wiki_offline/gemma270m-dense"], "minimize")])
def test_optuna_direction_follows_optimized_mode(overrides, direction, tmp_path):
    cfg = compose_config(["hparams_search=optuna", *overrides], tmp_path)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == direction


@needs_fashion_mnist
@needs_joblib
@needs_optuna
def test_two_trial_optuna_sweep_on_two_local_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "hparams_search=optuna", "hydra/launcher=local",
           "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={sweep_dir}", "debug=fast_dev_run",
           "callbacks.progress_bar=null", "callbacks.model_summary=null"]
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scores = [json.loads((sweep_dir / str(job) / "metrics.json").read_text())["metrics"]["val/acc"] for job in (0, 1)]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(scores))  # maximised the returned optimized_metric
    assert set(best["best_params"]) == {"task.optimizer.lr", "layer.budget"}
