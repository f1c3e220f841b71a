"""SIGTERM mid-epoch writes a checkpoint of that exact step and exits 143, and ``resume=auto`` then finishes exactly
as an uninterrupted run; under 2-process gloo DDP the ranks agree to stop, and a NaN on one rank stops both."""
import json
import os
import re
import subprocess
import sys
import time

import torch

from .conftest import ROOT, needs_fashion_mnist
from .test_resume import RUN, final_state

SIGNAL = "+callbacks.signal._target_=tests.fault_injection.SignalAtStep"
SIGNAL_AT_14 = [SIGNAL, "+callbacks.signal.step=14"]
DDP = [a for a in RUN if a != "trainer.devices=1"] + ["trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1"]


def run(args, tmp_path, timeout=600):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def saved_step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@needs_fashion_mnist
def test_sigterm_mid_epoch_checkpoints_that_step_exits_143_and_resumes_exactly(tmp_path):
    straight, job = tmp_path / "straight", tmp_path / "job"
    assert run([*RUN, f"hydra.run.dir={straight}"], tmp_path).returncode == 0
    # the same command twice, as a requeued job runs it; the signal arrives during step 15 (3rd batch of epoch 2)
    command = [*RUN, "resume=auto", f"hydra.run.dir={job}", *SIGNAL_AT_14]
    stopped = run(command, tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "preempted: SIGTERM at step 15 (epoch 1)" in stopped.stderr
    checkpoints = job / "checkpoints"
    assert saved_step(checkpoints / "last.ckpt") == 15  # nothing lost; the newest step checkpoint is step 12
    assert max(p.name for p in checkpoints.glob("step_*.ckpt")) == "step_0000012.ckpt"
    assert not (job / "metrics.json").exists()

    resumed = run(command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (straight, job))
    assert got["resumed_from"].endswith("last.ckpt") and got["metrics"] == expected["metrics"]
    a, b = final_state(straight), final_state(job)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_fashion_mnist
def test_sigusr1_before_the_time_limit_checkpoints_that_step_and_exits_138(tmp_path):
    job = tmp_path / "job"
    stopped = run([*RUN, "resume=auto", f"hydra.run.dir={job}", *SIGNAL_AT_14, "+callbacks.signal.name=SIGUSR1"],
                  tmp_path)
    assert stopped.returncode == 138, stopped.stderr[-3000:]
    assert "preempted: SIGUSR1 at step 15 (epoch 1)" in stopped.stderr
    assert saved_step(job / "checkpoints" / "last.ckpt") == 15


@needs_fashion_mnist
def test_without_the_callback_sigterm_loses_the_steps_since_the_last_step_checkpoint(tmp_path):
    """The behaviour before (Lightning's own SIGTERM handling): status 0 and no checkpoint of the stopping step."""
    job = tmp_path / "job"
    stopped = run([*RUN, "callbacks.preemption=null", f"hydra.run.dir={job}", *SIGNAL_AT_14], tmp_path)
    assert stopped.returncode == 0 and not (job / "metrics.json").exists()
    assert saved_step(job / "checkpoints" / "last.ckpt") == 12  # steps 13-15 lost


@needs_fashion_mnist
def test_ddp_sigterm_to_the_launcher_one_checkpoint_and_identical_ranks_after_resume(tmp_path):
    job, states = tmp_path / "job", tmp_path / "ranks"
    command = [*DDP, "resume=auto", f"hydra.run.dir={job}", SIGNAL, "+callbacks.signal.step=2",
               "+callbacks.rank_state._target_=tests.rank_state.SaveRankState",
               f"+callbacks.rank_state.directory={states}"]
    stopped = run(command, tmp_path, timeout=300)
    assert stopped.returncode == 143, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    assert stopped.stderr.count("preempted: SIGTERM at step 3 (epoch 0)") == 2  # both ranks, the same step
    assert [p.name for p in (job / "checkpoints").iterdir()] == ["last.ckpt"]  # one file, written by rank 0
    assert saved_step(job / "checkpoints" / "last.ckpt") == 3

    resumed = run(command, tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert json.loads((job / "metrics.json").read_text())["resumed_from"].endswith("last.ckpt")
    rank0, rank1 = (torch.load(states / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


@needs_fashion_mnist
def test_ddp_nan_on_rank_1_only_stops_both_ranks_with_the_same_message(tmp_path):
    command = [*DDP, f"hydra.run.dir={tmp_path / 'job'}", "+callbacks.nan._target_=tests.fault_injection.NaNOnRank",
               "+callbacks.nan.step=3", "+callbacks.nan.rank=1"]
    stopped = run(command, tmp_path, timeout=300)  # a hang would last until the 30-minute collective timeout
    seconds_to_stop = time.time() - float(re.search(r"NaN injected at ([\d.]+)", stopped.stdout).group(1))
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, output[-3000:]
    messages = re.findall(r"NonFiniteError: (.*)", output)
    assert len(messages) == 2 and messages[0] == messages[1], output[-3000:]
    assert messages[0].startswith("stopped at step 4 (epoch 0): rank 1: the training loss is nan")
    assert seconds_to_stop < 30
    print(f"both ranks stopped {seconds_to_stop:.1f} s after the NaN")
