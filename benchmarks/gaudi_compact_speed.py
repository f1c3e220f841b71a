"""Inference forward time of Gaudi-GBLR's compute modes against ``nn.Linear``, ViT-B MLP shapes. Prints JSON.

Each layer is ``GaudiGBLRLinear.from_dense`` (default init) of a low-rank-plus-noise weight, in eval mode, timed
round-robin with ``layer_speed.time_round_robin`` (median, inference mode); ``ratio`` is time over ``nn.Linear``'s in the same
process. ``auto`` is the default mode: compact when its plan is cheap, else the dense-mask path.

    python benchmarks/gaudi_compact_speed.py
    python benchmarks/gaudi_compact_speed.py --tokens 1024 --budgets 0.25 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

from gaudi_init import planted
from layer_speed import make_step, time_round_robin
from structured_compress.layers.gaudi import GaudiConfig, GaudiGBLRLinear

MODES = ("dense", "lr", "compact", "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for out_features, in_features in ((3072, 768), (768, 3072)):
        weight = planted(out_features, in_features)
        x = torch.randn(args.tokens, in_features, generator=torch.Generator().manual_seed(1))
        dense = torch.nn.Linear(in_features, out_features).eval()
        for budget in args.budgets:
            base = GaudiGBLRLinear.from_dense(weight, torch.zeros(out_features), GaudiConfig(budget=budget)).eval()
            layers = {"nn.Linear": dense}
            for mode in MODES:
                layers[mode] = copy.deepcopy(base)
                layers[mode].compute_mode = mode
            steps = {name: make_step(layer, x, "inference") for name, layer in layers.items()}
            seconds = time_round_robin(steps, args.repeats, 3, x.device, 1)
            plan = base.compact_plan()
            for name, value in seconds.items():
                rows.append({"shape": f"{out_features}x{in_features}", "budget": budget, "mode": name,
                             "forward_ms": round(1e3 * value, 3), "ratio": round(value / seconds["nn.Linear"], 3),
                             "macs_fraction": round(base.macs_per_token() / weight.numel(), 4),
                             "groups": None if plan is None else len(plan.inputs) + len(plan.outputs),
                             "auto_runs": "compact" if base._chosen_plan() is not None else "dense"})
    print(json.dumps({"benchmark": "gaudi_compact_speed", "date": time.strftime("%Y-%m-%d"),
                      "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                      "tokens": args.tokens, "torch": torch.__version__, "load_average_at_end": os.getloadavg(),
                      "results": rows}, indent=1))


if __name__ == "__main__":
    main()
