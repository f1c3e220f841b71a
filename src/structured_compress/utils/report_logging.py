"""The compression report (parameters, MACs, bytes, one row per replaced layer) sent to every experiment logger,
not only to metrics.json: totals as metrics, the per-layer table in the form each logger displays."""
from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from ..surgery import CompressionReport, LayerReport

log = logging.getLogger(__name__)

PREFIX = "compression"
COLUMNS = tuple(f.name for f in fields(LayerReport) if f.name != "options")
CSV_NAME = "compression_layers.csv"


def report_totals(report: CompressionReport, sizes: dict | None = None) -> dict[str, float]:
    """``compression/<key>`` for the report's totals and the numeric entries of ``sizes`` (bytes, ratios)."""
    numbers = {**report.summary(), **(sizes or {})}
    return {f"{PREFIX}/{k}": float(v) for k, v in numbers.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def layer_rows(report: CompressionReport) -> list[list]:
    """One row per replaced layer, in ``COLUMNS`` order."""
    return [[asdict(layer)[c] for c in COLUMNS] for layer in report.layers]


def _log_layers(logger: Logger, report: CompressionReport) -> None:
    """The per-layer table as the logger shows it best: a W&B table, TensorBoard text, a CSV file next to the
    CSV logger's metrics.csv; other loggers get one metric per layer and column."""
    rows = layer_rows(report)
    if isinstance(logger, WandbLogger):
        logger.log_table(key=f"{PREFIX}/layers", columns=list(COLUMNS), data=rows)
    elif isinstance(logger, TensorBoardLogger):
        text = "\n".join("    " + line for line in report.format_table().splitlines())  # markdown code block
        logger.experiment.add_text(f"{PREFIX}/layers", text, global_step=0)
    elif isinstance(logger, CSVLogger):
        path = Path(logger.log_dir) / CSV_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows([COLUMNS, *rows])
    else:
        numeric = [c for c in COLUMNS if c not in ("name", "kind", "layer_type")]
        logger.log_metrics({f"{PREFIX}/layers/{row[0]}/{c}": float(row[COLUMNS.index(c)])
                            for row in rows for c in numeric}, step=0)


@rank_zero_only
def log_report(loggers: Sequence[Logger], report: CompressionReport, sizes: dict | None = None) -> None:
    """Send ``report`` (and ``sizes``, e.g. ``bytes_on_disk`` from compress mode) to every logger in ``loggers``."""
    totals = report_totals(report, sizes)
    for logger in loggers:
        logger.log_metrics(totals, step=0)
        _log_layers(logger, report)
        logger.save()
    if loggers:
        log.info("compression report sent to %s", ", ".join(type(lg).__name__ for lg in loggers))
