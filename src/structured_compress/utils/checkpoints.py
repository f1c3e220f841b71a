"""Reading checkpoint files with errors that name the file and what to do instead of a pickle traceback."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from ..errors import UserInputError


def other_checkpoints(path: Path) -> list[Path]:
    """The other ``*.ckpt`` files beside ``path``, newest first: what to try when ``path`` is broken."""
    siblings = [p for p in path.parent.glob("*.ckpt") if p != path and p.stat().st_size > 0]
    return sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True)


def _what_to_do(path: Path) -> str:
    others = other_checkpoints(path)
    if others:
        return f"use an earlier checkpoint such as {others[0]}"
    return "re-run the training that writes it (no other checkpoint lies beside it)"


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", weights_only: bool = False,
                         mmap: bool = True) -> dict:
    """``torch.load`` a Lightning / torch checkpoint dict; a missing, empty, truncated or foreign file raises
    FileNotFoundError / ValueError naming the file and an alternative."""
    path = Path(path).expanduser()
    if not path.is_file():
        kind = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {path} {kind}; give the path of a .ckpt file written by a training run")
    if path.stat().st_size == 0:
        raise UserInputError(f"checkpoint {path} is empty (0 bytes, e.g. a run killed while writing it); "
                             f"{_what_to_do(path)}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only,
                                mmap=mmap and zipfile.is_zipfile(path))  # mmap reads zip saves only
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, AttributeError, ImportError) as err:
        reason = " ".join(str(err).split())[:200]
        raise UserInputError(f"checkpoint {path} cannot be read ({type(err).__name__}: {reason}): it is truncated, "
                             f"corrupt or not a torch.save file; {_what_to_do(path)}") from err
    if not isinstance(checkpoint, dict):
        raise UserInputError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict; "
                             "give a .ckpt written by a training run")
    return checkpoint
