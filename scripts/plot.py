"""Plots from sweeps and checkpoints (PNG and SVG, matplotlib's Agg backend: no display needed).

    python scripts/plot.py pareto logs/sweeps/offline/fmnist_vit --out plots/          # quality vs costs
    python scripts/plot.py pareto --csv results.csv --metric test/acc --x macs_per_sample --logx
    python scripts/plot.py gaudi-structure logs/.../checkpoints/last.ckpt --out plots/gaudi   # or a compressed/ folder

``pareto``: one line per model x method (x experiment: ids but the budget and extra overrides), points sorted by cost,
each the mean over seeds with the spread as error bar; the dense rows are a star and a dashed line, baseline
codecs (method ending in "(baseline)") hollow markers on dashed lines. Runs are read
as ``scripts/make_table.py`` reads them (its tidy CSV works too); runs that did not finish are left out and listed.
``gaudi-structure``: per Gaudi-GBLR layer, how many components cover each weight entry (the learned row and column
intervals of every component, overlaid), one panel per layer.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python scripts/plot.py`: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from scripts.make_table import BASELINE_MARK, DEFAULT_GROUP_BY, QUALITY_FIRST, SPREADS, check_ids, grouped, load_rows, \
    number_columns, read_csv  # noqa: E402

log = logging.getLogger("plot")

X_AXES = {  # tidy column -> (axis label with unit, divisor)
    "macs_per_sample": ("MACs per sample (millions)", 1e6),
    "params_total": ("parameters (thousands)", 1e3),
    "bytes_on_disk": ("bytes on disk (MB)", 1e6),
}
LOWER_IS_BETTER = ("loss", "perplexity", "error")
ALONG = ("budget", "overrides")  # ids that vary along one line: a method's trade-off over its settings
DENSE_METHOD = "dense"
FORMATS = ("png", "svg")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


# ---------------------------------------------------------------- Pareto plots

@dataclass
class Series:
    """One line: its label, and per point the mean cost, mean quality, the quality's error bar and n."""
    label: str
    dense: bool
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    yerr: list[tuple[float, float]] = field(default_factory=list)  # (below, above) the mean
    n: list[int] = field(default_factory=list)


def default_metric(rows: list[dict]) -> str:
    """The quality metric to plot: test/acc, test/acc_top5, test/perplexity, else the first other test/*."""
    present = number_columns(rows)
    tests = [c for c in present if c.startswith("test/") and "loss" not in c]
    for name in (*QUALITY_FIRST, *tests):
        if name in present:
            return name
    raise ValueError(f"no test/* quality metric in these runs (columns: {' '.join(present)}); pass --metric")


def _error_bar(stats: dict, spread: str) -> tuple[float, float]:
    if spread == "std":
        return stats["std"], stats["std"]
    return stats["mean"] - stats["min"], stats["max"] - stats["mean"]


def pareto_series(rows: list[dict], metric: str, x: str, group_by=DEFAULT_GROUP_BY, spread: str = "std",
                  along=ALONG) -> list[Series]:
    """Lines of ``metric`` against ``x`` over the finished runs: points are make_table's rows (``group_by``),
    a line joins the points that differ only in the ids ``along`` (budget, extra overrides), sorted by ``x``."""
    usable = [r["status"] == "ok" and metric in r and x in r for r in rows]
    finished = [r for r, ok in zip(rows, usable) if ok]
    skipped = [r["run_dir"] for r, ok in zip(rows, usable) if not ok]
    if skipped:
        log.info("left out %d runs without %s and %s (unfinished or failed): %s", len(skipped), metric, x,
                 " ".join(skipped))
    lines: dict[tuple, Series] = {}
    for record in grouped(finished, group_by, [metric, x], spread):
        ids = tuple((k, record[k]) for k in group_by if k not in along)
        if ids not in lines:
            label = " / ".join(str(v) for k, v in ids if v not in (None, "") and k != "mode")
            lines[ids] = Series(label, record.get("method") == DENSE_METHOD)
        series, ys, xs = lines[ids], record["stats"][metric], record["stats"][x]
        series.x.append(xs["mean"])
        series.y.append(ys["mean"])
        series.yerr.append(_error_bar(ys, spread))
        series.n.append(record["n"])
    for series in lines.values():
        order = sorted(range(len(series.x)), key=series.x.__getitem__)
        for name in ("x", "y", "yerr", "n"):
            setattr(series, name, [getattr(series, name)[i] for i in order])
    return list(lines.values())


def legend_labels(series: list[Series]) -> tuple[list[str], str]:
    """Legend labels without the words every label shares (e.g. the model), and those words for the title."""
    parts = [s.label.split(" / ") for s in series]
    common = set.intersection(*map(set, parts)) if len(parts) > 1 else set()
    labels = [" / ".join(w for w in words if w not in common) or s.label for s, words in zip(series, parts)]
    return labels, " / ".join(w for w in parts[0] if w in common) if parts else ""


