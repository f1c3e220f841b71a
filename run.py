"""Entry point: ``python run.py experiment=<group>/<name> [overrides]`` (Hydra; ``-m`` for sweeps)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # the checkout's package, installed or not


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Check the config, then run it. Bad input -- a config error, or data or weights that are not on this
    machine -- ends the process with status 2 and one line ``error: <message>`` on stderr
    (``HYDRA_FULL_ERROR=1`` shows the traceback instead); a run stopped by SIGTERM / SIGUSR1 after writing its
    checkpoint ends with status 143 / 138 and one line ``preempted: <message>``; any other error keeps its
    traceback, on the terminal and in the run's log, and a non-zero status (docs/errors.md)."""
    from structured_compress.config_checks import check_config  # torch-free: answers in about a second
    from structured_compress.datamodules.common import DatasetNotFoundError
    from structured_compress.errors import UserInputError
    from structured_compress.sources import ModelSourceNotFoundError
    from structured_compress.utils.logs import record_failure

    try:
        check_config(cfg)
        return dispatch(cfg)
    except (UserInputError, DatasetNotFoundError, ModelSourceNotFoundError) as err:
        message = f"error: {' '.join(str(err).split())}"
        record_failure(message)  # the run's log says it failed (scripts/make_table.py reads it)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stderr.write(message + "\n")
        sys.exit(2)
    except Exception as err:
        exit_status = getattr(err, "exit_status", None)  # Preempted (callbacks/preemption.py): checkpoint written
        if exit_status is not None:
            message = f"preempted: {err}"
            record_failure(message)
            sys.stderr.write(message + "\n")
            sys.exit(exit_status)  # 143 on SIGTERM, 138 on SIGUSR1 (README "Scaling out")
        record_failure("run failed", with_traceback=True)  # Hydra prints it on the terminal
        raise


def dispatch(cfg: DictConfig) -> float | None:
    """Run ``mode`` (train | eval | compress | export) and return ``optimized_metric`` for sweepers."""
    from structured_compress.modes import run_mode  # nested imports: Hydra's --help and tab completion stay fast
    from structured_compress.runner import optimized_value

    metrics, _ = run_mode(cfg)
    return optimized_value(cfg, metrics)


if __name__ == "__main__":
    from structured_compress.utils.run_dir import continue_in_run_dir

    sys.argv[1:] = continue_in_run_dir(sys.argv[1:], Path(os.environ["PROJECT_ROOT"]))
    main()
