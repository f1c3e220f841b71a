"""Ternary SVD set-up time and true error on all 36 encoder linears of the offline MiniLM (all-MiniLM-L6-v2) at
the published tolerance: per layer the rank, wall and CPU seconds, the reported ``fit_error``, the true spectral
error ``sigma_max(W - W_hat) / sigma_max(W)`` recomputed here, and the paper's cost columns (``op_counts``); then
the totals. Prints JSON. Single-threaded unless ``OMP_NUM_THREADS`` says otherwise (torch and SciPy's LAPACK
both read it); on a shared machine the CPU seconds are the steadier figure.

    OMP_NUM_THREADS=1 python benchmarks/tsvd_setup.py                  # tolerance 1e-2, steps 20 (as published)
    OMP_NUM_THREADS=1 python benchmarks/tsvd_setup.py --steps 5        # fewer, larger greedy steps
    OMP_NUM_THREADS=1 python benchmarks/tsvd_setup.py --refit-every 4  # joint scale refit every 4th step
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch

from compress_minilm import minilm_dir
from structured_compress.layers.tsvd import TernarySVDConfig, TernarySVDLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--refit-every", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="only the first N encoder linears")
    args = parser.parse_args()

    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("encoder")}
    load_start = os.getloadavg()
    rows = []
    for name, linear in list(linears.items())[: args.layers]:
        weight = linear.weight.detach()
        start, cpu_start = time.perf_counter(), time.process_time()
        config = TernarySVDConfig(tolerance=args.tolerance, steps=args.steps, refit_every=args.refit_every)
        layer = TernarySVDLinear.from_dense(weight, linear.bias, config)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        residual = (layer.to_dense_weight() - weight).double()
        true_error = (torch.linalg.matrix_norm(residual, ord=2) / torch.linalg.matrix_norm(weight.double(), ord=2)).item()
        rows.append({"layer": name, "shape": list(weight.shape), "rank": layer.rank, "seconds": round(seconds, 2),
                     "cpu_seconds": round(cpu_seconds, 2), "fit_error": layer.fit_error, "true_error": true_error,
                     **layer.op_counts()})
    total = {key: sum(row[key] for row in rows) for key in ("muls", "adds", "bytes", "dense_macs", "dense_fp16_bytes",
                                                             "float_params", "ternary_params")}
    print(json.dumps({"model": "all-MiniLM-L6-v2", "tolerance": args.tolerance, "steps": args.steps,
                      "refit_every": args.refit_every, "threads": torch.get_num_threads(),
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "load_avg_1_5_15_start": load_start, "load_avg_1_5_15_end": os.getloadavg(),
                      "layers": len(rows), "total_seconds": round(sum(r["seconds"] for r in rows), 1),
                      "total_cpu_seconds": round(sum(r["cpu_seconds"] for r in rows), 1),
                      "met_tolerance": sum(r["true_error"] < args.tolerance for r in rows),
                      "max_true_error": max(r["true_error"] for r in rows),
                      "max_abs_reported_minus_true": max(abs(r["fit_error"] - r["true_error"]) for r in rows),
                      "mean_rank": round(sum(r["rank"] for r in rows) / len(rows), 1),
                      "totals": total, "per_layer": rows}, indent=2))


if __name__ == "__main__":
    main()
