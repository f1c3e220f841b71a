"""End to end through `run.py`: the default experiment under fast_dev_run, a 2-run sweep, the table."""
import csv
import json
import os
import subprocess
import sys

import torch

from scripts.make_table import main as make_table

from .conftest import ROOT, needs_fashion_mnist


def run(args, tmp_path, multirun=False):
    """run.py with PROJECT_ROOT=tmp_path, so logs land in tmp_path/logs as they would in a checkout."""
    cmd = [sys.executable, str(ROOT / "run.py"), *(["-m"] if multirun else []), *args]
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@needs_fashion_mnist
def test_default_experiment_fast_dev_run_writes_metrics(tmp_path):
    run(["debug=fast_dev_run"], tmp_path)
    (metrics_file,) = (tmp_path / "logs").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["layer_type"] == "lowrank" and metrics["budget"] == 0.5
    assert metrics["experiment"] == "fashion_mnist/vit-lowrank"
    assert 0 <= metrics["metrics"]["test/acc"] <= 1
    assert metrics["metrics"]["flops/linear_macs_per_sample"] > 0
    params = metrics["params"]
    assert params["replaced_params_after"] < params["replaced_params_before"]
    assert params["model_params_after"] < params["model_params_before"]
    assert len(metrics["layers"]) == params["replaced_layers"] == 16


@needs_fashion_mnist
def test_budget_sweep_and_table(tmp_path, capsys):
    run(["layer.budget=0.1,0.5", "trainer.max_steps=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.max_epochs=1", "logger=none",
         "optimized_metric=test/acc"],  # 2 steps end before the first validation
        tmp_path, multirun=True)
    (sweep,) = (tmp_path / "logs" / "train" / "multirun").iterdir()  # the default sweep dir, as users get it
    assert make_table([str(sweep), "--json", str(tmp_path / "rows.json")]) == 0
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 2
    table = capsys.readouterr().out
    assert "| lowrank | 0.1 |" in table and "| lowrank | 0.5 |" in table
    rows = list(csv.DictReader(open(sweep / "results.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    small, large = sorted(rows, key=lambda r: float(r["budget"]))
    assert int(small["params_total"]) < int(large["params_total"])
    assert int(small["macs_per_sample"]) < int(large["macs_per_sample"])


@needs_fashion_mnist
def test_compress_mode_saves_a_loadable_file_and_reports_bytes(tmp_path, capsys):
    run(["mode=compress", "layer=svdq", "layer.include=[blocks.*]", "layer.max_error=0.05",
         "layer.calibration_batches=1", "datamodule.batch_size=16", "trainer.limit_test_batches=1",
         "logger=none", "callbacks=none"], tmp_path)
    (metrics_file,) = (tmp_path / "logs").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["layer_type"] == "svdq"
    assert 0 < metrics["bytes_on_disk"] < metrics["dense_fp32_bytes"]
    assert 0 < metrics["replaced_bytes"] < metrics["replaced_fp32_bytes"]
    assert metrics["ratio_vs_fp32"] > 1
    assert "test/acc" in metrics["metrics"] and "test/acc" in metrics["baseline_metrics"]
    assert (metrics_file.parent / "compressed" / "manifest.json").exists()
    from structured_compress.io import load_compressed  # the folder describes its own model (the Hydra model config)

    model = load_compressed(metrics["compressed_path"])
    assert sum(type(m).__name__ == "SVDQuantLinear" for m in model.modules()) > 0
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert make_table([str(metrics_file.parent)]) == 0
    assert "| bytes_on_disk | ratio_vs_fp16 |" in capsys.readouterr().out
