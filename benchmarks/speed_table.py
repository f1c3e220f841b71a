"""Markdown tables from the JSON lines of ``layer_speed.py`` / ``model_speed.py`` (one table per shape/budget
or per model: rows = layer types, columns = modes, cells = ratio to dense time, or speed-up for models).

    python benchmarks/speed_table.py benchmarks/results/layer_speed_cpu.jsonl [more.jsonl ...]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    print(tables(load_rows(parser.parse_args().files)))


if __name__ == "__main__":
    main()
