"""Time of every registered layer type against ``nn.Linear`` at model projection shapes. Prints JSON lines.

One line per (shape, budget, layer, mode, dtype) with the median milliseconds per call and the ratio to an
``nn.Linear`` holding the same weight, timed in the same process and round-robin (every round runs each
layer once, so drift in clock speed or machine load hits all types alike). Modes: ``inference`` (eval,
inference mode), ``forward`` (train mode, autograd recording) and ``fwd+bwd``. On CUDA a round runs
``--gpu-iters`` back-to-back calls between two CUDA events, and ``inference`` is also replayed from a CUDA
graph: ``graph_ms`` excludes the launch latency that ``ms`` includes.

    PYTHONPATH=. python benchmarks/layer_speed.py --quick                       # ViT-B fc1, budget 0.25
    PYTHONPATH=. python benchmarks/layer_speed.py --shapes vit-b bert-base --budgets 0.1 0.25 0.5
    PYTHONPATH=. python benchmarks/layer_speed.py --shapes 768x3072 --modes inference --types lowrank monarch
    PYTHONPATH=. python benchmarks/layer_speed.py --option gaudi.compute_mode=lr  # from_dense options per type
    PYTHONPATH=. python benchmarks/layer_speed.py --device cuda --dtypes bfloat16 float16 --shapes all
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
import yaml
from torch import nn

from structured_compress.layers import LAYERS
from structured_compress.layers.fastpath import reference_paths, set_int8_activations

# (in_features, out_features) of the linear maps in one transformer block
SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "vit-b": {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)},
    "bert-base": {"query": (768, 768), "intermediate": (768, 3072), "output": (3072, 768)},
    "gpt2-medium": {"c_attn": (1024, 3072), "c_proj": (1024, 1024), "c_fc": (1024, 4096), "mlp_proj": (4096, 1024)},
    "llama-7b": {"q_proj": (4096, 4096), "gate_proj": (4096, 11008), "down_proj": (11008, 4096)},
}
MODES = ("inference", "forward", "fwd+bwd")
# tsvd meets its tolerance at any rank unless capped; on the random weights timed here that rank is several
# times the matrix size, so the benchmarks cap it at the budget (``--option tsvd.budget_cap=false`` undoes it)
DEFAULT_OPTIONS = {"tsvd": {"budget_cap": True}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_shapes(specs: list[str]) -> list[tuple[str, int, int]]:
    """``vit-b`` (every map of the model), ``vit-b.fc1`` (one), ``768x3072`` (in x out) or ``all``."""
    shapes = []
    for spec in specs:
        if spec == "all":
            shapes += parse_shapes(list(SHAPES))
        elif spec in SHAPES:
            shapes += [(f"{spec}.{name}", n, m) for name, (n, m) in SHAPES[spec].items()]
        elif spec.partition(".")[0] in SHAPES and spec.partition(".")[2] in SHAPES[spec.partition(".")[0]]:
            model, _, name = spec.partition(".")
            shapes.append((spec, *SHAPES[model][name]))
        elif "x" in spec and all(part.isdigit() for part in spec.split("x", 1)):
            n, m = map(int, spec.split("x", 1))
            shapes.append((spec, n, m))
        else:
            raise ValueError(f"--shapes {spec!r}: use all, a model ({', '.join(SHAPES)}), MODEL.MAP "
                             f"(e.g. vit-b.fc1) or INxOUT (e.g. 768x3072)")
    return shapes


def parse_options(items: list[str]) -> dict[str, dict]:
    """``TYPE.KEY=VALUE`` (YAML value) -> ``{type: {key: value}}``."""
    options: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        layer_type, dot, name = key.partition(".")
        if not (sep and dot and name):
            raise ValueError(f"--option {item!r}: expected TYPE.KEY=VALUE, e.g. gaudi.compute_mode=lr")
        options.setdefault(layer_type, {})[name] = yaml.safe_load(value)
    return options


def with_defaults(options: dict[str, dict]) -> dict[str, dict]:
    """``options`` on top of :data:`DEFAULT_OPTIONS`, merged per type."""
    return {name: {**DEFAULT_OPTIONS.get(name, {}), **options.get(name, {})} for name in {*DEFAULT_OPTIONS, *options}}


def make_step(layer: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One call of ``layer`` in ``mode``; the returned closure sets the layer's train/eval state itself so
    layers sharing nothing can be interleaved."""
    if mode == "inference":
        def step() -> None:
            layer.eval()
            with torch.inference_mode():
                layer(x)
    elif mode == "forward":
        x_grad = x.detach().requires_grad_(True)

        def step() -> None:
            layer.train()
            layer(x_grad)
    else:
        x_grad = x.detach().requires_grad_(True)
        grad_out = None

        def step() -> None:
            nonlocal grad_out
            layer.train()
            y = layer(x_grad)
            grad_out = torch.randn_like(y) if grad_out is None else grad_out
            y.backward(grad_out)
            x_grad.grad = None
            layer.zero_grad(set_to_none=True)
    return step


