"""storage.source_gguf: a model loaded from a GGUF file keeps that file's quantized blocks, byte for byte, for the
tensors no codec changed; a tensor the run changed (or transformers rearranged) falls back to the policy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from structured_compress.errors import UserInputError  # noqa: E402
from structured_compress.io import folder_sizes, load_compressed, save_compressed  # noqa: E402
from structured_compress.surgery import compress_  # noqa: E402

HIDDEN, INNER, VOCAB, LAYERS = 64, 128, 96, 2
QUANTIZED = {"token_embd": gguf.GGMLQuantizationType.Q8_0, "ffn_up": gguf.GGMLQuantizationType.Q4_0,
             "ffn_gate": gguf.GGMLQuantizationType.Q5_1, "ffn_down": gguf.GGMLQuantizationType.Q8_0,
             "attn_q": gguf.GGMLQuantizationType.Q8_0, "attn_output": gguf.GGMLQuantizationType.Q4_1}


def _tensor(rng, rows, cols, name):
    values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    kind = next((kind for part, kind in QUANTIZED.items() if part in name), None)
    return (values, None) if kind is None else (gguf.quants.quantize(values, kind), kind)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny LLaMA written as GGUF (some tensors Q8_0 / Q4_0 / Q5_1 / Q4_1, norms F32) and its folder."""
    folder = tmp_path_factory.mktemp("gguf")
    writer = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    for key, value in {"context_length": 128, "embedding_length": HIDDEN, "block_count": LAYERS,
                       "feed_forward_length": INNER, "vocab_size": VOCAB}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // 4)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        for part, shape in {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN, HIDDEN), "attn_v": (HIDDEN, HIDDEN),
                            "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INNER, HIDDEN),
                            "ffn_up": (INNER, HIDDEN), "ffn_down": (HIDDEN, INNER)}.items():
            shapes[f"blk.{i}.{part}.weight"] = shape
    for name, shape in shapes.items():
        data, kind = _tensor(rng, *shape, name)
        writer.add_tensor(name, data, raw_dtype=kind)
    for name in ["output_norm.weight", *(f"blk.{i}.{n}_norm.weight" for i in range(LAYERS) for n in ("attn", "ffn"))]:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder / "tiny.gguf"


def _model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def test_untouched_tensors_keep_the_source_blocks(tiny_gguf, tmp_path):
    model = _model(tiny_gguf)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    folder = save_compressed(model, tmp_path / "m", storage={"source_gguf": str(tiny_gguf)})
    table = json.loads((folder / "manifest.json").read_text())["tensors"]
    kept = {key: entry["ggml_type"] for key, entry in table.items() if entry["codec"] == "gguf"}
    assert kept["model.embed_tokens.weight"] == "Q8_0"
    assert kept["model.layers.0.mlp.up_proj.weight"] == "Q4_0"
    assert kept["model.layers.1.mlp.gate_proj.weight"] == "Q5_1"
    assert kept["model.layers.0.self_attn.o_proj.weight"] == "Q4_1"
    # transformers permutes LLaMA's q rows on loading: its blocks no longer decode to the tensor, so it is cast
    assert table["model.layers.0.self_attn.q_proj.weight"]["codec"] == "cast"
    reader = gguf.GGUFReader(str(tiny_gguf))
    source_bytes = {t.name: int(t.n_bytes) for t in reader.tensors}
    # the head is F32 in the file: the policy's fp16 applies to it
    assert folder_sizes(folder)["embeddings_bytes"] == source_bytes["token_embd.weight"] + VOCAB * HIDDEN * 2
    restored = load_compressed(folder).state_dict()
    for key in kept:  # exact: the blocks hold the values the model was loaded with
        assert torch.equal(restored[key], reference[key]), key


def test_a_changed_tensor_falls_back_to_the_policy(tiny_gguf, tmp_path):
    model = _model(tiny_gguf)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    compress_(model, "lowrank", 0.5, include=["model.layers.1.mlp.*"])
    folder = save_compressed(model, tmp_path / "m", storage={"source_gguf": str(tiny_gguf), "embeddings": "int8"})
    table = json.loads((folder / "manifest.json").read_text())["tensors"]
    assert table["model.layers.0.mlp.up_proj.weight"]["codec"] == "cast"  # changed: not the source's blocks
    assert table["model.layers.0.mlp.down_proj.weight"]["codec"] == "gguf"
    assert table["model.embed_tokens.weight"]["codec"] == "gguf"  # exact blocks win over int8 re-quantization
    assert not any(entry["codec"] == "gguf" for key, entry in table.items() if key.startswith("model.layers.1.mlp."))
    load_compressed(folder)


def test_a_bad_block_type_in_the_manifest_is_refused(tiny_gguf, tmp_path):
    from structured_compress.io.manifest import check_tensor_entry

    with pytest.raises(ValueError, match="ggml_type"):
        check_tensor_entry("w", {"dtype": "float32", "shape": [4, 32], "codec": "gguf", "ggml_type": "Q9_9"})
    with pytest.raises(ValueError, match="does not split"):
        check_tensor_entry("w", {"dtype": "float32", "shape": [4, 30], "codec": "gguf", "ggml_type": "Q8_0"})


def test_source_gguf_names_a_missing_file(tmp_path):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    with pytest.raises(UserInputError, match="is not a file"):
        save_compressed(model, tmp_path / "m", storage={"source_gguf": str(tmp_path / "none.gguf")})


def test_a_freed_tensor_is_checked_against_the_checkpoint(tiny_gguf, tmp_path):
    """Block by block, the embedding is on the meta device at the end: its blocks are checked against the dense
    checkpoint row chunk by row chunk, and kept."""
    from safetensors.torch import save_model

    from structured_compress.io.dense_weights import DenseWeights
    from structured_compress.io.save import CompressedWriter

    model = _model(tiny_gguf)
    save_model(model, str(tmp_path / "dense.safetensors"))
    reference = model.model.embed_tokens.weight.detach().clone()
    model.model.embed_tokens.to("meta")
    writer = CompressedWriter(tmp_path / "m", 1, {"source_gguf": str(tiny_gguf)}, model=model)
    folder = writer.finish(model, weights=DenseWeights(tmp_path / "dense.safetensors"))
    table = json.loads((folder / "manifest.json").read_text())["tensors"]
    assert table["model.embed_tokens.weight"]["codec"] == "gguf"
    assert torch.equal(load_compressed(folder).model.embed_tokens.weight, reference)
