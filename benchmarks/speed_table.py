"""Markdown tables from the JSON lines of ``layer_speed.py`` / ``model_speed.py`` (one table per shape/budget
or per model: rows = layer types, columns = modes, cells = ratio to dense time, or speed-up for models).

    python benchmarks/speed_table.py benchmarks/results/layer_speed_cpu.jsonl [more.jsonl ...]
    python benchmarks/speed_table.py --by-budget sweep.jsonl   # one table per budget: shapes as columns
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load_rows(paths: list[str]) -> list[dict]:
    """Result lines of every file (``meta`` and error lines left out), each tagged with its file, date and
    load average (``source``)."""
    rows = []
    for path in paths:
        with open(path) as lines:
            parsed = [json.loads(line) for line in lines]
        meta = next((row["meta"] for row in parsed if "meta" in row), {})
        load = meta.get("load_avg_1_5_15")
        source = f"{path}, {meta.get('date', 'undated')}" + (f", load {load[0]:.1f}" if load else "")
        rows += [{**row, "source": source} for row in parsed if "meta" not in row and "error" not in row]
    return rows


def tables(rows: list[dict]) -> str:
    """One markdown table per (shape, budget, dtype) of layer rows and per model of model rows."""
    groups: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if "model" in row:
            title, cell = f"{row['model']} (speed-up over dense, higher is better)", f"{row['speedup']:.2f}"
        else:
            title = f"{row['shape']} {row['in']}->{row['out']}, budget {row['budget']}, {row['dtype']} " \
                    f"(time / nn.Linear, lower is better)"
            cell = f"{row['ratio']:.2f}" + (f" (graph {row['graph_ratio']:.2f})" if row.get("graph_ratio") else "")
        groups[f"{title}<br>{row['source']}"][row["layer"]][row["mode"]] = cell
    out = []
    for title, by_layer in groups.items():
        modes = list(dict.fromkeys(mode for cells in by_layer.values() for mode in cells))
        out += [f"**{title}**", "", "| layer | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
        out += [f"| {layer} | " + " | ".join(cells.get(mode, "") for mode in modes) + " |"
                for layer, cells in by_layer.items()]
        out.append("")
    return "\n".join(out)


def budget_tables(rows: list[dict]) -> str:
    """One markdown table per (budget, dtype) of layer rows: rows = layer types, columns = shapes, cells =
    the ratios to ``nn.Linear`` of every mode measured, joined by ``/`` (e.g. inference / forward / fwd+bwd)."""
    groups: dict[str, dict] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for row in rows:
        if "model" not in row and row["layer"] != "nn.Linear":
            title = f"budget {row['budget']}, {row['dtype']}<br>{row['source']}"
            groups[title][row["layer"]][row["shape"]][row["mode"]] = f"{row['ratio']:.2f}"
    out = []
    for title, by_layer in groups.items():
        shapes = list(dict.fromkeys(shape for cells in by_layer.values() for shape in cells))
        modes = list(dict.fromkeys(mode for cells in by_layer.values() for per in cells.values() for mode in per))
        out += [f"**{title}** (time / nn.Linear, {' / '.join(modes)}; lower is better)", "",
                "| layer | " + " | ".join(shapes) + " |", "|---" * (len(shapes) + 1) + "|"]
        out += [f"| {layer} | " + " | ".join(" / ".join(cells.get(shape, {}).get(mode, "-") for mode in modes)
                                             for shape in shapes) + " |" for layer, cells in by_layer.items()]
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--by-budget", action="store_true", help="layer rows: one table per budget, shapes as columns")
    args = parser.parse_args()
    rows = load_rows(args.files)
    print(budget_tables(rows) if args.by_budget else tables(rows))


if __name__ == "__main__":
    main()
