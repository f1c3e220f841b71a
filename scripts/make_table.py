"""Turn sweeps into a tidy CSV (one run a row, one number a column) and a Markdown table laid out like a paper's
(one row per model x method x budget, seeds pooled into mean and spread, unfinished runs kept with their status).

    python scripts/make_table.py logs/sweeps/offline/fmnist_vit                  # Markdown to stdout, CSV beside it
    python scripts/make_table.py DIR [DIR ...] --csv runs.csv --json runs.json
    python scripts/make_table.py DIR --metrics test/acc macs_per_sample --group-by method budget --spread range
    python scripts/make_table.py benchmarks/results/whole_file_minilm_cpu.jsonl --metrics cosine_mean ratio_vs_fp16

A run is any folder holding ``metrics.json`` or Hydra's ``.hydra/`` (single runs and multirun subfolders alike).
Status: ``ok`` (metrics.json written), ``failed`` (its log holds a traceback or an error line), else
``unfinished`` (still running, or killed; the detail names its newest checkpoint).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

log = logging.getLogger("make_table")

ID_COLUMNS = ("model", "method", "budget", "experiment", "mode", "overrides", "seed", "status", "detail", "run_dir")
TEXT_COLUMNS = set(ID_COLUMNS) - {"budget", "seed"}  # budget and seed are numbers (a budget may be a plan)
DEFAULT_GROUP_BY = ("model", "method", "budget", "experiment", "mode", "overrides")  # every id but seed and run
# metric names in metrics.json -> tidy column names for the two cost figures every run has
RENAMES = {"flops/linear_macs_per_sample": "macs_per_sample",
           "flops/executed_flops_per_sample": "executed_flops_per_sample"}
QUALITY_FIRST = ("test/acc", "test/acc_top5", "test/perplexity")  # shown before any other test/* metric
COST_COLUMNS = ("params_total", "macs_per_sample", "bytes_on_disk", "ratio_vs_fp16", "wall_time_s")
# overrides already shown by an id column, or saying nothing about the result
SHOWN_OVERRIDES = {"experiment", "model", "layer", "layer.name", "layer.budget", "mode", "mode.name", "seed", "sweep"}
QUIET_OVERRIDE_PREFIXES = ("hydra.", "paths.", "logger", "+logger", "callbacks", "debug")
# the exception line ending a traceback (the first unindented line after its header); an error line's message
TRACEBACK = re.compile(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n|\n)*(\S.*)$", re.M)
ERROR_LINE = re.compile(r"\]\[ERROR\] - (.*)$|^((?:error|\w+(?:Error|Exception)):.*)$", re.M)
SPREADS = ("std", "range")
ALWAYS_SHOWN = ("model", "method")  # a paper's rows; other ids with one value for all rows go above the table


# ---------------------------------------------------------------- reading runs

def _natural_key(path: Path) -> tuple:
    """Sort ``10`` after ``9``: multirun job folders are numbered."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def find_run_dirs(root: Path) -> list[Path]:
    """``root`` and every folder under it that holds ``metrics.json`` or ``.hydra/``, in job order."""
    found = {p.parent for p in root.rglob("metrics.json")} | {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    if (root / "metrics.json").is_file() or (root / ".hydra").is_dir():
        found.add(root)
    return sorted((d for d in found if ".hydra" not in d.parts), key=_natural_key)


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _read_json(path: Path) -> dict:
    """A JSON file's object, ``{}`` when absent or cut off (a run killed while writing it)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def failure_message(text: str) -> str | None:
    """Why a run failed, from its log: the exception of a traceback, else the first error line; None if neither."""
    match = TRACEBACK.search(text) or ERROR_LINE.search(text)
    return None if match is None else next(g for g in match.groups() if g is not None).strip()


def run_status(run_dir: Path, finished: bool) -> tuple[str, str]:
    """``(status, detail)``: ok / failed (error line from the run's log) / unfinished (newest checkpoint)."""
    if finished:
        return "ok", ""
    for log_file in sorted(run_dir.glob("*.log")) + sorted(run_dir.glob("*.err")):
        message = failure_message(log_file.read_text(errors="replace"))
        if message is not None:
            return "failed", f"{log_file.name}: {message[:200]}"
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return "unfinished", f"newest checkpoint {checkpoints[-1].name}" if checkpoints else "no checkpoint yet"


def _label(value: Any) -> Any:
    """A config value as one table cell: mappings and lists as compact JSON (e.g. a per-layer plan)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")) if isinstance(value, (dict, list)) else value


def _extra_overrides(overrides: Iterable[str]) -> str:
    """The overrides that set something no id column shows (e.g. ``layer.options.rank=8``)."""
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key not in SHOWN_OVERRIDES and not key.startswith(QUIET_OVERRIDE_PREFIXES):
            kept.append(item)
    return " ".join(kept)


def run_ids(run_dir: Path, results: dict) -> dict[str, Any]:
    """What identifies a run: metrics.json first, then the Hydra config, then Hydra's config-group choices."""
    config = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}
    choices = hydra_cfg.get("hydra", {}).get("runtime", {}).get("choices", {}) or {}
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    layer = config.get("layer") or {}
    return {
        "model": choices.get("model") or (config.get("model") or {}).get("name"),
        "method": _label(results.get("layer_type", layer.get("name"))),
        "budget": _label(results.get("budget", layer.get("budget"))),
        "experiment": results.get("experiment") or choices.get("experiment"),
        "mode": (config.get("mode") or {}).get("name") or choices.get("mode"),
        "overrides": _extra_overrides(overrides),
        "seed": config.get("seed"),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_numbers(results: dict, flops: dict) -> dict[str, float]:
    """Every number of a run under one column name each: metrics (``test/acc``; ``baseline/...`` for the
    dense model a compress run started from), parameter counts, MACs, sizes on disk and times."""
    numbers: dict[str, float] = {}
    params = results.get("params") or {}
    if params:
        numbers["params_total"] = params["model_params_after"]
        numbers["params_dense"] = params["model_params_before"]
    numbers.update({k: v for k, v in params.items() if not k.startswith("model_params")})
    numbers.update({RENAMES.get(k, k): v for k, v in (results.get("metrics") or {}).items()})
    numbers.update({f"baseline/{k}": v for k, v in (results.get("baseline_metrics") or {}).items()})
    numbers.update({k: v for k, v in results.items() if k != "budget" and _is_number(v)})
    if flops:  # written when training starts (unfinished runs have their cost too); integers, unlike metrics
        numbers["macs_per_sample"] = flops.get("linear_macs_per_sample")
        numbers["executed_flops_per_sample"] = flops.get("executed_flops_per_sample")
    return {k: v for k, v in numbers.items() if _is_number(v)}


def read_run(run_dir: Path) -> dict[str, Any]:
    """One tidy row: id columns, status, and every number the run wrote."""
    results = _read_json(run_dir / "metrics.json")
    status, detail = run_status(run_dir, finished=bool(results))
    return {**run_ids(run_dir, results), "status": status, "detail": detail, "run_dir": str(run_dir),
            **run_numbers(results, _read_json(run_dir / "flops.json"))}


# a benchmark codec name ends in its knob: lowrank-0.25 (budget), svdq-int8-e0.05 (max_error), hyper-e0.02
# (loss_max), tsvd-0.05 (tolerance), auto-e2e-r3.0 (target_ratio), int4-gptq-asym-g64 (group_size)
CODEC_KNOB = re.compile(r"^(?P<family>.+?)-(?P<kind>[erg]?)(?P<value>\d+(?:\.\d+)?)$")
KNOB_NAMES = {"e": "max_error", "r": "target_ratio", "g": "group_size"}
BASELINE_MARK = "(baseline)"  # ends a baseline codec's method (benchmarks/baselines.py): tables and plots mark it
BENCHMARK_KNOBS = ("calibration_windows",)  # settings a line records that make it another point, not another seed
FAMILY_KNOBS = {("tsvd", ""): "tolerance", ("hyper", "e"): "loss_max"}  # knobs that differ from the above


def benchmark_ids(record: dict, source: str) -> dict[str, Any]:
    """Id columns of one benchmark JSON line (``benchmarks/whole_file.py``): the codec family is the method, its
    knob the budget (or an override such as ``max_error=0.05``), the storage policy part of the method."""
    codec = str(record.get("codec", record.get("layer", "")))
    match = CODEC_KNOB.match(codec)
    family, budget, overrides = codec, None, ""
    if match:
        family, kind = match["family"], match["kind"]
        knob = FAMILY_KNOBS.get((family, kind)) or KNOB_NAMES.get(kind)
        if knob:
            overrides = f"{knob}={match['value']}"
        else:
            budget = float(match["value"])
    overrides = " ".join([overrides] * bool(overrides) + [f"{key}={record[key]}" for key in BENCHMARK_KNOBS
                                                          if key in record])
    storage = record.get("storage")
    if family == "none" and storage in (None, "fp16"):  # no layer replaced, plain fp16: the dense baseline
        family, storage = "dense", None
    method = f"{family} ({storage})" if storage else family
    return {"model": record.get("model"), "method": f"{method} {BASELINE_MARK}" if record.get("baseline") else method,
            "budget": budget, "experiment": source, "mode": "benchmark", "overrides": overrides, "seed": None}


def read_benchmark_lines(path: Path) -> list[dict[str, Any]]:
    """Tidy rows of a benchmark's JSON-lines file: one row per line, every number of the line a column."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not a JSON line ({err.msg}); give a benchmark's .jsonl output")
        numbers = {k: v for k, v in record.items() if _is_number(v) and k not in ID_COLUMNS}
        rows.append({**benchmark_ids(record, path.stem), "status": "ok", "detail": "",
                     "run_dir": f"{path}:{number}", **numbers})
    return rows


def load_rows(roots: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Tidy rows of every run under ``roots`` (each a sweep, a multirun job or a single run folder), or of every
    line of a benchmark's ``.jsonl`` file."""
    rows = []
    for root in map(Path, roots):
        if root.is_file() and root.suffix == ".jsonl":
            rows += read_benchmark_lines(root)
            continue
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory or a .jsonl file; give a run or sweep folder "
                             "(e.g. logs/train/multirun/<date>) or a benchmark's JSON lines")
        rows += [read_run(run_dir) for run_dir in find_run_dirs(root)]
    return rows


def number_columns(rows: list[dict]) -> list[str]:
    """Numeric columns any row has: parameter counts, MACs and sizes first, then the rest alphabetically."""
    present = {k for row in rows for k in row if k not in ID_COLUMNS}
    first = [c for c in ("params_total", "params_dense", "replaced_params_before", "replaced_params_after",
                         "macs_per_sample", "executed_flops_per_sample", "bytes_on_disk", "ratio_vs_fp32",
                         "ratio_vs_fp16") if c in present]
    return first + sorted(present - set(first))


# ---------------------------------------------------------------- tidy CSV

def write_csv(rows: list[dict], path: Path) -> None:
    """The tidy CSV: id columns, then every number column (blank where a run lacks it)."""
    columns = list(ID_COLUMNS) + number_columns(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _parse_cell(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in TEXT_COLUMNS:
        return text
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text  # e.g. a per-layer budget plan in the budget column


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a tidy CSV written by :func:`write_csv`, numbers as numbers and blanks as absent."""
    with open(path, newline="") as f:
        return [{k: v for k, v in ((c, _parse_cell(c, t)) for c, t in row.items()) if v is not None}
                for row in csv.DictReader(f)]


# ---------------------------------------------------------------- grouping seeds

def group_rows(rows: list[dict], by: Iterable[str]) -> list[tuple[dict, list[dict]]]:
    """Rows sharing the values of ``by``, in first-seen order: ``[(key values, rows), ...]``."""
    by = tuple(by)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(json.dumps(row.get(k), sort_keys=True) for k in by), []).append(row)
    return [({k: members[0].get(k) for k in by}, members) for members in groups.values()]


def summarise(values: list[float], spread: str) -> dict[str, float | None]:
    """``mean``, ``n`` and the spread: sample standard deviation (``std``, n - 1) or ``min``/``max`` (``range``)."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    if not values:
        return {"mean": None, "n": 0, "std": None, "min": None, "max": None}
    out = {"mean": statistics.fmean(values), "n": len(values), "min": min(values), "max": max(values)}
    out["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def group_status(members: list[dict]) -> str:
    """``ok`` when every run finished, else the counts, e.g. ``1 ok, 1 failed (seed 1)``."""
    counts: dict[str, list] = {}
    for row in members:
        counts.setdefault(row["status"], []).append(row.get("seed"))
    if set(counts) == {"ok"}:
        return "ok"
    parts = []
    for status in ("ok", "failed", "unfinished"):
        seeds = counts.get(status)
        if seeds:
            named = "" if status == "ok" else " (seed " + ", ".join(str(s) for s in seeds) + ")"
            parts.append(f"{len(seeds)} {status}{named}")
    return ", ".join(parts)


def grouped(rows: list[dict], by: Iterable[str], columns: list[str], spread: str) -> list[dict]:
    """One record per group: its key values, ``n`` (finished runs), ``status`` and per column the summary
    over the finished runs (costs of unfinished runs, e.g. MACs from flops.json, when none finished)."""
    records = []
    for key, members in group_rows(rows, by):
        done = [r for r in members if r["status"] == "ok"] or members
        stats = {c: summarise([r[c] for r in done if c in r], spread) for c in columns}
        records.append({**key, "n": sum(r["status"] == "ok" for r in members), "runs": len(members),
                        "status": group_status(members), "stats": stats})
    return records


# ---------------------------------------------------------------- Markdown

def fmt(value: float | None, digits: int = 4) -> str:
    """A number in ``digits`` significant digits, large ones with k / M / G."""
    if value is None:
        return ""
    for threshold, scale, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / scale:.{digits}g}{suffix}"
    return str(int(value)) if float(value).is_integer() else f"{value:.{digits}g}"


def cell(stats: dict, spread: str) -> str:
    """``mean ± std`` (std in 2 significant digits) or ``mean (min..max)``; a plain value when the runs agree
    or there is one."""
    if stats["n"] == 0:
        return ""
    if stats["n"] == 1 or stats["min"] == stats["max"]:
        return fmt(stats["mean"])
    if spread == "std":
        return f"{fmt(stats['mean'])} ± {fmt(stats['std'], digits=2)}"
    return f"{fmt(stats['mean'])} ({fmt(stats['min'])}..{fmt(stats['max'])})"


def default_columns(rows: list[dict]) -> list[str]:
    """Quality metrics (test/acc first, then other test/* except losses; baseline/... for compress runs),
    then the costs: parameters, MACs, bytes on disk, ratio to fp16, wall time."""
    present = set(number_columns(rows))
    tests = sorted(c for c in present if c.startswith("test/") and "loss" not in c and c not in QUALITY_FIRST)
    quality = [c for c in (*QUALITY_FIRST, *tests) if c in present]
    return quality + [f"baseline/{c}" for c in quality if f"baseline/{c}" in present] \
        + [c for c in COST_COLUMNS if c in present]


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def markdown(rows: list[dict], by: Iterable[str], columns: list[str], spread: str) -> str:
    """The grouped table; id columns (but model and method) with one value for every row become a line above
    it, the spread is said below it, and every run that did not finish is listed after it."""
    if not rows:
        return ""
    by = list(by)
    records = grouped(rows, by, columns, spread)
    constant = [k for k in by if k not in ALWAYS_SHOWN and len({json.dumps(r[k]) for r in records}) == 1]
    shown = [k for k in by if k not in constant]
    lines = []
    fixed = ", ".join(f"{k}={records[0][k]}" for k in constant if records[0][k] not in (None, ""))
    if fixed:
        lines += [f"All rows: {fixed}", ""]
    body = [[str(r[k]) if r[k] not in (None, "") else "" for k in shown] + [str(r["n"]), r["status"]]
            + [cell(r["stats"][c], spread) for c in columns] for r in records]
    lines += _table(shown + ["n", "status"] + columns, body)
    what = "sample standard deviation (n - 1)" if spread == "std" else "min..max"
    lines += ["", f"Cells: mean over the n finished runs of a row (seeds) ± {what}; one value when they agree."
              if spread == "std" else
              f"Cells: mean over the n finished runs of a row (seeds), ({what}) when they differ."]
    if any(r["n"] == 0 for r in records):
        lines.append("Rows with n = 0 show the costs (from flops.json) of runs that did not finish.")
    missing = [r for r in rows if r["status"] != "ok"]
    if missing:
        lines += ["", f"Runs without metrics.json ({len(missing)}):", ""]
        lines += _table(["run_dir", "status", "detail"], [[r["run_dir"], r["status"], r["detail"]] for r in missing])
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def check_ids(option: str, keys: Iterable[str]) -> None:
    """``ValueError`` naming ``option`` when one of ``keys`` is not an id column."""
    unknown = [k for k in keys if k not in ID_COLUMNS]
    if unknown:
        raise ValueError(f"{option} {' '.join(unknown)}: not an id column; choose from {' '.join(ID_COLUMNS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="+", type=Path,
                        help="sweep or run folders (searched recursively), or benchmark .jsonl files")
    parser.add_argument("--csv", type=Path, default=None,
                        help="tidy CSV, one run a row (default: <first dir>/results.csv)")
    parser.add_argument("--json", type=Path, default=None, help="also write the tidy rows as a JSON list here")
    parser.add_argument("--metrics", "--columns", dest="columns", nargs="+", default=None,
                        help="numeric columns of the Markdown table (default: quality metrics, then costs)")
    parser.add_argument("--group-by", nargs="+", default=list(DEFAULT_GROUP_BY),
                        help=f"id columns whose runs pool into one row (default: {' '.join(DEFAULT_GROUP_BY)})")
    parser.add_argument("--spread", choices=SPREADS, default="std",
                        help="spread over seeds: sample standard deviation or min..max")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rows = load_rows(args.sweep_dirs)
    except ValueError as err:
        parser.error(str(err))
    if not rows:
        parser.error(f"no run under {' '.join(map(str, args.sweep_dirs))}: a run folder holds metrics.json or .hydra/")
    try:
        check_ids("--group-by", args.group_by)
    except ValueError as err:
        parser.error(str(err))
    available = number_columns(rows)
    columns = args.columns or default_columns(rows)
    absent = [c for c in columns if c not in available]
    if absent:
        parser.error(f"--metrics {' '.join(absent)}: no run has it; columns present: {' '.join(available)}")
    print(markdown(rows, args.group_by, columns, args.spread))
    first = args.sweep_dirs[0]
    csv_path = args.csv or (first.with_suffix(".csv") if first.is_file() else first / "results.csv")
    write_csv(rows, csv_path)
    log.info("\nCSV (%d runs) written to %s", len(rows), csv_path)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        log.info("JSON written to %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
