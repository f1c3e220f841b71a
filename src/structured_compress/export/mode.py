"""``export(cfg)``: ``mode=export`` -- a compressed folder (``ckpt_path``) written in another format into the run
folder, with the export report; no data, no trainer, no test."""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..typed_config import OptionError
from ..utils.files import atomic_write_text
from ..utils.run_helpers import write_metrics_json
from .config import ExportConfig

REPORT_FILE = "export_report.json"


def export(cfg: DictConfig) -> tuple[dict, dict]:
    """Write ``<run dir>/<export.out>.gguf`` and ``export_report.json`` from ``cfg.ckpt_path``; returns
    ``(metrics, objects)`` like the other modes (metrics.json holds the totals and the file's size)."""
    from .gguf import export_gguf

    started = time.perf_counter()
    try:
        options = ExportConfig.from_config(OmegaConf.to_container(cfg.get("export"), resolve=True))
    except OptionError as err:
        raise ConfigError(err.with_prefix("export.")) from None
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path=null: mode=export reads a compressed folder but none was given; add "
                          "ckpt_path=<run dir>/compressed (written by mode=compress)")
    out_dir = Path(cfg.paths.output_dir)
    path = out_dir / f"{options.out}.{options.format}"
    report = export_gguf(Path(str(cfg.ckpt_path)).expanduser(), path, type=options.type,
                         tokenizer=options.tokenizer)
    atomic_write_text(out_dir / REPORT_FILE, json.dumps(report, indent=2))
    metrics = {"output_dir": str(out_dir.resolve()),
               "exported_from": str(cfg.ckpt_path), "exported_file": str(path), "exported_bytes": report["bytes"],
               "export": report["total"], "metrics": {}, "wall_time_s": round(time.perf_counter() - started, 2)}
    write_metrics_json(out_dir / "metrics.json", metrics)
    return metrics, {"cfg": cfg, "report": report}
