"""scripts/make_table.py on run folders laid out as Hydra and the run modes write them (built here, no training)."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts.make_table import ID_COLUMNS, failure_message, load_rows, main, read_csv
from structured_compress.utils.logs import record_failure

from .conftest import ROOT


def write_run(run_dir: Path, experiment: str, layer: str, budget: float, seed: int, *, acc: float | None = None,
              macs: int = 1000, params: int = 500, log: str = "", checkpoint: bool = False,
              compress: dict | None = None, extra_overrides: tuple[str, ...] = ()) -> Path:
    """A run folder: ``.hydra/`` always; ``flops.json`` (written at the start of training); ``metrics.json`` only
    when ``acc`` is given (the run finished); ``compress``: the size fields of a mode=compress run."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    mode = "compress" if compress else "train"
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump({
        "experiment_name": "${hydra:runtime.choices.experiment}", "seed": seed, "mode": {"name": mode},
        "model": {"name": "vit_tiny_patch16_224"}, "layer": {"name": layer, "budget": budget}}))
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {
        "experiment": experiment, "model": "vit_fmnist", "layer": layer, "mode": mode}}}}))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(
        [f"experiment={experiment}", f"layer.budget={budget}", f"seed={seed}", "sweep=offline/grid",
         *extra_overrides]))
    (run_dir / "flops.json").write_text(json.dumps({"linear_macs_per_sample": macs,
                                                    "executed_flops_per_sample": 2 * macs}))
    (run_dir / "train.log").write_text(log)
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if acc is not None:
        results = {"metrics": {"test/acc": acc, "test/loss": 1 - acc, "val/acc": acc,
                               "flops/linear_macs_per_sample": float(macs)},
                   "layer_type": layer, "budget": budget, "experiment": experiment, "wall_time_s": 10.0 + seed,
                   "params": {"replaced_layers": 2, "replaced_params_before": 800,
                              "replaced_params_after": params - 200, "model_params_before": 1000,
                              "model_params_after": params},
                   **(compress or {})}
        (run_dir / "metrics.json").write_text(json.dumps(results))
    return run_dir


TRACEBACK = ("[2026-11-24 10:00:00,000][structured_compress.train][INFO] - training\n"
             "Traceback (most recent call last):\n"
             '  File "run.py", line 1, in <module>\nRuntimeError: boom at step 3\n')


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """lowrank 0.5: seeds 0, 1 finished, seed 2 failed; lowrank 0.25: one finished, one unfinished; dense."""
    root = tmp_path / "grid"
    write_run(root / "0", "fmnist/vit-lowrank", "lowrank", 0.5, 0, acc=0.8, macs=1000, params=500)
    write_run(root / "1", "fmnist/vit-lowrank", "lowrank", 0.5, 1, acc=0.9, macs=1000, params=500)
    write_run(root / "2", "fmnist/vit-lowrank", "lowrank", 0.5, 2, log=TRACEBACK, checkpoint=True)
    write_run(root / "3", "fmnist/vit-lowrank", "lowrank", 0.25, 0, acc=0.7, macs=600, params=300)
    write_run(root / "10", "fmnist/vit-lowrank", "lowrank", 0.25, 1, checkpoint=True, macs=600)
    write_run(tmp_path / "dense" / "0", "fmnist/vit-dense", "dense", 1.0, 0, acc=0.95, macs=2000, params=1000)
    return tmp_path


def test_tidy_csv_has_one_number_per_cell_and_keeps_every_run(sweep, tmp_path):
    out = tmp_path / "runs.csv"
    assert main([str(sweep / "grid"), str(sweep / "dense"), "--csv", str(out), "--json", str(tmp_path / "r.json")]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [Path(r["run_dir"]).name for r in rows] == ["0", "1", "2", "3", "10", "0"]  # job order, 10 after 3
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "unfinished", "ok"]
    for row in rows:
        for column, text in row.items():
            if column not in ID_COLUMNS and text:
                float(text)  # every non-id cell is a plain number
    first = rows[0]
    assert (int(first["params_total"]), int(first["params_dense"])) == (500, 1000)
    assert (int(first["replaced_params_before"]), int(first["replaced_params_after"])) == (800, 300)
    assert int(first["macs_per_sample"]) == 1000 and float(first["test/acc"]) == 0.8
    assert (first["model"], first["method"], first["budget"], first["seed"]) == ("vit_fmnist", "lowrank", "0.5", "0")
    assert first["overrides"] == ""  # experiment, budget, seed and sweep have their own columns
    failed = rows[2]
    assert failed["detail"] == "train.log: RuntimeError: boom at step 3" and failed["test/acc"] == ""
    assert rows[4]["detail"] == "newest checkpoint last.ckpt"
    assert int(rows[4]["macs_per_sample"]) == 600  # from flops.json: unfinished runs keep their cost
    assert len(json.loads((tmp_path / "r.json").read_text())) == 6


