"""``AutoModelFor*.from_pretrained(folder)`` on a compressed folder rebuilds exactly what ``load_compressed(folder)``
does -- every layer type, storage policies with quantized embeddings, a folder written block by block -- and
refuses what it cannot load exactly (a tampered folder, another dtype, class or device map, no registration)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from structured_compress import load_compressed, save_compressed
from structured_compress.io import CompressedWriter
from structured_compress.io.manifest import MANIFEST_FILE
from structured_compress.io.source import HF_QUANT_METHOD
from structured_compress.io.structure import structured_layers
from structured_compress.layers import LAYERS
from structured_compress.sequential import compress_sequential
from structured_compress.surgery import compress_

transformers = pytest.importorskip("transformers")
IDS = torch.tensor([[1, 5, 9, 2, 7, 3], [3, 3, 7, 0, 11, 4]])
OPTIONS = {"svdq": {"bits": 8}, "svdq-int4": {"bits": 4, "group_size": 16}, "tsvd": {"tolerance": 0.2},
           "hyper": {"codebook_sizes": [225, 1600], "loss_max": 0.1}, "gaudi": {"sweeps": 1}}


def tiny_llama(layers: int = 1, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64, **overrides)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def assert_same_model(expected, loaded):
    """Same classes, tensors (values, dtypes, ties, requires_grad), training mode and outputs, bit for bit."""
    assert type(loaded) is type(expected) and loaded.training == expected.training
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in expected.named_modules()}
    ours, theirs = loaded.state_dict(keep_vars=True), expected.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
        assert ours[key].requires_grad == tensor.requires_grad, key
    shared = [(a, b) for a in theirs for b in theirs if a < b and theirs[a].data_ptr() == theirs[b].data_ptr()]
    assert shared == [(a, b) for a in ours for b in ours if a < b and ours[a].data_ptr() == ours[b].data_ptr()]
    ids = IDS.to(expected.device)
    with torch.no_grad():
        mask = torch.ones_like(ids)
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           expected(input_ids=ids, attention_mask=mask).logits)


def from_pretrained(path, auto=transformers.AutoModelForCausalLM, **kwargs):
    return auto.from_pretrained(path, **kwargs)


@pytest.mark.parametrize("layer", sorted(LAYERS) + ["svdq-int4"])
def test_every_layer_type_loads_as_load_compressed_does(layer, tmp_path):
    model = tiny_llama()
    compress_(model, layer.removesuffix("-int4"), 0.5, include=["model.layers.*"], options=OPTIONS.get(layer))
    assert {type(m).layer_type for m in structured_layers(model).values()} == {layer.removesuffix("-int4")}
    save_compressed(model, tmp_path / "m")
    reloaded = load_compressed(tmp_path / "m")
    assert_same_model(model, reloaded)  # saved in eval mode, Gaudi's structured layers reload in eval mode too
    assert_same_model(reloaded, from_pretrained(tmp_path / "m"))


@pytest.mark.parametrize("build, auto, layer, storage", [
    (tiny_gpt2, transformers.AutoModelForCausalLM, "lowrank",
     {"embeddings": "int4", "group_size": 8, "zero_point": True}),
    (tiny_bert, transformers.AutoModelForSequenceClassification, "svdq", {"embeddings": "int8", "rest": "int8"}),
    (tiny_llama, transformers.AutoModelForCausalLM, "monarch", {"embeddings": "int4", "dtype": "bf16"}),
])
def test_storage_policies_and_tied_heads(build, auto, layer, storage, tmp_path):
    from transformers.testing_utils import CaptureLogger

    model = build()
    blocks = {"gpt2": "transformer.h.*", "bert": "bert.encoder.*", "llama": "model.layers.*"}
    compress_(model, layer, 0.5, include=[blocks[model.config.model_type]])
    save_compressed(model, tmp_path / "m", storage=storage)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": HF_QUANT_METHOD, "version": 4}
    with CaptureLogger(transformers.modeling_utils.logger) as report:  # scales, zero codes, tied heads
        loaded = from_pretrained(tmp_path / "m", auto)
    assert report.out == ""  # no load report: nothing unexpected, missing or initialised at random
    assert_same_model(load_compressed(tmp_path / "m"), loaded)


def test_a_half_precision_model_loads_in_its_dtype(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_llama().config, dtype=torch.bfloat16).eval()
    compress_(model, "svdq", include=["model.layers.*"])
    save_compressed(model, tmp_path / "m")
    reloaded = load_compressed(tmp_path / "m")
    assert_same_model(model, reloaded)  # as transformers builds it: rotary frequencies in float32
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16 and loaded.config.dtype == torch.bfloat16
    assert_same_model(reloaded, loaded)
    assert_same_model(loaded, from_pretrained(tmp_path / "m", dtype=torch.bfloat16))


def test_a_folder_written_block_by_block(tmp_path):
    batches = list(torch.randint(0, 64, (2, 2, 8), generator=torch.Generator().manual_seed(1)))
    model = tiny_llama(layers=2)
    writer = CompressedWriter(tmp_path / "m", 3, None, torch.float32, {"test": "hf"})
    report = compress_sequential(model, "svdq", include="model.layers.*", options=OPTIONS["svdq-int4"],
                                 batches=batches, forward=lambda m, b: m(input_ids=b), writer=writer)
    writer.finish(model, None, report)
    assert (tmp_path / "m" / "compressed-00003-of-00003.safetensors").is_file()
    assert_same_model(load_compressed(tmp_path / "m"), from_pretrained(tmp_path / "m"))


@pytest.fixture
def saved_gpt2(tmp_path):
    model = tiny_gpt2()
    compress_(model, "svdq", include=["transformer.h.*"])
    return save_compressed(model, tmp_path / "gpt2")


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("tamper, message", [
    (lambda p: (p / "compressed.safetensors").write_bytes((p / "compressed.safetensors").read_bytes()[:-1] + b"x"),
     "failed its sha256 check"),
    (lambda p: edit_json(p / MANIFEST_FILE, report={"forged": 1}), "manifest.json was edited after saving"),
    (lambda p: edit_json(p / "config.json", layer_norm_epsilon=0.1),
     r"config differs from the one sealed .*\n  layer_norm_epsilon: 0.1 != sealed 1e-05"),
])
def test_a_tampered_folder_is_refused(saved_gpt2, tamper, message):
    tamper(saved_gpt2)
    with pytest.raises(ValueError, match=message):
        from_pretrained(saved_gpt2)


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": torch.float16}, r"holds a torch.float32 model; load it with dtype='auto'"),
    ({"device_map": "auto"}, "a compressed folder loads onto one device"),
    ({"device_map": {"transformer": "cpu", "lm_head": "meta"}}, "a compressed folder loads onto one device"),
    ({"n_embd": 32}, r"config differs .*\n  n_embd: 32 != sealed 16"),
    ({"auto": transformers.AutoModel}, r"holds a GPT2LMHeadModel, not a GPT2Model"),
])
def test_what_it_cannot_load_exactly_is_refused(saved_gpt2, kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_pretrained(saved_gpt2, **kwargs)


def test_a_single_device_map_and_save_pretrained(saved_gpt2, tmp_path):
    loaded = from_pretrained(saved_gpt2, device_map="cpu")
    assert_same_model(load_compressed(saved_gpt2), loaded)
    loaded.save_pretrained(tmp_path / "again")  # guarded: writes the compressed format, which loads again
    assert_same_model(loaded, from_pretrained(tmp_path / "again"))


def test_without_the_registration_it_finds_no_weights(saved_gpt2, monkeypatch):
    from transformers.quantizers import auto

    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, HF_QUANT_METHOD)
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, HF_QUANT_METHOD)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        from_pretrained(saved_gpt2)


def test_a_folder_saved_before_quantization_config_loads_when_given_the_config(saved_gpt2, tmp_path):
    from structured_compress.io.hf_quantizer import StructuredCompressConfig

    config = json.loads((saved_gpt2 / "config.json").read_text())
    del config["quantization_config"]
    (saved_gpt2 / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match="no file named model.safetensors"):
        from_pretrained(saved_gpt2)
    loaded = from_pretrained(saved_gpt2, quantization_config=StructuredCompressConfig())
    assert_same_model(load_compressed(saved_gpt2), loaded)
    tiny_gpt2().save_pretrained(tmp_path / "dense")  # never compressed on the fly
    with pytest.raises(ValueError, match="has no manifest.json"):
        from_pretrained(tmp_path / "dense", quantization_config=StructuredCompressConfig())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_onto_a_gpu_as_load_compressed_does(saved_gpt2):
    assert_same_model(load_compressed(saved_gpt2, device="cuda"), from_pretrained(saved_gpt2, device_map="cuda:0"))


def test_importing_the_package_before_transformers_registers_it(saved_gpt2):
    """The import hook: structured_compress first, transformers (and its quantizer registry) later."""
    code = ("import sys, structured_compress; assert 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(saved_gpt2)!r})\n"
            "print(type(model.transformer.h[0].mlp.c_fc).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split()[-1] == "SVDQuantLinear", result.stderr[-2000:]
