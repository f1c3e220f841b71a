"""Resuming in place: a run continued from a checkpoint writes into the folder that checkpoint belongs to.

``run.py`` rewrites its command line before Hydra creates an output folder: with ``ckpt_path=<run>/checkpoints/
x.ckpt`` (train mode) the run folder is ``<run>``; with ``resume=auto`` it is the newest unfinished run (no
metrics.json, but checkpoints or the shards of a block-by-block compression) whose recorded overrides equal
this command's. An explicit ``hydra.run.dir=`` always wins.
No torch import: it runs before every command.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

IGNORED_KEYS = ("resume", "ckpt_path", "hydra.")


def _override(args: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0].lstrip("+~") == key and "=" in a]
    return values[-1] if values else None


def _comparable(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(IGNORED_KEYS))


def _recorded_overrides(run_dir: Path) -> list[str] | None:
    file = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(file)] if file.is_file() else None


def _has_progress(run_dir: Path) -> bool:
    """Checkpoints (training) or finished blocks' shards (compression) to continue from."""
    return any((run_dir / "checkpoints").glob("*.ckpt")) or any((run_dir / "compressed").glob("compressed-*-of-*"))


def unfinished_run(log_dir: Path, overrides: list[str]) -> Path | None:
    """The newest run folder of any mode (``<log_dir>/<mode>/runs/<time>``) with progress, no metrics.json and
    the same overrides."""
    folders = [p for p in log_dir.glob("*/runs/*") if p.is_dir()]
    wanted = _comparable(overrides)
    for run_dir in sorted(folders, key=lambda p: p.name, reverse=True):
        recorded = _recorded_overrides(run_dir)
        if (recorded is not None and _comparable(recorded) == wanted and not (run_dir / "metrics.json").exists()
                and _has_progress(run_dir)):
            return run_dir
    return None


def continue_in_run_dir(args: list[str], project_root: Path) -> list[str]:
    """``args`` plus ``hydra.run.dir=<folder>`` when this command continues an earlier run (see module doc)."""
    if "-m" in args or "--multirun" in args or any(a.startswith("-") for a in args):
        return args  # sweeps and Hydra's own flags (--help, -c, ...) keep Hydra's folders
    if _override(args, "hydra.run.dir") is not None or _override(args, "mode") not in (None, "train", "compress"):
        return args
    ckpt_path = _override(args, "ckpt_path")
    if ckpt_path not in (None, "", "null"):
        checkpoint = Path(ckpt_path).expanduser().resolve()
        if checkpoint.parent.name == "checkpoints":
            return [*args, f"hydra.run.dir={checkpoint.parent.parent}"]
        return args
    if _override(args, "resume") == "auto":
        log_dir = Path(_override(args, "paths.log_dir") or project_root / "logs")
        previous = unfinished_run(log_dir, args)  # the mode may come from an experiment file
        if previous is not None:
            return [*args, f"hydra.run.dir={previous}"]
    return args