def save_figure(fig, out_stem: Path) -> list[Path]:
    """Write ``fig`` as ``out_stem``.png and .svg (parents made), close it and return the files."""
    fig.tight_layout()
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    files = [out_stem.with_suffix(f".{ext}") for ext in FORMATS]
    for file in files:
        fig.savefig(file, dpi=150)
    plt.close(fig)
    return files


def plot_pareto(series: list[Series], metric: str, x: str, out_stem: Path, logx: bool = False,
                spread: str = "std", ymin: float | None = None, ymax: float | None = None) -> list[Path]:
    """Draw the lines (dense: star + dashed line) and write ``out_stem``.png/.svg; returns the files."""
    label, scale = X_AXES.get(x, (x, 1.0))
    labels, shared = legend_labels(series)
    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    colors = plt.get_cmap("tab20" if len(series) > 10 else "tab10").colors
    for i, (s, legend) in enumerate(zip(series, labels)):
        xs = np.asarray(s.x) / scale
        yerr = np.asarray(s.yerr).T
        if s.dense:
            ax.axhline(float(np.mean(s.y)), color="black", linestyle="--", linewidth=0.8)
            ax.errorbar(xs, s.y, yerr=yerr, fmt="*", markersize=14, color="black", capsize=3, label=legend)
        else:  # colour and marker both vary, so lines stay apart in grey print and past ten series
            hollow = BASELINE_MARK in s.label
            ax.errorbar(xs, s.y, yerr=yerr, marker=MARKERS[i % len(MARKERS)], color=colors[i % len(colors)],
                        capsize=3, label=legend, linestyle="--" if hollow else "-",
                        markerfacecolor="none" if hollow else colors[i % len(colors)])
    if logx:
        ax.set_xscale("log")
    if ymin is not None or ymax is not None:
        ax.set_ylim(bottom=ymin, top=ymax)
    better = "lower is better" if any(word in metric for word in LOWER_IS_BETTER) else "higher is better"
    ax.set_xlabel(label)
    ax.set_ylabel(f"{metric} ({better})")
    ax.set_title(f"{metric} vs {label.split(' (')[0]}" + (f"\n{shared}" if shared else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title=f"mean over seeds, bars: {'std' if spread == 'std' else 'min..max'}",
              title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the data
    return save_figure(fig, out_stem)


def pareto_main(args: argparse.Namespace) -> list[Path]:
    check_ids("--group-by", args.group_by)
    check_ids("--along", args.along)
    rows = read_csv(args.csv) if args.csv else load_rows(args.dirs)
    if not rows:
        raise ValueError("no runs found: give sweep folders or --csv results.csv")
    metric = args.metric or default_metric(rows)
    present = set(number_columns(rows))
    if metric not in present:
        raise ValueError(f"--metric {metric}: no run has it; columns present: {' '.join(sorted(present))}")
    written = []
    for x in args.x:
        if x not in present:
            log.info("skipped %s: no run has it%s", x,
                     " (mode=compress runs write it)" if x == "bytes_on_disk" else "")
            continue
        series = pareto_series(rows, metric, x, args.group_by, args.spread, args.along)
        if not series:
            raise ValueError(f"no finished run has both {metric} and {x}")
        stem = args.out / f"pareto_{metric.replace('/', '_')}_vs_{x}"
        written += plot_pareto(series, metric, x, stem, args.logx, args.spread, args.ymin, args.ymax)
    return written


# ---------------------------------------------------------------- Gaudi-GBLR structure

def gaudi_layers(path: str | Path) -> dict[str, Any]:
    """The Gaudi-GBLR layers (name -> ``GaudiGBLRLinear`` with its learned widths and locations) of a training
    checkpoint (its ``structure`` record rebuilds them) or a ``save_compressed`` folder."""
    from structured_compress.io import load_compressed  # deferred: the Pareto plots need no torch
    from structured_compress.io.structure import build_layer_from_entry
    from structured_compress.layers.gaudi import GaudiGBLRLinear
    from structured_compress.pipeline import STRUCTURE_KEY, read_checkpoint

    path = Path(path)
    if path.is_dir():
        model = load_compressed(path)
        return {name: m for name, m in model.named_modules() if isinstance(m, GaudiGBLRLinear)}
    checkpoint = read_checkpoint(path)
    record = checkpoint.get(STRUCTURE_KEY)
    if record is None:
        raise ValueError(f"checkpoint {path} has no structure record: give a checkpoint written by mode=train")
    layers = {}
    for entry in record["layers"]:
        if entry["type"] != "gaudi":
            continue
        module = build_layer_from_entry(entry)
        prefix = f"model.{entry['name']}."
        module.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
                                if k.startswith(prefix)})
        layers[entry["name"]] = module.linear if entry.get("conv") else module
    return layers