def on_reference_paths(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` run with every layer on its reference forward."""
    def reference_step() -> None:
        with reference_paths():
            step()
    return reference_step


def median_round_robin(steps: dict[str, Callable[[], object]], repeats: int, warmup: int,
                       seconds_of: Callable[[Callable[[], object]], float]) -> dict[str, float]:
    """Median of ``seconds_of(step)`` per step after ``warmup`` calls each; every round runs each step once, so
    drift in clock speed or machine load hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(seconds_of(step))
    return {name: statistics.median(values) for name, values in times.items()}


def time_round_robin(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device,
                     iters: int) -> dict[str, float]:
    """Median seconds per call of each step. CPU: one call per round, wall clock. CUDA: ``iters`` calls per
    round between two CUDA events (back to back, so the GPU queue stays full)."""
    def cuda_seconds(step: Callable[[], None]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    return median_round_robin(steps, repeats, warmup, cuda_seconds if device.type == "cuda" else _seconds)


def time_cuda_graphs(layers: dict[str, nn.Module], x: torch.Tensor, repeats: int, iters: int) -> dict[str, object]:
    """Median seconds per inference call replayed from a CUDA graph of ``iters`` calls (no launch latency);
    a layer that cannot be captured gets its error message instead."""
    graphs: dict[str, object] = {}
    for name, layer in layers.items():
        layer.eval()
        try:
            with torch.inference_mode():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        layer(x)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(iters):
                        layer(x)
            graphs[name] = graph
        except Exception as err:  # report and go on: a host-side decode cannot be captured
            graphs[name] = f"{type(err).__name__}: {err}"
    steps = {name: graph.replay for name, graph in graphs.items() if not isinstance(graph, str)}
    seconds = time_round_robin(steps, repeats, 2, x.device, 1)
    return {name: seconds[name] / iters if name in seconds else graphs[name] for name in graphs}


def build_layers(types: list[str], weight: torch.Tensor, bias: torch.Tensor, budget: float,
                 options: dict[str, dict], dtype: torch.dtype, int8: bool) -> tuple[dict, list[dict]]:
    """``{name: layer}`` (the ``nn.Linear`` reference first) and per-layer facts (init time, size, error);
    a type that fails to build is reported and skipped."""
    reference = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.bias.copy_(bias)
    layers, facts = {"nn.Linear": reference.to(dtype)}, []
    for name in types:
        start = time.perf_counter()
        try:
            config = LAYERS[name].Config.from_options(options.get(name), budget)
            layer = LAYERS[name].from_dense(weight, bias, config)
        except Exception as err:  # report and go on: one broken type should not hide the others
            facts.append({"layer": name, "error": f"{type(err).__name__}: {err}"})
            continue
        init_s = time.perf_counter() - start
        rel_error = ((layer.to_dense_weight().float() - weight).norm() / weight.norm()).item()
        fact = {"layer": name, "init_s": round(init_s, 4), "params": layer.num_params(),
                "macs_per_token": layer.macs_per_token(), "rel_error": round(rel_error, 5)}
        if hasattr(layer, "decode_"):
            fact["decode_ms"] = round(1e3 * min(_seconds(layer.decode_) for _ in range(3)), 3)
        if int8 and set_int8_activations(layer, True):
            fact["int8_activations"] = True
        layers[name] = layer.to(dtype)
        facts.append(fact)
    return layers, facts


def cpu_name() -> str:
    """The CPU model as ``lscpu`` shows it (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["vit-b", "bert-base", "gpt2-medium"],
                        help="models (vit-b bert-base gpt2-medium llama-7b), MODEL.MAP, INxOUT, or all")
    parser.add_argument("--quick", action="store_true", help="only vit-b.fc1 at budget 0.25")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    parser.add_argument("--tokens", type=int, default=4096, help="rows of the input (batch x sequence)")
    parser.add_argument("--types", nargs="*", default=None, help="layer types (default: all registered)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default: float32 on CPU, bfloat16 and float16 on CUDA")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gpu-iters", type=int, default=20, help="back-to-back calls per timed CUDA round")
    parser.add_argument("--int8", action="store_true", help="turn on the opt-in int8-activation paths")
    parser.add_argument("--with-reference", action="store_true",
                        help="also time each type's readable reference forward (rows TYPE@ref), same rounds")
    parser.add_argument("--option", action="append", default=[], metavar="TYPE.KEY=VALUE",
                        help="a from_dense option for one type (YAML value), e.g. gaudi.compute_mode=lr")
    args = parser.parse_args()
    try:
        shapes = parse_shapes(["vit-b.fc1"] if args.quick else args.shapes)
        options = with_defaults(parse_options(args.option))
    except ValueError as err:
        parser.error(str(err))
    budgets = [0.25] if args.quick else args.budgets
    device = torch.device(args.device)
    dtypes = args.dtypes or (["bfloat16", "float16"] if device.type == "cuda" else ["float32"])
    types = args.types or sorted(LAYERS)
    print(json.dumps({"meta": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "tokens": args.tokens,
        "repeats": args.repeats, "gpu_iters": args.gpu_iters if device.type == "cuda" else None,
        "int8_activations": args.int8, "with_reference": args.with_reference, "options": options,
        "load_avg_1_5_15": os.getloadavg(),  # other jobs on the machine skew the milliseconds
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}), flush=True)
    run(args, shapes, budgets, dtypes, types, options, device)


def run(args: argparse.Namespace, shapes: list[tuple[str, int, int]], budgets: list[float], dtypes: list[str],
        types: list[str], options: dict[str, dict], device: torch.device) -> None:
    """Build, time and print every (shape, budget, dtype, mode) combination."""
    for shape_name, in_features, out_features in shapes:
        for budget in budgets:
            torch.manual_seed(0)
            weight = torch.randn(out_features, in_features, device=device) / in_features ** 0.5
            bias = torch.randn(out_features, device=device) / 10
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                layers, facts = build_layers(types, weight, bias, budget, options, dtype, args.int8)
                x = torch.randn(args.tokens, in_features, device=device, dtype=dtype)
                base = {"shape": shape_name, "in": in_features, "out": out_features, "budget": budget,
                        "dtype": dtype_name, "device": device.type}
                for fact in facts:
                    if "error" in fact:
                        print(json.dumps({**base, **fact}), flush=True)
                for mode in args.modes:
                    steps = {name: make_step(layer, x, mode) for name, layer in layers.items()}
                    if args.with_reference:
                        steps.update({f"{name}@ref": on_reference_paths(make_step(layer, x, mode))
                                      for name, layer in layers.items() if name not in ("nn.Linear", "dense")})
                    seconds = time_round_robin(steps, args.repeats, args.warmup, device, args.gpu_iters)
                    graphs = (time_cuda_graphs(layers, x, args.repeats, args.gpu_iters)
                              if device.type == "cuda" and mode == "inference" else {})
                    built = [f for f in facts if "error" not in f]
                    for fact in [{"layer": "nn.Linear"}] + built + [
                            {**f, "layer": f"{f['layer']}@ref"} for f in built if f"{f['layer']}@ref" in steps]:
                        name = fact["layer"]
                        row = {**base, **fact, "mode": mode, "ms": round(1e3 * seconds[name], 4),
                               "ratio": round(seconds[name] / seconds["nn.Linear"], 4)}
                        if name in graphs:
                            graph = graphs[name]
                            row.update({"graph_error": graph} if isinstance(graph, str) else {
                                "graph_ms": round(1e3 * graph, 4),
                                "graph_ratio": round(graph / graphs["nn.Linear"], 4)
                                if not isinstance(graphs["nn.Linear"], str) else None})
                        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
