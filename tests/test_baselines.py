"""Baseline codecs (benchmarks/baselines.py) on a tiny LLaMA: each gives a finite perplexity and exactly the
library's packed bytes in place of the quantized weights' stored bytes; the comparison table marks baselines and
says how each project codec stands against them."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import baselines  # noqa: E402
from codec_suite import save_reload as save_reload_dense  # noqa: E402
from scripts.compare_codecs import table, verdict  # noqa: E402

INCLUDE = ["model.layers.*"]


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return model, lambda: LlamaForCausalLM(config), torch.randint(0, 64, (2, 16))


def run(tiny, name: str):
    """(perplexity, packed bytes per layer, sizes, the dense fp16 folder's bytes, weights per layer)."""
    original, skeleton, ids = tiny
    model = copy.deepcopy(original)
    quantized = baselines.quantize_model(model, INCLUDE, name)
    restored, sizes = baselines.save_reload(model, quantized, skeleton, {})
    with torch.no_grad():
        perplexity = restored(input_ids=ids, labels=ids).loss.exp().item()
    _, dense = save_reload_dense(copy.deepcopy(original), skeleton, {})
    numel = {layer: restored.get_submodule(layer).weight.numel() for layer in quantized.packed}
    assert not quantized.left_float and len(quantized.packed) == 7
    for layer, values in quantized.weights.items():  # the model computes with the library's weights exactly
        assert torch.equal(restored.get_submodule(layer).weight, values)
    return perplexity, quantized.packed, sizes, dense, numel


def check_bytes(packed, sizes, dense, numel, bytes_per_weight):
    """Packed bytes as the format says, and the file = the fp16 folder with the fp16 weights swapped for them."""
    assert packed == {layer: n * bytes_per_weight for layer, n in numel.items()}
    assert sizes["bytes_on_disk"] == dense["bytes_on_disk"] - 2 * sum(numel.values()) + sum(packed.values())
    assert sizes["replaced_bytes"] == sum(packed.values())  # the LLaMA linears have no bias
    assert sizes["rest_bytes"] == dense["rest_bytes"] - 2 * sum(numel.values())


def test_hqq_int4_gives_a_perplexity_and_its_packed_bytes(tiny):
    pytest.importorskip("hqq", reason="the baselines extra is not installed (make install EXTRAS=baselines)")
    perplexity, packed, sizes, dense, numel = run(tiny, "hqq-int4-g64")
    assert math.isfinite(perplexity)
    check_bytes(packed, sizes, dense, numel, 4 / 8 + 2 * 2 / 64)  # 4-bit codes, fp16 scale and zero per 64


def test_quanto_qint4_gives_a_perplexity_and_its_packed_bytes(tiny):
    pytest.importorskip("optimum.quanto", reason="the baselines extra is not installed")
    perplexity, packed, sizes, dense, numel = run(tiny, "quanto-qint4")
    assert math.isfinite(perplexity)
    check_bytes(packed, sizes, dense, numel, 4 / 8 + 2 * 2 / 128)  # its default groups of 128: scale and shift


@pytest.mark.parametrize("name, block_bytes", [("gguf-q8_0", 34), ("gguf-q4_0", 18)])
def test_gguf_formats_take_their_block_bytes(tiny, name, block_bytes):
    perplexity, packed, sizes, dense, numel = run(tiny, name)
    assert math.isfinite(perplexity)
    check_bytes(packed, sizes, dense, numel, block_bytes / 32)


def test_a_missing_library_is_a_note_not_an_error(monkeypatch, capsys):
    missing = baselines.Baseline("no-such-dist", "no_such_quantizer_module", lambda source, model: None, lambda w: True)
    monkeypatch.setitem(baselines.BASELINES, "nosuch-int4", missing)
    assert not baselines.available("nosuch-int4")
    assert "skipped nosuch-int4: no-such-dist is not installed" in capsys.readouterr().err


def test_a_layer_the_format_cannot_hold_stays_float():
    model = torch.nn.Sequential(torch.nn.Linear(48, 8), torch.nn.Linear(8, 64))  # rows of 48 and 8: no 32-block
    quantized = baselines.quantize_model(model, ["*"], "gguf-q8_0")
    assert quantized.left_float == ["0", "1"] and not quantized.packed


def row(codec, size, quality, baseline=False, storage="fp16"):
    return {"codec": codec, "storage": storage, "bytes_on_disk": size * 1e6, "perplexity": quality,
            "baseline": baseline, "ratio_vs_fp16": 100 / size, "replaced_ratio_vs_fp16": 2.0,
            **({"library": "lib"} if baseline else {})}


def test_the_table_marks_baselines_and_how_each_codec_stands_against_them():
    base = [row("gguf-file", 40, 10.0, True, "file"), row("hqq-int4-g64", 30, 12.0, True),
            row("gguf-q8_0", 50, 9.5, True)]
    mine = [row("a", 30, 9.8), row("b", 35, 13.0), row("c", 60, 8.0)]
    assert verdict(mine[0], base, "perplexity", lower=True) == "front; as good: gguf-q8_0 (fp16) 9.5 at 50.0 MB"
    assert verdict(mine[1], base, "perplexity", lower=True) == "no: hqq-int4-g64 (fp16) 12 at 30.0 MB"
    assert verdict(row("e", 20, 13.0), base, "perplexity", lower=True).startswith("front; as good: hqq-int4-g64")
    assert verdict(mine[2], base, "perplexity", lower=True) == "yes"
    assert verdict(row("d", 30, 12.0), base, "perplexity", lower=True).startswith("no: hqq-int4-g64")  # a tie
    text = table(base + mine, "perplexity")
    body = [line for line in text.splitlines() if line.startswith("| ") and "codec" not in line][:6]
    assert [line.split(" | ")[0] for line in body] == [
        "| gguf-file (file)", "| gguf-q8_0 (fp16)", "| hqq-int4-g64 (fp16)", "| c (fp16)", "| b (fp16)", "| a (fp16)"]
    assert all("baseline: lib" in line for line in body[:3]) and all("project" in line for line in body[3:])
    assert "| 3x smaller than fp16 | a (fp16): 9.8 at 3.33x | hqq-int4-g64 (fp16): 12 at 3.33x |" in text


def test_rows_exported_to_gguf_show_the_file_read_back():
    exported = {**row("a", 30, 9.8), "gguf_bytes": 31_000_000, "gguf_perplexity": 9.9}
    text = table([row("hqq-int4-g64", 30, 12.0, True), exported, row("b", 35, 13.0)], "perplexity")
    lines = text.splitlines()
    assert "| GGUF MB | GGUF perplexity |" in lines[0] and lines[1].count("---") == 10
    assert "| 31.0 | 9.9 |" in next(line for line in lines if line.startswith("| a (fp16)"))
    assert "| -- | -- |" in next(line for line in lines if line.startswith("| b (fp16)"))


def test_make_table_names_baseline_rows(tmp_path):
    from scripts.make_table import load_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"model": "m", "codec": "hqq-int4-g64", "storage": "fp16", "baseline": true, "perplexity": 9}\n'
                    '{"model": "m", "codec": "int8-rtn", "storage": "fp16", "baseline": false, "perplexity": 8}\n')
    assert [r["method"] for r in load_rows([path])] == ["hqq-int4 (fp16) (baseline)", "int8-rtn (fp16)"]


def test_every_comparison_runs_codecs_whole_file_knows(monkeypatch, tmp_path):
    import whole_file
    from scripts import compare_codecs

    known = {"none", *whole_file.curve_codecs(), *baselines.BASELINES}
    for model, setup in compare_codecs.MODELS.items():
        assert set(setup.codecs) <= known, model
        assert set(setup.storage) <= set(whole_file.STORAGE), model
    commands = []
    monkeypatch.setattr(compare_codecs.subprocess, "run", lambda command, **kw: commands.append(command))
    compare_codecs.run_codecs("gemma", compare_codecs.MODELS["gemma"], tmp_path / "rows.jsonl", ["--windows", "8"])
    assert commands[0][1].endswith("benchmarks/whole_file.py") and commands[0][-2:] == ["--windows", "8"]
