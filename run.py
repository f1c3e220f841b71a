"""Entry point: ``python run.py experiment=<group>/<name> [overrides]`` (Hydra; ``-m`` for sweeps)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger(__name__)
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # the checkout's package, installed or not


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Check the config, then run it; a bad input ends the process with status 2 and one line
    ``error: <message>`` on stderr (``HYDRA_FULL_ERROR=1`` shows the full traceback instead)."""
    from structured_compress.config_checks import check_config  # torch-free: answers in about a second
    from structured_compress.utils.logs import record_failure

    try:
        check_config(cfg)
        return dispatch(cfg)
    except (ValueError, FileNotFoundError) as err:  # ConfigError, NonFiniteError; DatasetNotFoundError
        message = f"error: {' '.join(str(err).split())}"
        record_failure(message)  # the run's log says it failed (scripts/make_table.py reads it)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stderr.write(message + "\n")
        sys.exit(2)
    except Exception:
        record_failure("run failed", with_traceback=True)  # Hydra prints it on the terminal
        raise


def dispatch(cfg: DictConfig) -> float | None:
    """Dispatch on ``mode`` (train | eval | compress) and return the metric ``optimized_metric`` for sweepers."""
    from structured_compress.compress import compress  # nested imports: Hydra's --help and tab completion stay fast
    from structured_compress.eval import evaluate
    from structured_compress.train import train

    entry = {"train": train, "eval": evaluate, "compress": compress}.get(cfg.mode.name)
    if entry is None:
        raise ValueError(f"unknown mode={cfg.mode.name!r}; use mode=train, mode=eval or mode=compress")
    metrics, _ = entry(cfg)
    target = cfg.get("optimized_metric")
    if not target:
        return None
    if target not in metrics["metrics"] and cfg.mode.name != "train":  # eval/compress only test: val/x -> test/x
        target = target.replace("val/", "test/", 1)
    if target not in metrics["metrics"]:
        raise ValueError(f"optimized_metric={target!r} is not among this run's metrics "
                         f"{sorted(metrics['metrics'])}; set optimized_metric to one of them")
    return metrics["metrics"][target]


if __name__ == "__main__":
    from structured_compress.utils.run_dir import continue_in_run_dir

    sys.argv[1:] = continue_in_run_dir(sys.argv[1:], Path(os.environ["PROJECT_ROOT"]))
    main()
