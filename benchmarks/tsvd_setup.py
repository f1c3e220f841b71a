"""Ternary SVD set-up time and true error on all 36 encoder linears of the offline MiniLM (all-MiniLM-L6-v2) at
the published tolerance: per layer the rank, seconds, the reported ``fit_error``, the true spectral error
``sigma_max(W - W_hat) / sigma_max(W)`` recomputed here, and the paper's cost columns (``op_counts``); then the
totals. Prints JSON.

    python benchmarks/tsvd_setup.py                   # tolerance 1e-2, steps 20 (as published)
    python benchmarks/tsvd_setup.py --steps 5         # fewer, larger greedy steps
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from compress_minilm import minilm_dir
from src.layers.tsvd import TernarySVDLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("encoder")}
    rows = []
    for name, linear in linears.items():
        weight = linear.weight.detach()
        start = time.perf_counter()
        layer = TernarySVDLinear.from_dense(weight, linear.bias, tolerance=args.tolerance, steps=args.steps)
        seconds = time.perf_counter() - start
        residual = (layer.to_dense_weight() - weight).double()
        true_error = (torch.linalg.matrix_norm(residual, ord=2) / torch.linalg.matrix_norm(weight.double(), ord=2)).item()
        rows.append({"layer": name, "shape": list(weight.shape), "rank": layer.rank, "seconds": round(seconds, 2),
                     "fit_error": layer.fit_error, "true_error": true_error, **layer.op_counts()})
    total = {key: sum(row[key] for row in rows) for key in ("muls", "adds", "bytes", "dense_macs", "dense_fp16_bytes",
                                                             "float_params", "ternary_params")}
    print(json.dumps({"model": "all-MiniLM-L6-v2", "tolerance": args.tolerance, "steps": args.steps,
                      "threads": torch.get_num_threads(), "layers": len(rows),
                      "total_seconds": round(sum(r["seconds"] for r in rows), 1),
                      "met_tolerance": sum(r["true_error"] < args.tolerance for r in rows),
                      "max_true_error": max(r["true_error"] for r in rows),
                      "max_abs_reported_minus_true": max(abs(r["fit_error"] - r["true_error"]) for r in rows),
                      "mean_rank": round(sum(r["rank"] for r in rows) / len(rows), 1),
                      "totals": total, "per_layer": rows}, indent=2))


if __name__ == "__main__":
    main()
