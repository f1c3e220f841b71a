"""Peak memory and time of block-by-block post-training compression on a LLaMA-architecture model with
LLaMA-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads, vocabulary 32000) and random bf16 weights.

For each depth N the model is written to disk as safetensors shards (one per decoder layer, written block by
block: the generator never holds the model either), then compressed in a fresh process exactly as
``mode=compress`` does it for a causal LM: a meta-device skeleton, each block read from its shard when it is
reached, calibrated on random tokens, compressed, written to its own output shard and freed. One JSON line
per (codec, N): peak RSS of the compressing process, seconds per block, the projected 32-layer time, and the
output's bytes.

    PYTHONPATH=src python benchmarks/ptq_memory.py --layers 1 2 4 --codecs svdq-int8 \\
        >> benchmarks/results/ptq_memory_cpu.jsonl
    PYTHONPATH=src python benchmarks/ptq_memory.py --layers 32 --codecs svdq-int8 --device cuda   # on a GPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
SHAPES = {"llama-2-7b": LLAMA2_7B,  # half the width: for a quicker check of the same depth behaviour
          "llama-half": {**LLAMA2_7B, "hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16,
                         "num_key_value_heads": 16}}
CODECS = {  # name -> (layer type, options)
    "svdq-int8": ("svdq", {"bits": 8, "max_error": 0.05}),
    "hyper": ("hyper", {}),
    "lowrank-whiten": ("lowrank", {"init": "whiten"}),
}


def write_model(folder: Path, layers: int, shapes: dict) -> None:
    """A LLaMA folder (config.json, one shard per decoder layer plus one for the rest, and the index) with
    random bf16 weights, one block in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**shapes, num_hidden_layers=layers, tie_word_embeddings=False, dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    hidden, inner, vocab = shapes["hidden_size"], shapes["intermediate_size"], shapes["vocab_size"]
    generator = torch.Generator().manual_seed(0)

    def normal(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    weight_map, count = {}, layers + 1
    for index in range(layers):
        p = f"model.layers.{index}."
        block = {p + f"self_attn.{name}_proj.weight": normal(hidden, hidden) for name in "qkvo"}
        block.update({p + "mlp.gate_proj.weight": normal(inner, hidden),
                      p + "mlp.up_proj.weight": normal(inner, hidden),
                      p + "mlp.down_proj.weight": normal(hidden, inner),
                      p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                      p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        save_file(block, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(block, name))
        del block
    rest = {"model.embed_tokens.weight": normal(vocab, hidden), "lm_head.weight": normal(vocab, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    name = f"model-{count:05d}-of-{count:05d}.safetensors"
    save_file(rest, folder / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def compress_child(args: argparse.Namespace) -> None:
    """The measured process: compress the folder ``args.model`` block by block; prints one JSON line."""
    import torch

    from structured_compress.io import CompressedWriter
    from structured_compress.io.dense_weights import DenseWeights
    from structured_compress.io.save import dense_dtype
    from structured_compress.models.hf_models import create_hf_model
    from structured_compress.sequential import compress_sequential

    started = time.perf_counter()
    layer_type, options = CODECS[args.codec]
    model = create_hf_model(args.model, kind="causal_lm", dtype=args.dtype, empty_weights=True).eval()
    weights = DenseWeights(args.model)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=generator)
               for _ in range(args.batches)]
    marks = []

    class TimedWriter(CompressedWriter):
        def write_part(self, *a, **k):
            part = super().write_part(*a, **k)
            marks.append(time.perf_counter())
            return part

    writer = TimedWriter(args.out, model.config.num_hidden_layers + 1, None, dense_dtype(model), {"bench": args.codec})
    begin = time.perf_counter()
    report = compress_sequential(model, layer_type, 1.0 if layer_type == "svdq" else args.budget,
                                 include="model.layers.*", options=options, batches=batches,
                                 forward=lambda m, batch: m(input_ids=batch, use_cache=False), weights=weights,
                                 device=args.device, writer=writer, release=True)
    writer.finish(model, None, report, weights=weights)
    ends = [begin, *marks]
    errors = [row.output_error for row in report.layers if row.output_error is not None]
    peak_gpu = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    print(json.dumps({"block_seconds": [round(b - a, 1) for a, b in zip(ends, ends[1:])],
                      "compress_s": round(time.perf_counter() - begin, 1),
                      "total_s": round(time.perf_counter() - started, 1), "peak_gpu_bytes": peak_gpu,
                      "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
                      "bytes_read": weights.bytes_read,
                      "mean_output_error": sum(errors) / len(errors) if errors else None}))  # None: data-free


def measure(codec: str, layers: int, args: argparse.Namespace, root: Path) -> dict:
    model, out = root / f"{args.shapes}-{layers}", root / f"out-{codec}-{layers}"
    if not model.exists():
        write_model(model, layers, SHAPES[args.shapes])
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--child", "--model", str(model), "--out", str(out), "--codec", codec,
               "--device", args.device, "--dtype", args.dtype, "--tokens", str(args.tokens),
               "--batches", str(args.batches), "--budget", str(args.budget)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    child = json.loads(result.stdout.strip().splitlines()[-1])
    per_block = sum(child["block_seconds"]) / max(len(child["block_seconds"]), 1)
    row = {"benchmark": "ptq_memory", "codec": codec, "layers": layers, "shapes": args.shapes, "device": args.device,
           "dtype": args.dtype, "calibration": f"{args.batches} x {args.tokens} tokens",
           "seconds_per_block": round(per_block, 1), "projected_32_layers_min": round(32 * per_block / 60, 1),
           "output_bytes": sum(f.stat().st_size for f in out.iterdir()),
           "dense_bf16_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")), **child,
           "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "load_avg": os.getloadavg()[0],
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--codecs", nargs="+", default=["svdq-int8"], choices=sorted(CODECS))
    parser.add_argument("--shapes", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the skeleton's dtype (blocks are cast to it on load)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--workdir", default=None, help="where the random models go (default: a temp folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--codec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        compress_child(args)
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="ptq_memory_"))
    try:
        for codec in args.codecs:
            for layers in args.layers:
                print(json.dumps(measure(codec, layers, args, root)), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
