"""Read an exported GGUF back and compare it with the model it came from; prints one JSON object.

    python scripts/verify_gguf_export.py <run dir of mode=export> [--source-gguf FILE] [--tokens N]
    python scripts/verify_gguf_export.py <file.gguf> --source-gguf FILE    # two files only

* ``gguf`` side: every tensor read with ``GGUFReader`` and dequantized by ``gguf.quants``, against the compressed
  folder's dequantized weight in GGUF's layout: how many are bit-identical, the largest relative error;
* ``transformers`` side: ``from_pretrained(..., gguf_file=)`` logits against the compressed model's on N tokens;
* ``--source-gguf``: the exported tensors against another GGUF's (e.g. the file the model was converted from).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from structured_compress import load_compressed  # noqa: E402
from structured_compress.export.gguf_arch import arch_of, row_order, shift  # noqa: E402
from structured_compress.io.structure import structured_layers  # noqa: E402


def _read(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in GGUFReader(path).tensors}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).astype(np.float64)) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a mode=export run folder, or a .gguf file")
    parser.add_argument("--source-gguf", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if args.run_dir.suffix == ".gguf":
        print(json.dumps({"file": str(args.run_dir), **_versus(_read(args.run_dir), args.source_gguf)}, indent=2))
        return
    metrics = json.loads((args.run_dir / "metrics.json").read_text())
    report = json.loads((args.run_dir / "export_report.json").read_text())
    path = Path(metrics["exported_file"])
    model = load_compressed(metrics["exported_from"]).eval()
    arch, layers, state = arch_of(model.config), structured_layers(model), model.state_dict()
    exported = _read(path)
    exact, worst = 0, 0.0
    with torch.no_grad():
        for row in report["tensors"]:
            owner = row["hf_name"].rpartition(".")[0]
            weight = layers[owner].to_dense_weight() if owner in layers and row["hf_name"].endswith(".weight") \
                else state[row["hf_name"]]
            expected = weight.float().numpy() + np.float32(shift(arch, row["name"]))
            order = row_order(arch, model.config, row["name"], expected.shape[0])
            expected = expected if order is None else expected[order]
            read = exported[row["name"]].reshape(expected.shape)
            exact += bool(np.array_equal(read, expected))
            worst = max(worst, _relative(read, expected))
    result = {"file": str(path), "bytes": path.stat().st_size, "tensors": len(report["tensors"]),
              "bit_identical_via_gguf_reader": exact, "max_rel_error_via_gguf_reader": worst}
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    result["transformers_logits_max_abs_diff"] = float((ours - theirs).abs().max())
    result["logits_max_abs"] = float(ours.abs().max())
    if args.source_gguf:
        result.update(_versus(exported, args.source_gguf))
    print(json.dumps(result, indent=2))


def _versus(exported: dict[str, np.ndarray], source_path: Path) -> dict:
    """Every tensor of ``source_path`` against the exported one of the same name, both dequantized."""
    source = _read(source_path)
    errors = {name: _relative(exported[name].reshape(-1), values.reshape(-1)) for name, values in source.items()
              if name in exported}
    return {"vs_source": {"tensors_compared": len(errors), "missing": sorted(set(source) - set(exported)),
                          "bit_identical": sum(e == 0 for e in errors.values()),
                          "max_rel_error": max(errors.values()), "worst": max(errors, key=errors.get)}}


if __name__ == "__main__":
    main()
