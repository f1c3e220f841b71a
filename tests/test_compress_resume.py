"""``mode=compress`` on a causal LM: block by block from a meta-device skeleton, and a run killed mid-way then
re-run with the same command (fixed run folder, ``resume=auto``) writes the same bytes as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import compose_config
from .stand_ins import stand_in_overrides

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ["experiment=wiki_offline/gemma270m-ptq-svdq-int8", "datamodule.max_eval_windows=1"]


def run(args, tmp_path, kill_after=None):
    script = [str(ROOT / "tests" / "kill_after_block.py")] if kill_after else [str(ROOT / "run.py")]
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "KILL_AFTER_BLOCKS": str(kill_after or 0),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


def test_killed_compression_resumes_at_the_first_unfinished_block(stand_ins, tmp_path):
    args = [*EXPERIMENT, *stand_in_overrides(compose_config(EXPERIMENT, tmp_path), stand_ins), "resume=auto"]
    straight = run([*args, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    log = (tmp_path / "straight" / "compress.log").read_text() if (tmp_path / "straight" / "compress.log").exists() \
        else straight.stdout + straight.stderr
    assert "weights are read block by block" in log and "block by block over model.layers (2 blocks)" in log

    job = tmp_path / "job"
    killed = run([*args, f"hydra.run.dir={job}"], tmp_path, kill_after=1)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (job / "compressed").iterdir()) == ["compressed-00001-of-00003.safetensors"]
    resumed = run([*args, f"hydra.run.dir={job}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "restored from compressed-00001-of-00003.safetensors" in resumed.stdout + resumed.stderr
    names = sorted(p.name for p in (tmp_path / "straight" / "compressed").iterdir())
    assert names == sorted(p.name for p in (job / "compressed").iterdir())
    for name in names:
        assert (job / "compressed" / name).read_bytes() == (tmp_path / "straight" / "compressed" / name).read_bytes()
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (tmp_path / "straight", job)]
    assert metrics[0]["metrics"] == metrics[1]["metrics"]  # the same model scored the same
