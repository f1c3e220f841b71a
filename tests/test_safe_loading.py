"""Checkpoints load weights-only: a pickled foreign callable is refused without running, old files load only
with trust_checkpoint=true, and the project's own checkpoints load through resume and mode=eval."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from structured_compress import pipeline
from structured_compress.errors import UserInputError
from structured_compress.utils.checkpoints import load_checkpoint_file
from structured_compress.utils.resume import is_readable_checkpoint

from .conftest import ROOT, needs_fashion_mnist

RUN = ["model.depth=1", "model.embed_dim=24", "model.num_heads=2", "model.embed_layer.stem_channels=8",
       "datamodule.batch_size=16", "datamodule.eval_batch_size=128", "trainer.max_epochs=1",
       "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
       "trainer.accelerator=cpu", "trainer.devices=1", "callbacks.step_checkpoint.every_n_train_steps=2",
       "callbacks.progress_bar=null", "callbacks.model_summary=null", "logger=csv"]


class CreatesFile:
    """Unpickling it runs ``os.system`` (what a hostile checkpoint does); here it only creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run(args, tmp_path, returncode=0):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True,
                            check=False, timeout=600, env={**os.environ, "PROJECT_ROOT": str(tmp_path)})
    assert result.returncode == returncode, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_a_checkpoint_pickling_os_system_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "payload": CreatesFile(marker)}, path)
    for load in (load_checkpoint_file, pipeline.read_checkpoint, pipeline.read_state_dict):
        with pytest.raises(UserInputError, match=r"needs posix\.system, .*trust_checkpoint=true") as refused:
            load(path)
        assert "\n" not in str(refused.value)
    assert not is_readable_checkpoint(path)  # resume skips it
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run: its checkpoints are what this project writes."""
    tmp_path = tmp_path_factory.mktemp("safe")
    run([*RUN, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    return tmp_path / "run"


@needs_fashion_mnist
def test_project_checkpoints_load_weights_only_through_resume_and_eval(trained, tmp_path):
    assert load_checkpoint_file(trained / "checkpoints" / "last.ckpt")["global_step"] == 4
    run([*RUN, "trainer.max_epochs=2", f"ckpt_path={trained / 'checkpoints' / 'step_0000002.ckpt'}"], tmp_path)
    assert json.loads((trained / "metrics.json").read_text())["resumed_from"].endswith("step_0000002.ckpt")
    run([*RUN, "mode=eval", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
         f"hydra.run.dir={tmp_path / 'eval'}"], tmp_path)
    assert "test/acc" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]


@needs_fashion_mnist
def test_an_old_checkpoint_loads_only_with_trust_checkpoint(trained, tmp_path):
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["args"] = argparse.Namespace(lr=0.1)  # as old Lightning versions saved them
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    eval_run = [*RUN, "mode=eval", f"ckpt_path={old}"]
    refused = run([*eval_run, f"hydra.run.dir={tmp_path / 'refused'}"], tmp_path, returncode=2)
    assert f"error: checkpoint {old} needs argparse.Namespace" in refused.stderr
    run([*eval_run, "trust_checkpoint=true", f"hydra.run.dir={tmp_path / 'trusted'}"], tmp_path)
    assert (tmp_path / "trusted" / "metrics.json").exists()
