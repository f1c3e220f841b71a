"""Turn a sweep's outputs into a table: one row per run (overrides, metrics, params, FLOPs).

    python scripts/make_table.py logs/train/multirun/<date>            # Markdown to stdout, CSV beside it
    python scripts/make_table.py <dir> --csv results.csv --metrics test/acc val/acc
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

DEFAULT_METRICS = ("test/acc", "test/acc_top5", "val/acc", "test/loss", "test/perplexity")


def load_runs(root: Path) -> list[dict]:
    """Every ``metrics.json`` under ``root`` with the Hydra overrides of its run, sorted by run dir."""
    runs = []
    for path in sorted(root.rglob("metrics.json"), key=lambda p: (len(p.parts), str(p))):
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        runs.append({"dir": str(path.parent.relative_to(root)) or ".", "overrides": overrides or [],
                     **json.loads(path.read_text())})
    return runs


def to_rows(runs: list[dict], metric_names: list[str]) -> list[dict]:
    rows = []
    for run in runs:
        params = run.get("params", {})
        metrics = run.get("metrics", {})
        row = {"run": run["dir"], "overrides": " ".join(run["overrides"]), "layer": run.get("layer_type"),
               "budget": run.get("budget")}
        for name in metric_names:
            value = metrics.get(name)
            row[name] = None if value is None else round(value, 4)
        # numbers stored (codes in buffers included), also for metrics.json written before surgery counted them
        row["params"] = (params["model_params_before"] - params["replaced_params_before"]
                         + params["replaced_params_after"] if params else None)
        row["replaced params"] = (f"{params.get('replaced_params_before')}->{params.get('replaced_params_after')}"
                                  if params else None)
        macs = metrics.get("flops/linear_macs_per_sample")
        row["MACs/sample"] = None if macs is None else int(macs)
        if "bytes_on_disk" in run:  # mode=compress
            row["MB on disk"] = round(run["bytes_on_disk"] / 1e6, 2)
            row["x vs fp32"] = run.get("ratio_vs_fp32")
            row["replaced MB"] = round(run["replaced_bytes"] / 1e6, 2)
            row["replaced x vs fp32"] = run.get("replaced_ratio_vs_fp32")
            row["compress (s)"] = run.get("compress_time_s")
        row["time (s)"] = run.get("wall_time_s")
        rows.append(row)
    return rows


def columns_of(rows: list[dict]) -> list[str]:
    """Every column any row has, in first-seen order (train and compress runs can share a table)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    columns = columns_of(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a multirun (or run) directory holding metrics.json files")
    parser.add_argument("--csv", type=Path, default=None, help="CSV path (default: <sweep_dir>/results.csv)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as a JSON list here")
    parser.add_argument("--metrics", nargs="*", default=None, help="metric names to show (default: those present)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    runs = load_runs(args.sweep_dir)
    if not runs:
        parser.error(f"no metrics.json under {args.sweep_dir}: did the runs finish? (each run writes one at the end)")
    present = {k for run in runs for k in run.get("metrics", {})}
    metric_names = args.metrics or [m for m in DEFAULT_METRICS if m in present]
    rows = to_rows(runs, metric_names)
    print(markdown(rows))
    csv_path = args.csv or args.sweep_dir / "results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns_of(rows))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nCSV written to {csv_path}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"JSON written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
