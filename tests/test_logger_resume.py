"""A run killed mid-epoch and resumed keeps one history: TensorBoard, CSV and W&B (offline, read back from its
``.wandb`` files) show each metric at each step once, whether the run resumes from a step checkpoint or from the
checkpoint saved after a validation."""
import csv
import importlib.util
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from structured_compress.utils.loggers import WANDB_STEP_KEY, wandb_history

from .conftest import ROOT, needs_fashion_mnist

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("wandb") is None,
    reason="pip install -e '.[loggers]'")

RUN = ["model.depth=1", "model.embed_dim=24", "model.num_heads=2", "model.embed_layer.stem_channels=8",
       "datamodule.batch_size=16", "datamodule.eval_batch_size=128", "datamodule.augment=false",
       "trainer.max_epochs=2", "trainer.limit_train_batches=8", "trainer.limit_val_batches=2",
       "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu", "trainer.devices=1",
       "callbacks.step_checkpoint.every_n_train_steps=4", "callbacks.progress_bar=null",
       "callbacks.model_summary=null", "logger=[csv,tensorboard,wandb]"]
NOT_METRICS = {"step", "epoch", WANDB_STEP_KEY}  # "epoch" is logged with train and val rows, at one step


def run(args, tmp_path, expect_kill=False):
    # W&B writes its .wandb file in blocks, flushed every 15 s by default: flush often, so the killed session
    # records steps the resumed run replays (KillAtStep waits a moment before the kill)
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true", "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.05"}
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                            start_new_session=True,  # KillAtStep(whole_group=true) kills the run's group only
                            check=False, timeout=600, env=env)
    assert result.returncode == (-9 if expect_kill else 0), result.stdout[-2000:] + result.stderr[-3000:]


def csv_rows(run_dir):
    return list(csv.DictReader((run_dir / "csv" / "metrics.csv").read_text().splitlines()))


def steps_by_metric(rows, step_key):
    """``{metric: [steps it was logged at, in order]}`` of logged rows."""
    steps = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if key not in NOT_METRICS and not key.startswith("_") and value not in ("", None):
                steps[key].append(int(float(row[step_key])))
    return steps


def assert_each_step_once(steps, source):
    for key, logged in steps.items():
        assert key in NOT_METRICS or len(logged) == len(set(logged)), f"{source}: {key} twice at a step: {logged}"
    assert sorted(steps["train/loss"]) == list(range(16)), source
    assert sorted(steps["val/acc"]) == [7, 15], source
    assert sorted(steps["lr-AdamW/decay"]) == list(range(16)), source


@needs_fashion_mnist
@pytest.mark.parametrize("kill_at,checkpoint_step", [(14, 12), (10, 8)], ids=["step-checkpoint", "after-validation"])
def test_loggers_show_each_step_once_after_a_resume(tmp_path, kill_at, checkpoint_step):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    # killed after optimizer step kill_at: train steps up to kill_at - 2 (and lr at kill_at - 1) were logged, the
    # newest checkpoint (step 12; or 8, saved after the epoch's validation) is older, so the resumed run replays
    run([*RUN, f"hydra.run.dir={run_dir}", "+callbacks.kill._target_=tests.kill_at_step.KillAtStep",
         f"+callbacks.kill.step={kill_at}", "+callbacks.kill.delay_s=1.0", "+callbacks.kill.whole_group=true"],
        tmp_path, expect_kill=True)
    run_id = (run_dir / "wandb_run_id").read_text()
    logged = max(int(row["step"]) for row in csv_rows(run_dir) if row["train/loss"])
    assert logged == kill_at - 2 and logged >= checkpoint_step  # the killed run logged the checkpoint's step
    run([*RUN, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], tmp_path)

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # the killed run's file too
    assert_each_step_once({tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]},
                          "TensorBoard")

    assert_each_step_once(steps_by_metric(csv_rows(run_dir), "step"), "CSV")

    assert (run_dir / "wandb_run_id").read_text() == run_id  # the resumed run continues the same W&B run
    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(f"-{run_id}") for s in sessions)  # one run, two sessions
    killed, resumed = (list(wandb_history(s / f"run-{run_id}.wandb")) for s in sessions)
    assert max(steps_by_metric(killed, WANDB_STEP_KEY)["train/loss"]) >= checkpoint_step  # replayed steps recorded
    assert_each_step_once(steps_by_metric(killed + resumed, WANDB_STEP_KEY), "W&B")

    torn, data = tmp_path / "torn.wandb", (sessions[1] / f"run-{run_id}.wandb").read_bytes()
    for end in range(0, len(data), 500):  # a writer killed mid-record: the records before it still read back
        torn.write_bytes(data[:end])
        rows = list(wandb_history(torn))
        assert rows == resumed[:len(rows)]
