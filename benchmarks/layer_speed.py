"""Forward latency of every registered layer type against dense, for one shape and budget. Prints JSON.

    python benchmarks/layer_speed.py --in-features 768 --out-features 3072 --tokens 4096 --budget 0.25
    python benchmarks/layer_speed.py --option gaudi.compute_mode=lr     # from_dense options per type
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import yaml

from src.layers import LAYERS


def time_forwards(layers: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per forward of each layer, timed round-robin (every round runs each layer once, after a
    warm-up) so that drift in clock speed or machine load hits all types alike; CUDA is synchronised per call."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in layers}
    with torch.inference_mode():
        for layer in layers.values():
            for _ in range(3):
                layer(x)
        for _ in range(repeats):
            for name, layer in layers.items():
                sync()
                start = time.perf_counter()
                layer(x)
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-features", type=int, default=768)
    parser.add_argument("--out-features", type=int, default=3072)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--types", nargs="*", default=None, help="layer types (default: all registered)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--option", action="append", default=[], metavar="TYPE.KEY=VALUE",
                        help="a from_dense option for one type (YAML value), e.g. gaudi.compute_mode=lr")
    args = parser.parse_args()
    options: dict[str, dict] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        layer_type, dot, name = key.partition(".")
        if not (sep and dot and name):
            parser.error(f"--option {item!r}: expected TYPE.KEY=VALUE, e.g. gaudi.compute_mode=lr")
        options.setdefault(layer_type, {})[name] = yaml.safe_load(value)

    torch.manual_seed(0)
    device = torch.device(args.device)
    weight = torch.randn(args.out_features, args.in_features, device=device) / args.in_features ** 0.5
    x = torch.randn(args.tokens, args.in_features, device=device)
    results, layers, init_seconds = [], {}, {}
    for name in args.types or sorted(LAYERS):
        start = time.perf_counter()
        try:
            layers[name] = LAYERS[name].from_dense(weight, None, args.budget, **options.get(name, {})).to(device).eval()
        except Exception as err:  # report and go on: one broken type should not hide the others
            results.append({"layer": name, "error": f"{type(err).__name__}: {err}"})
            continue
        init_seconds[name] = time.perf_counter() - start
    forward_seconds = time_forwards(layers, x, args.repeats)
    for name, layer in layers.items():
        results.append({
            "layer": name, "options": options.get(name, {}), "init_s": round(init_seconds[name], 4),
            "forward_ms": round(1e3 * forward_seconds[name], 4),
            "params": layer.num_params(), "macs_per_token": layer.flops_per_token(),
            "rel_error": round(((layer.to_dense_weight().float() - weight).norm() / weight.norm()).item(), 5),
        })
    print(json.dumps({"device": str(device), "cpu": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "shape": [args.out_features, args.in_features], "tokens": args.tokens, "budget": args.budget,
                      "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
