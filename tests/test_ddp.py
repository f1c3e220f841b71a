"""Two gloo processes on CPU through `trainer=ddp`, on the Gaudi fine-tune path: the ranks end with identical
parameters (Gaudi widths included, after GaudiShrink edits them) and write one metrics.json."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

from structured_compress import pipeline

from .conftest import ROOT, compose_config, needs_fashion_mnist

TINY = ["experiment=fashion_mnist/vit-gaudi-finetune", "model.depth=1", "model.embed_dim=24", "model.num_heads=2",
        "model.embed_layer.stem_channels=8", "layer.options.sweeps=1", "datamodule.batch_size=16",
        "datamodule.eval_batch_size=50", "trainer.max_epochs=1", "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=3", "trainer.log_every_n_steps=1",
        "callbacks.progress_bar=null", "callbacks.model_summary=null", "callbacks.gaudi_shrink.target_width=0.9"]


@needs_fashion_mnist
def test_two_process_gloo_ddp_gaudi_finetune(tmp_path):
    cfg = compose_config(TINY, tmp_path)
    weights = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline.build_dense_model(cfg).state_dict().items()}, str(weights))
    run_dir, states = tmp_path / "run", tmp_path / "ranks"
    args = [*TINY, "trainer=ddp", f"model.pretrained_path={weights}", f"hydra.run.dir={run_dir}",
            "+callbacks.rank_state._target_=tests.rank_state.SaveRankState",
            f"+callbacks.rank_state.directory={states}"]
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rank0, rank1 = (torch.load(states / f"rank{r}.pt") for r in (0, 1))
    assert any(k.endswith("widths") for k in rank0)
    difference = max((rank0[k].double() - rank1[k].double()).abs().max().item() for k in rank0)
    assert difference == 0.0
    assert [p.name for p in run_dir.rglob("metrics.json")] == ["metrics.json"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["layer_type"] == "gaudi" and 0 <= metrics["metrics"]["test/acc"] <= 1
    # that every evaluation sample is counted once across ranks is tested on the shards (tests/test_loaders.py)
