"""The project's codecs against the standard quantizers (HQQ, optimum-quanto, GGUF), one command per model: runs
``benchmarks/whole_file.py`` on a fixed list of project codecs and every baseline, then writes a Markdown table
(baselines marked; how each project codec stands against them) and the Pareto plot (``comparison.md``,
``compare_<metric>_vs_bytes_on_disk.png/.svg``) into ``docs/results/<model>_codecs/``.

    python scripts/compare_codecs.py --model minilm                  # run the codecs, then table + plot
    python scripts/compare_codecs.py --model gemma --reuse benchmarks/results/whole_file_gemma_cpu.jsonl \\
        benchmarks/results/whole_file_gemma_baselines_cpu.jsonl      # table + plot from saved rows only

Against the baselines, each project row is ``yes`` (better than every baseline row), ``front`` (better than
every baseline whose file is at most as large; the smallest larger baseline at least as good is named) or ``no``
(a baseline at most as large is at least as good; the smallest such is named).
"Best at >= Nx": the best project row and the best baseline row among those whose file is at least N times
smaller than the fp16 checkpoint. Gemma's project rows are also exported to GGUF (``whole_file.py --gguf q8_0``):
"GGUF MB" and "GGUF perplexity" are the exported file's size and the perplexity of the model read back from it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/compare_codecs.py`: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scripts.make_table import BASELINE_MARK, read_benchmark_lines  # noqa: E402
from scripts.plot import LOWER_IS_BETTER, pareto_series, plot_pareto  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE_CODECS = ["gguf-source", "hqq-int8-g64", "hqq-int4-g64", "hqq-int4-g128", "hqq-int3-g64", "hqq-int2-g32",
                   "quanto-qint8", "quanto-qint4", "gguf-q8_0", "gguf-q5_1", "gguf-q5_0", "gguf-q4_1", "gguf-q4_0"]
PROJECT_CODECS = ["none", "int8-rtn", "int4-rtn-asym-g64", "int4-gptq-asym-g64", "svdq-int8-e0.05", "hyper-e0.05",
                  "lowrank-whiten-0.5"]
RATIOS = (2.0, 3.0, 4.0)


@dataclass(frozen=True)
class Setup:
    """A model's comparison: its quality column, the storage policies, the codecs run and the quality axis's
    limits (collapsed codecs fall outside them; the table has their figures)."""

    metric: str
    storage: tuple[str, ...]
    codecs: tuple[str, ...]
    ylim: tuple[float | None, float | None] = (None, None)
    options: tuple[str, ...] = ()  # more whole_file.py options (Gemma: export each project row to GGUF)


MODELS = {
    "minilm": Setup("cosine_mean", ("fp16", "emb4"), (*PROJECT_CODECS, "auto-e2e-r3.0", *BASELINE_CODECS), (0.9, None)),
    "efficientnet": Setup("top1_agreement", ("fp16",), (*PROJECT_CODECS, "auto-rtn-e2e-r2.25", *BASELINE_CODECS)),
    "gemma": Setup("perplexity", ("emb8", "src"), ("none", "int8-rtn", "int4-rtn-asym-g64", "svdq-q8_0-rtn",
                                                 "svdq-q4_1-gptq", "svdq-q4_0-gptq", *BASELINE_CODECS), (40.0, 80.0),
                   ("--gguf", "q8_0")),
}


def run_codecs(model: str, setup: Setup, out: Path, extra: list[str]) -> None:
    """Run ``whole_file.py`` on the setup's codecs, appending its JSON lines to ``out``."""
    command = [sys.executable, str(ROOT / "benchmarks" / "whole_file.py"), "--model", model,
               "--codecs", *setup.codecs, "--storage", *setup.storage, *extra]
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'benchmarks'}:{ROOT}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        subprocess.run(command, stdout=handle, check=True, env={**os.environ, **env})


def read_records(paths: list[Path], model: str) -> list[dict]:
    """The JSON lines of ``paths`` for ``model``, each with ``line`` (its ``path:number``, as make_table's) and
    ``name``; a codec, storage policy and calibration size measured more than once: the last line read. Rows
    of one codec and policy that differ in calibration windows are named with them."""
    records = {}
    for path in paths:
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if text.strip() and (record := json.loads(text)).get("model") == model:
                key = record["codec"], record["storage"], record.get("calibration_windows")
                records[key] = {**record, "line": f"{path}:{number}"}
    calibrations = Counter(key[:2] for key in records)
    return [{**r, "name": f"{r['codec']} ({r['storage']})" + (f" cal {key[2]}" if calibrations[key[:2]] > 1 else "")}
            for key, r in records.items()]


def better(a: float, b: float, lower: bool) -> bool:
    return a < b if lower else a > b


def label(record: dict) -> str:
    return record.get("name") or f"{record['codec']} ({record['storage']})"


def verdict(row: dict, baselines: list[dict], metric: str, lower: bool) -> str:
    """How ``row`` stands against the baselines: ``yes`` (better than every one), ``front`` (better than every
    baseline of at most its size; the smallest larger one at least as good is named) or ``no`` (a baseline of at
    most its size is at least as good: the smallest such is named)."""
    as_good = sorted((b for b in baselines if not better(row[metric], b[metric], lower)),
                     key=lambda b: b["bytes_on_disk"])
    if not as_good:
        return "yes"
    first = as_good[0]
    where = f"{label(first)} {first[metric]:.4g} at {first['bytes_on_disk'] / 1e6:.1f} MB"
    return f"no: {where}" if first["bytes_on_disk"] <= row["bytes_on_disk"] else f"front; as good: {where}"


