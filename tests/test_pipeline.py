"""The weights-first pipeline end to end, in process: pretrained dense weights -> surgery (decomposed once)
-> a few training steps -> mode=eval on the checkpoint reproduces the test metrics exactly, for every layer
type and for the Conv2d wrapper; checkpoints carry the structure, so nothing is decomposed on reload."""
import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import save_file

from structured_compress import pipeline
from structured_compress.eval import evaluate
from structured_compress.layers import StructuredLinear
from structured_compress.train import train

from .conftest import compose_config, needs_fashion_mnist

TINY = ["model.depth=1", "model.embed_dim=24", "model.num_heads=2", "model.embed_layer.stem_channels=8",
        "datamodule.batch_size=16", "datamodule.eval_batch_size=64", "datamodule.augment=false",
        "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=2", "trainer.accelerator=cpu", "trainer.devices=1",
        "callbacks.progress_bar=null", "callbacks.model_summary=null", "logger=csv"]

LAYERS = {
    "dense": [], "lowrank": ["layer.budget=0.5"], "monarch": ["layer.budget=0.5"], "blockdiag": ["layer.budget=0.5"],
    "gaudi": ["layer.budget=0.5", "layer.options.sweeps=1"], "tsvd": ["layer.options.tolerance=0.3"],
    "svdq": ["layer.budget=0.5"], "hyper": [],
}


def pretrained_weights(tmp_path, overrides):
    """A dense model of the run's architecture saved as safetensors: the 'pretrained' weights to start from."""
    cfg = compose_config(overrides, tmp_path)
    torch.manual_seed(1)
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline.build_dense_model(cfg).state_dict().items()}, str(path))
    return path


def run(overrides, tmp_path, name):
    cfg = compose_config(overrides, tmp_path / name)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
    return cfg


@needs_fashion_mnist
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_pretrained_train_then_eval_reproduces_test_metrics(layer, tmp_path, monkeypatch):
    weights = pretrained_weights(tmp_path, TINY)
    overrides = [*TINY, f"layer={layer}", "layer.include=[blocks.*]", *LAYERS[layer],
                 f"model.pretrained_path={weights}"]
    decompositions = []
    original = pipeline.compress_task_model
    monkeypatch.setattr(pipeline, "compress_task_model", lambda *a, **k: decompositions.append(1) or original(*a, **k))

    metrics, objects = train(run(overrides, tmp_path, "train"))
    assert len(decompositions) == 1  # the pretrained weights are decomposed once, the random init never
    tested = metrics["tested_checkpoint"]
    assert tested and "best val/acc" in metrics["tested_because"]
    # every replaced layer was initialised from the pretrained weights: a rel. error < 1 (random would be ~1.4)
    assert all(row["rel_error"] < 1.0 for row in metrics["layers"])

    eval_metrics, eval_objects = evaluate(run([*overrides, "mode=eval", f"ckpt_path={tested}"], tmp_path, "eval"))
    assert len(decompositions) == 1  # eval rebuilt the structure from the checkpoint
    for key in ("test/acc", "test/loss", "flops/linear_macs_per_sample"):
        assert eval_metrics["metrics"][key] == metrics["metrics"][key], key
    assert eval_metrics["params"] == metrics["params"]
    structured = [m for m in eval_objects["task"].model.modules() if isinstance(m, StructuredLinear)]
    assert len(structured) == 4 and all(m.layer_type == layer for m in structured)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["tested_checkpoint"] == tested


@needs_fashion_mnist
def test_conv_layers_rebuild_from_checkpoint(tmp_path):
    overrides = [*TINY, "layer=lowrank", "layer.budget=0.5", "layer.include=[patch_embed.*]"]
    metrics, _ = train(run(overrides, tmp_path, "train"))
    assert {row["kind"] for row in metrics["layers"]} == {"conv2d"}
    eval_metrics, _ = evaluate(run([*overrides, "mode=eval", f"ckpt_path={metrics['tested_checkpoint']}"],
                                   tmp_path, "eval"))
    assert eval_metrics["metrics"]["test/acc"] == metrics["metrics"]["test/acc"]
    assert eval_metrics["metrics"]["test/loss"] == metrics["metrics"]["test/loss"]


@needs_fashion_mnist
def test_eval_refuses_a_checkpoint_of_another_model(tmp_path):
    metrics, _ = train(run([*TINY, "layer=lowrank"], tmp_path, "train"))
    with pytest.raises(ValueError, match=r"different model: model.num_heads=2 \(this run: 3\)"):
        evaluate(run([*TINY, "layer=lowrank", "model.num_heads=3", "mode=eval",
                      f"ckpt_path={metrics['tested_checkpoint']}"], tmp_path, "eval"))


