"""Kill -9 mid-epoch, resume, and finish exactly as an uninterrupted run with the same seed would."""
import csv
import json
import os
import subprocess
import sys

import torch

from structured_compress.utils.run_dir import continue_in_run_dir

from .conftest import ROOT, needs_fashion_mnist

RUN = ["model.depth=1", "model.embed_dim=24", "model.num_heads=2", "model.embed_layer.stem_channels=8",
       "model.drop_path_rate=0.2",  # the resumed run must draw the same drop-path masks: RNG state in checkpoints
       "datamodule.batch_size=16", "datamodule.eval_batch_size=128", "datamodule.augment=false",
       "trainer.max_epochs=2", "trainer.limit_train_batches=8", "trainer.limit_val_batches=2",
       "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu", "trainer.devices=1",
       "callbacks.step_checkpoint.every_n_train_steps=4", "callbacks.progress_bar=null",
       "callbacks.model_summary=null", "logger=csv"]


def run(args, tmp_path, expect_kill=False):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    if expect_kill:
        assert result.returncode == -9, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@needs_fashion_mnist
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run([*RUN, f"hydra.run.dir={straight}"], tmp_path)
    # step 13 is the 5th batch of epoch 2; the newest checkpoint is step 12, mid-epoch
    run([*RUN, f"hydra.run.dir={killed}", "+callbacks.kill._target_=tests.kill_at_step.KillAtStep",
         "+callbacks.kill.step=13"], tmp_path, expect_kill=True)
    assert not (killed / "metrics.json").exists()
    (killed / "checkpoints" / ".last.ckpt.abc123.tmp").write_bytes(b"")  # what a kill during a save leaves
    run([*RUN, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"], tmp_path)  # continues in the same folder

    assert not list((killed / "checkpoints").glob(".*.tmp"))
    expected, resumed = (json.loads((d / "metrics.json").read_text()) for d in (straight, killed))
    assert resumed["resumed_from"].endswith("last.ckpt")
    assert resumed["metrics"] == expected["metrics"]
    a, b = final_state(straight), final_state(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader(open(killed / "csv" / "metrics.csv")))
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train_steps == sorted(set(train_steps)) and len(train_steps) == 16  # every step once, in order
    straight_rows = list(csv.DictReader(open(straight / "csv" / "metrics.csv")))
    assert [r["train/loss"] for r in rows if r.get("train/loss")] == \
           [r["train/loss"] for r in straight_rows if r.get("train/loss")]


@needs_fashion_mnist
def test_resume_auto_in_a_fixed_run_dir_skips_a_corrupt_checkpoint(tmp_path):
    """The preempted-job pattern: the same command (fixed hydra.run.dir, resume=auto) runs again."""
    run_dir = tmp_path / "job"
    args = [*RUN, "trainer.max_epochs=1", "resume=auto", f"hydra.run.dir={run_dir}"]
    run([*args, "+callbacks.kill._target_=tests.kill_at_step.KillAtStep", "+callbacks.kill.step=6"], tmp_path,
        expect_kill=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"torn")  # the newest file is corrupt
    result = run(args, tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("step_0000004.ckpt")
    assert "last.ckpt is truncated or corrupt; resuming from" in result.stdout + result.stderr


def make_run(runs, name, overrides, finished=False, checkpoint=True):
    folder = runs / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if checkpoint:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if finished:
        (folder / "metrics.json").write_text("{}")
    return folder


def test_resume_auto_picks_the_newest_unfinished_run_with_the_same_overrides(tmp_path):
    runs = tmp_path / "logs" / "train" / "runs"
    make_run(runs, "2026-01-01_00-00-00", ["layer.budget=0.25", "resume=auto"])
    wanted = make_run(runs, "2026-01-02_00-00-00", ["layer.budget=0.25", "resume=auto"])
    make_run(runs, "2026-01-03_00-00-00", ["layer.budget=0.25"], finished=True)
    make_run(runs, "2026-01-04_00-00-00", ["layer.budget=0.5"])
    make_run(runs, "2026-01-05_00-00-00", ["layer.budget=0.25"], checkpoint=False)
    args = ["resume=auto", "layer.budget=0.25"]
    assert continue_in_run_dir(args, tmp_path) == [*args, f"hydra.run.dir={wanted}"]
    assert continue_in_run_dir(["resume=auto", "layer.budget=0.1"], tmp_path) == ["resume=auto", "layer.budget=0.1"]
    ckpt = wanted / "checkpoints" / "last.ckpt"
    assert continue_in_run_dir([f"ckpt_path={ckpt}"], tmp_path)[-1] == f"hydra.run.dir={wanted}"
    assert continue_in_run_dir(["-m", f"ckpt_path={ckpt}"], tmp_path) == ["-m", f"ckpt_path={ckpt}"]