def best_at(records: list[dict], ratio: float, metric: str, lower: bool) -> dict | None:
    """The best-quality row among those at least ``ratio`` times smaller than the fp16 checkpoint."""
    small = [r for r in records if r["ratio_vs_fp16"] >= ratio]
    return min(small, key=lambda r: r[metric] if lower else -r[metric]) if small else None


def table(records: list[dict], metric: str) -> str:
    """Markdown: baselines first (the source file on top), then the project's rows, each by size; "layers left
    float": the layers a baseline's format could not hold (row length), stored by the policy instead."""
    lower = any(word in metric for word in LOWER_IS_BETTER)
    baselines = sorted((r for r in records if r.get("baseline")),
                       key=lambda r: (r["codec"] != "gguf-file", -r["bytes_on_disk"]))
    project = sorted((r for r in records if not r.get("baseline")), key=lambda r: -r["bytes_on_disk"])
    exported = any("gguf_bytes" in r for r in records)  # rows also exported to GGUF and read back from the file
    gguf_head = f" GGUF MB | GGUF {metric} |" if exported else ""
    lines = [f"| codec (storage) | kind | {metric} | MB | file x | layers x | layers left float |{gguf_head} "
             "vs baselines |", "|---|---|---|---|---|---|---|" + "---|" * (3 if exported else 1)]
    for r in baselines + project:
        kind = f"baseline: {r.get('library', '')} {r.get('library_version', '')}" if r.get("baseline") else \
            "project, storage only" if r["codec"] == "none" else "project"
        layers = f"{r['replaced_ratio_vs_fp16']:.2f}" if r.get("replaced_ratio_vs_fp16") else "--"
        beats = "" if r.get("baseline") else verdict(r, baselines, metric, lower)
        gguf = "" if not exported else " -- | -- |" if "gguf_bytes" not in r else \
            f" {r['gguf_bytes'] / 1e6:.1f} | {r['gguf_' + metric]:.4g} |"
        lines.append(f"| {label(r)} | {kind} | {r[metric]:.4g} | {r['bytes_on_disk'] / 1e6:.1f} | "
                     f"{r['ratio_vs_fp16']:.2f} | {layers} | {len(r.get('baseline_float_layers', []))} |{gguf} "
                     f"{beats} |")
    lines += ["", "| file at least | best project codec | best baseline |", "|---|---|---|"]
    for ratio in RATIOS:
        cells = []
        for part in (project, baselines):
            best = best_at(part, ratio, metric, lower)
            cells.append(f"{label(best)}: {best[metric]:.4g} at {best['ratio_vs_fp16']:.2f}x" if best else "none")
        lines.append(f"| {ratio:g}x smaller than fp16 | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], paths: list[Path], metric: str, out: Path, ylim: tuple) -> list[Path]:
    """The Pareto plot: make_table's lines for the project's codecs, one hollow dashed line per baseline family
    (``hqq``, ``quanto``, ``gguf`` formats, the ``gguf-source`` file) and storage policy."""
    by_line = {r["line"]: r for r in records}
    rows = []
    for path in paths:
        for row in read_benchmark_lines(path):
            record = by_line.get(row["run_dir"])
            if record is None:
                continue
            row["experiment"] = None  # one line per codec family whichever file its points come from
            if record.get("baseline"):
                family = "gguf-source" if record["codec"].startswith(("gguf-source", "gguf-file")) \
                    else record["codec"].split("-")[0]
                row = {**row, "method": f"{family} ({record['storage']}) {BASELINE_MARK}", "budget": None,
                       "overrides": record["codec"]}
            rows.append(row)
    series = pareto_series(rows, metric, "bytes_on_disk")
    return plot_pareto(series, metric, "bytes_on_disk", out / f"compare_{metric}_vs_bytes_on_disk", ymin=ylim[0],
                       ymax=ylim[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--reuse", nargs="+", type=Path, default=None,
                        help="whole_file.py JSON lines to read instead of running the codecs")
    parser.add_argument("--rows", type=Path, default=None,
                        help="where a run appends its lines (default: benchmarks/results/whole_file_<model>_compare"
                             "_cpu.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="table and plot folder (default: docs/results/"
                                                               "<model>_codecs)")
    parser.add_argument("--windows", type=int, default=8, help="Gemma evaluation windows (passed to whole_file.py)")
    args = parser.parse_args(argv)
    setup = MODELS[args.model]
    paths = args.reuse
    if paths is None:
        rows = args.rows or ROOT / "benchmarks" / "results" / f"whole_file_{args.model}_compare_cpu.jsonl"
        run_codecs(args.model, setup, rows, [*setup.options, *(["--windows", str(args.windows)]
                                                               if args.model == "gemma" else [])])
        paths = [rows]
    records = [r for r in read_records(paths, args.model) if setup.metric in r]
    if not records:
        parser.error(f"no {args.model} row with {setup.metric} in {' '.join(map(str, paths))}")
    out = args.out or ROOT / "docs" / "results" / f"{args.model}_codecs"
    out.mkdir(parents=True, exist_ok=True)
    text = table(records, setup.metric)
    (out / "comparison.md").write_text(text)
    print(text)
    for file in [out / "comparison.md", *plot(records, paths, setup.metric, out, setup.ylim)]:
        print(f"wrote {file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
