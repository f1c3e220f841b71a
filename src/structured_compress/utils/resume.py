"""Finding the checkpoint a run resumes from: the newest readable one, skipping torn or corrupt files."""
from __future__ import annotations

import logging
from pathlib import Path
from ..errors import UserInputError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files a killed atomic write leaves (``.<name>.<random>.tmp``); returns them."""
    stale = sorted(Path(directory).glob(".*.tmp")) if Path(directory).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temp file(s) left by an interrupted checkpoint write in %s", len(stale), directory)
    return stale


def is_readable_checkpoint(path: Path, trust: bool = False) -> bool:
    """True when ``path`` opens as a torch checkpoint holding a state dict (memory-mapped: reads little; loaded
    safely unless ``trust``)."""
    from .checkpoints import load_checkpoint_file  # imports torch

    try:
        return "state_dict" in load_checkpoint_file(path, trust=trust)
    except (ValueError, FileNotFoundError):
        return False


def newest_readable(candidates: list[Path], trust: bool = False) -> Path | None:
    """The first readable checkpoint of ``candidates`` (newest first), warning about each one skipped."""
    skipped: list[Path] = []
    for path in candidates:
        if is_readable_checkpoint(path, trust):
            for bad in skipped:
                log.warning("checkpoint %s is truncated or corrupt; resuming from %s instead", bad, path)
            return path
        skipped.append(path)
    for bad in skipped:
        log.warning("checkpoint %s is truncated or corrupt and no earlier checkpoint is readable", bad)
    return None


def checkpoints_newest_first(directory: str | Path) -> list[Path]:
    """Every ``*.ckpt`` in ``directory``, most recently written first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def resume_checkpoint(ckpt_path: str | None, resume: str | bool | None, output_dir: str | Path,
                      trust: bool = False) -> Path | None:
    """The checkpoint training continues from.

    ``ckpt_path`` given: that file, or -- when it is torn or corrupt -- the newest readable checkpoint beside
    it. ``resume=auto``: the newest readable checkpoint in this run's ``checkpoints/`` (none: a fresh start).
    ``trust`` (``trust_checkpoint=true``) reads checkpoints that need classes the safe loader refuses.
    """
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; give <run dir>/checkpoints/last.ckpt "
                                    f"or resume=auto")
        remove_stale_temp_files(path.parent)
        others = [p for p in checkpoints_newest_first(path.parent) if p != path]
        found = newest_readable([path, *others], trust)
        if found is None:
            raise UserInputError(f"ckpt_path={ckpt_path} is truncated or corrupt and no other checkpoint in "
                                 f"{path.parent} is readable; start again without ckpt_path")
        return found
    if str(resume).lower() == "auto":
        directory = Path(output_dir) / CHECKPOINT_DIR
        remove_stale_temp_files(directory)
        found = newest_readable(checkpoints_newest_first(directory), trust)
        log.info("resume=auto: %s", f"continuing from {found}" if found else f"no checkpoint in {directory}, "
                                                                               "starting fresh")
        return found
    if resume not in (None, False, "", "none", "null"):
        raise UserInputError(f"resume={resume!r} is not understood; use resume=auto or ckpt_path=<checkpoint>")
    return None