def component_count(layer) -> np.ndarray:
    """``[out, in]`` map of how many components' row x column intervals cover each weight entry, from the
    eval-mode masks the layer computes with (entries below the mask threshold are outside)."""
    import torch

    from structured_compress.layers.gaudi import MASK_THRESHOLD

    was_training = layer.training
    layer.eval()
    with torch.no_grad():
        mask_in, mask_out = (m.abs() > MASK_THRESHOLD for m in layer.component_masks())
    layer.train(was_training)
    block = layer.axis_sizes[0]
    rows = np.zeros((layer.num_components, layer.in_features))
    for k in range(layer.num_components):  # segment s's components read columns [s block, (s + 1) block)
        start = (k // layer.components_per_segment) * block
        rows[k, start:start + block] = mask_in[k].numpy()
    return mask_out.double().numpy().T @ rows


def plot_gaudi_structure(counts: dict[str, np.ndarray], out_stem: Path, title: str) -> list[Path]:
    """One heat map per layer (component count per entry), in a grid; writes ``out_stem``.png/.svg."""
    if not counts:
        raise ValueError("no Gaudi-GBLR layer to draw (layer type 'gaudi'): give a checkpoint or compressed folder "
                         "of a run with layer=gaudi")
    cols = min(4, len(counts))
    rows = math.ceil(len(counts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, count) in zip(axes.flat, counts.items()):
        image = ax.imshow(count, cmap="viridis", interpolation="nearest", aspect="auto", vmin=0)
        ax.set_title(f"{name}\n{count.shape[0]}x{count.shape[1]}, support {np.mean(count > 0):.0%}", fontsize=8)
        ax.set_xlabel("input index", fontsize=7)
        ax.set_ylabel("output index", fontsize=7)
        ax.tick_params(labelsize=6)
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # component counts are whole numbers
        bar.ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(counts):]:
        ax.axis("off")
    fig.suptitle(f"{title}: components covering each weight entry", fontsize=10)
    return save_figure(fig, out_stem)


def gaudi_main(args: argparse.Namespace) -> list[Path]:
    counts = {name: component_count(layer) for name, layer in gaudi_layers(args.path).items()}
    for name, count in counts.items():
        log.info("%s: %dx%d, support %.1f%%, at most %d components on an entry", name, *count.shape,
                 100 * np.mean(count > 0), count.max())
    return plot_gaudi_structure(counts, args.out, args.path.name)


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    pareto = commands.add_parser("pareto", help="quality vs MACs / parameters / bytes on disk")
    pareto.add_argument("dirs", nargs="*", type=Path, help="sweep or run folders (as for make_table.py)")
    pareto.add_argument("--csv", type=Path, help="a tidy CSV from make_table.py instead of folders")
    pareto.add_argument("--metric", help="quality column (default: test/acc, else test/perplexity, else a test/*)")
    pareto.add_argument("--x", nargs="+", default=list(X_AXES), help=f"cost columns (default: {' '.join(X_AXES)})")
    pareto.add_argument("--group-by", nargs="+", default=list(DEFAULT_GROUP_BY), help="as make_table.py's")
    pareto.add_argument("--along", nargs="*", default=list(ALONG),
                        help=f"ids that vary along one line (default: {' '.join(ALONG)})")
    pareto.add_argument("--spread", choices=SPREADS, default="std", help="error bars: std or min..max")
    pareto.add_argument("--logx", action="store_true", help="logarithmic cost axis")
    pareto.add_argument("--ymin", type=float, default=None,
                        help="lower end of the quality axis (points below it are cut off, e.g. a collapsed codec)")
    pareto.add_argument("--ymax", type=float, default=None,
                        help="upper end of the quality axis (e.g. cut off a collapsed codec's perplexity)")
    pareto.add_argument("--out", type=Path, default=Path("plots"), help="output folder (default: plots)")
    gaudi = commands.add_parser("gaudi-structure", help="learned Gaudi-GBLR intervals per layer")
    gaudi.add_argument("path", type=Path, help="a training checkpoint (.ckpt) or a save_compressed folder")
    gaudi.add_argument("--out", type=Path, default=Path("plots/gaudi_structure"),
                       help="output path without suffix (default: plots/gaudi_structure)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "pareto" and not (args.dirs or args.csv):
        parser.error("pareto needs sweep folders or --csv")
    try:
        files = pareto_main(args) if args.command == "pareto" else gaudi_main(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    for file in files:
        log.info("wrote %s", file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