def test_csv_reads_back_to_the_same_rows(sweep, tmp_path):
    rows = load_rows([sweep])
    main([str(sweep), "--csv", str(tmp_path / "runs.csv")])
    assert read_csv(tmp_path / "runs.csv") == [{k: v for k, v in r.items() if v not in (None, "")} for r in rows]


def markdown_row(table: str, *cells: str) -> list[str]:
    """The cells of the one Markdown row that starts with ``cells``."""
    found = [line for line in table.splitlines() if line.startswith("| " + " | ".join(cells) + " |")]
    assert len(found) == 1, table
    return [c.strip() for c in found[0].strip("|").split("|")]


def header(table: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith("| "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_markdown_groups_seeds_into_mean_and_std_and_says_which_failed(sweep, tmp_path, capsys):
    main([str(sweep), "--csv", str(tmp_path / "runs.csv"), "--metrics", "test/acc", "params_total"])
    table = capsys.readouterr().out
    assert "All rows: mode=train" in table  # constant ids leave the table, but model and method
    assert header(table) == ["model", "method", "budget", "experiment", "n", "status", "test/acc", "params_total"]
    std = abs(0.9 - 0.8) / math.sqrt(2)  # sample standard deviation of two values
    row = markdown_row(table, "vit_fmnist", "lowrank", "0.5")
    assert row[4:] == ["2", "2 ok, 1 failed (seed 2)", f"0.85 ± {std:.2g}", "500"]  # equal values: no ± 0
    assert markdown_row(table, "vit_fmnist", "lowrank", "0.25")[4:6] == ["1", "1 ok, 1 unfinished (seed 1)"]
    assert markdown_row(table, "vit_fmnist", "dense", "1.0")[4:] == ["1", "ok", "0.95", "1000"]
    assert "sample standard deviation" in table
    failed = markdown_row(table, str(sweep / "grid" / "2"))
    assert failed[1:] == ["failed", "train.log: RuntimeError: boom at step 3"]
    assert markdown_row(table, str(sweep / "grid" / "10"))[1] == "unfinished"


def test_spread_range_and_group_by(sweep, tmp_path, capsys):
    main([str(sweep / "grid"), "--csv", str(tmp_path / "a.csv"), "--metrics", "test/acc", "--spread", "range"])
    assert markdown_row(capsys.readouterr().out, "vit_fmnist", "lowrank", "0.5")[-1] == "0.85 (0.8..0.9)"
    main([str(sweep / "grid"), "--csv", str(tmp_path / "b.csv"), "--metrics", "test/acc", "--group-by", "method"])
    table = capsys.readouterr().out
    assert header(table) == ["method", "n", "status", "test/acc"]  # one group
    assert markdown_row(table, "lowrank", "3")[3] == "0.8 ± 0.1"  # 0.8, 0.9 and 0.7 pooled


def test_failed_group_without_finished_runs_is_a_row_with_its_cost(tmp_path, capsys):
    write_run(tmp_path / "0", "fmnist/vit-monarch", "monarch", 0.1, 0, log="error: layer.budget too small\n",
              macs=321)
    write_run(tmp_path / "1", "fmnist/vit-lowrank", "lowrank", 0.1, 0, acc=0.5)
    main([str(tmp_path), "--csv", str(tmp_path / "runs.csv"), "--metrics", "test/acc", "macs_per_sample"])
    table = capsys.readouterr().out
    assert markdown_row(table, "vit_fmnist", "monarch")[3:] == ["0", "1 failed (seed 0)", "", "321"]
    assert "error: layer.budget too small" in table


def test_compress_run_reports_sizes_and_baseline(tmp_path, capsys):
    sizes = {"bytes_on_disk": 12345, "ratio_vs_fp16": 2.5, "ratio_vs_fp32": 5.0, "compress_time_s": 1.5,
             "replaced_bytes": 4000, "baseline_metrics": {"test/acc": 0.97}, "storage": {"dtype": "float16"}}
    run = write_run(tmp_path / "c", "fmnist/vit-svdq", "svdq", 0.5, 0, acc=0.96, compress=sizes)
    main([str(run), "--csv", str(tmp_path / "runs.csv")])  # a single run folder, not a sweep
    table = capsys.readouterr().out
    assert header(table) == ["model", "method", "n", "status", "test/acc", "baseline/test/acc", "params_total",
                             "macs_per_sample", "bytes_on_disk", "ratio_vs_fp16", "wall_time_s"]
    (row,) = read_csv(tmp_path / "runs.csv")
    assert (row["mode"], row["bytes_on_disk"], row["ratio_vs_fp16"], row["baseline/test/acc"]) == \
        ("compress", 12345, 2.5, 0.97)


def test_extra_overrides_separate_groups(tmp_path, capsys):
    for seed, rank in ((0, 4), (1, 8)):
        write_run(tmp_path / str(seed), "e", "lowrank", 0.5, seed, acc=0.5 + seed / 10,
                  extra_overrides=(f"layer.options.rank={rank}", "logger=none", "hydra.job.chdir=false"))
    main([str(tmp_path), "--csv", str(tmp_path / "runs.csv"), "--metrics", "test/acc"])
    table = capsys.readouterr().out
    assert markdown_row(table, "vit_fmnist", "lowrank", "layer.options.rank=4")[3:] == ["1", "ok", "0.5"]
    assert markdown_row(table, "vit_fmnist", "lowrank", "layer.options.rank=8")[3:] == ["1", "ok", "0.6"]


def test_bad_inputs_name_the_option(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(sweep), "--csv", str(tmp_path / "a.csv"), "--metrics", "test/bleu"])
    assert "--metrics test/bleu: no run has it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(sweep), "--csv", str(tmp_path / "a.csv"), "--group-by", "lr"])
    assert "--group-by lr: not an id column" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "no run under" in capsys.readouterr().err


def test_failure_message_reads_tracebacks_and_error_lines():
    assert failure_message(TRACEBACK) == "RuntimeError: boom at step 3"
    chained = TRACEBACK + "\nDuring handling of the above exception, another exception occurred:\n\n" + TRACEBACK
    assert failure_message(chained) == "RuntimeError: boom at step 3"
    assert failure_message("[t][run][ERROR] - error: seed=abc: not an integer\n") == "error: seed=abc: not an integer"
    assert failure_message("error: layer.budget=2: must be in (0, 1]\n") == "error: layer.budget=2: must be in (0, 1]"
    assert failure_message("[t][structured_compress.train][INFO] - no errors here; Error handling is fine\n") is None


def test_record_failure_writes_the_traceback_to_log_files_only(tmp_path, capsys):
    handler = logging.FileHandler(tmp_path / "train.log")
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        try:
            raise KeyError("no such layer")
        except KeyError:
            record_failure("run failed", with_traceback=True)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = (tmp_path / "train.log").read_text()
    assert text.startswith("[run][ERROR] - run failed\nTraceback (most recent call last):")
    assert failure_message(text) == "KeyError: 'no such layer'"
    assert capsys.readouterr().err == ""


def test_run_py_error_marks_the_run_failed(tmp_path, capsys):
    """A config error ends run.py with one line on stderr and the same line in the run's log."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "trainer.max_epochs=-1",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: trainer.max_epochs=-1")
    main([str(run_dir), "--csv", str(tmp_path / "runs.csv")])
    (row,) = read_csv(tmp_path / "runs.csv")
    assert row["status"] == "failed" and row["detail"] == "train.log: " + result.stderr.strip()[:200]


def test_benchmark_json_lines_become_rows_with_the_codec_knob(tmp_path, capsys):
    lines = [{"model": "minilm", "codec": "svdq-int8-e0.05", "storage": "fp16", "ratio_vs_fp16": 2.0,
              "cosine_mean": 0.99},
             {"model": "minilm", "codec": "lowrank-0.25", "storage": "emb4", "ratio_vs_fp16": 3.5, "cosine_mean": 0.4},
             {"model": "minilm", "codec": "hyper", "storage": "fp16", "ratio_vs_fp16": 1.5, "cosine_mean": 0.995},
             {"model": "minilm", "codec": "tsvd-0.05", "storage": "fp16", "ratio_vs_fp16": 1.1, "cosine_mean": 0.9},
             {"model": "minilm", "codec": "none", "storage": "fp16", "ratio_vs_fp16": 1.0, "cosine_mean": 1.0},
             {"model": "lm", "codec": "int8-rtn", "storage": "emb4", "calibration_windows": 16, "perplexity": 9.0}]
    path = tmp_path / "whole_file_minilm_cpu.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    rows = load_rows([path])
    assert [(r["method"], r["budget"], r["overrides"]) for r in rows] == [
        ("svdq-int8 (fp16)", None, "max_error=0.05"), ("lowrank (emb4)", 0.25, ""), ("hyper (fp16)", None, ""),
        ("tsvd (fp16)", None, "tolerance=0.05"), ("dense", None, ""),  # the plots' baseline star
        ("int8-rtn (emb4)", None, "calibration_windows=16")]
    assert [r.get("cosine_mean") for r in rows] == [0.99, 0.4, 0.995, 0.9, 1.0, None]
    assert main([str(path), "--metrics", "cosine_mean", "ratio_vs_fp16"]) == 0
    assert "| minilm | svdq-int8 (fp16) |" in capsys.readouterr().out
    assert path.with_suffix(".csv").is_file()
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"whole_file_minilm_cpu.jsonl:1 is not a JSON line"):
        load_rows([path])