def test_pretrained_weights_must_fit_the_model(tmp_path):
    cfg = compose_config(TINY, tmp_path)
    model = pipeline.build_dense_model(cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("head.weight")
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit .*1 missing keys \['head.weight'\]"):
        pipeline.load_dense_weights(pipeline.build_dense_model(cfg), tmp_path / "partial.safetensors")


def test_compressed_weights_as_pretrained_path_point_to_ckpt_path(tmp_path):
    cfg = compose_config(TINY, tmp_path)
    from structured_compress.surgery import compress_

    compressed = pipeline.build_dense_model(cfg)
    compress_(compressed, "lowrank", 0.5, include=["blocks.*"])
    save_file({k: v.contiguous() for k, v in compressed.state_dict().items()}, str(tmp_path / "lr.safetensors"))
    with pytest.raises(ValueError, match="compressed model's weights: evaluate or resume it with ckpt_path"):
        pipeline.load_dense_weights(pipeline.build_dense_model(cfg), tmp_path / "lr.safetensors")


def lowrank_checkpoint(cfg, path):
    """A lowrank model and its checkpoint as train mode writes it (state dict under ``model.``, structure record)."""
    from structured_compress.surgery import compress_

    torch.manual_seed(0)
    model = pipeline.build_dense_model(cfg).eval()
    compress_(model, "lowrank", 0.5, include=["blocks.*"])
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    record = pipeline.StructureRecord(None, pipeline.dense_model_factory_config(cfg))
    record.on_save_checkpoint(None, SimpleNamespace(model=model), checkpoint)
    torch.save(checkpoint, path)
    return model, checkpoint


def test_checkpoint_structure_rebuilds_the_same_model(tmp_path):
    cfg = compose_config(TINY, tmp_path)
    model, checkpoint = lowrank_checkpoint(cfg, tmp_path / "lowrank.ckpt")
    task = pipeline.restore_structure(cfg, tmp_path / "lowrank.ckpt").task
    task.load_state_dict(checkpoint["state_dict"], strict=True)
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(task.model.eval()(images), model(images))


def test_checkpoint_structure_that_does_not_fit_the_model_names_the_layer(tmp_path):
    cfg = compose_config(TINY, tmp_path)
    _, checkpoint = lowrank_checkpoint(cfg, tmp_path / "lowrank.ckpt")
    entry = next(e for e in checkpoint[pipeline.STRUCTURE_KEY]["layers"] if e["name"] == "blocks.0.mlp.fc1")
    entry["in_features"] += 8
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match=r"shape mismatch for layer 'blocks.0.mlp.fc1': checkpoint .*edited.ckpt "
                                         r"records 48x32, the skeleton has 48x24"):
        pipeline.restore_structure(cfg, tmp_path / "edited.ckpt")


@pytest.mark.parametrize("content", [b"", b"garbage" * 10])
def test_unreadable_checkpoint_is_a_clear_error(tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad.ckpt (is empty|cannot be read)"):
        pipeline.read_checkpoint(bad)


def test_gptq_embedding_storage_calibrates_the_lm_head_on_train_batches():
    """mode=compress with storage.embeddings_rounding=gptq gets the LM head's input Gram from the first n train
    batches (model in eval while collecting, train mode restored); other policies collect nothing."""
    import lightning.pytorch as pl
    from torch import nn

    from structured_compress.surgery import collect_output_embedding_gram

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(11, 6), nn.Linear(6, 11, bias=False)

        def get_output_embeddings(self):
            return self.head

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)))

    class Task(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyLM()

        def model_inputs(self, batch):
            return batch

    batches = [torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(i)) for i in range(4)]

    class Data(pl.LightningDataModule):
        served = 0

        def train_dataloader(self):
            for batch in batches:
                Data.served += 1
                yield batch

    task = Task().train()
    storage = {"embeddings": "int4", "embeddings_rounding": "gptq"}
    gram = pipeline.output_embedding_calibration(task, storage, 2, Data())
    expected = collect_output_embedding_gram(task.model, batches[:2], lambda m, b: m(b))
    assert set(gram) == {"head.weight"} and torch.allclose(gram["head.weight"], expected["head.weight"])
    assert Data.served == 2 and task.model.training
    assert pipeline.output_embedding_calibration(task, {"embeddings": "int4"}, 2, Data()) is None
    with pytest.raises(ValueError, match="needs a datamodule"):
        pipeline.output_embedding_calibration(task, storage, 2, None)
