"""Reading checkpoint files safely, with errors that name the file and what to do instead of a pickle traceback.

A checkpoint is a pickle, and unpickling can run any code the file names. Every load here therefore uses
``torch.load(weights_only=True)`` with :data:`SAFE_GLOBALS`, exactly the classes this project's checkpoints hold;
a file that needs anything else is refused unless the run opts in with ``trust_checkpoint=true``.
"""
from __future__ import annotations

import collections
import pickle
import re
import typing
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

from ..errors import UserInputError

# What this project's Lightning checkpoints pickle besides tensors and plain containers: the NumPy RNG state
# (callbacks.resume_state.ResumeState) and task hyperparameters Hydra passes as OmegaConf containers (e.g.
# task.structure_optim); the builtins and typing.Any are referenced by the OmegaConf metadata.
SAFE_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType,
                DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, collections.defaultdict,
                dict, list, int]
# how torch's weights-only unpickler names what it refused
_REFUSED_NAME = re.compile(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>|unrecognized function ([\w.]+)")


def other_checkpoints(path: Path) -> list[Path]:
    """The other ``*.ckpt`` files beside ``path``, newest first: what to try when ``path`` is broken."""
    siblings = [p for p in path.parent.glob("*.ckpt") if p != path and p.stat().st_size > 0]
    return sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True)


def _what_to_do(path: Path) -> str:
    others = other_checkpoints(path)
    if others:
        return f"use an earlier checkpoint such as {others[0]}"
    return "re-run the training that writes it (no other checkpoint lies beside it)"


def lightning_weights_only(trust: bool) -> bool:
    """The ``weights_only`` flag for Lightning's own loads (``trainer.fit`` / ``trainer.test`` with ``ckpt_path``):
    True, with :data:`SAFE_GLOBALS` registered for torch, unless the run trusts its checkpoints."""
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
    return not trust


def refused_name(err: pickle.UnpicklingError) -> str | None:
    """The class or callable torch's weights-only unpickler refused, or None when the file is simply unreadable."""
    found = _REFUSED_NAME.search(str(err))
    return next(name for name in found.groups() if name) if found else None


def _unreadable(path: Path, err: Exception) -> UserInputError:
    reason = " ".join(str(err).split())[:200]
    return UserInputError(f"checkpoint {path} cannot be read ({type(err).__name__}: {reason}): it is truncated, "
                          f"corrupt or not a torch.save file; {_what_to_do(path)}")


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", trust: bool = False,
                         mmap: bool = True) -> dict:
    """``torch.load`` a Lightning / torch checkpoint dict, weights-only with :data:`SAFE_GLOBALS` unless ``trust``;
    a missing, empty, truncated, foreign or unsafe file raises FileNotFoundError / UserInputError naming the file
    and what to do."""
    path = Path(path).expanduser()
    if not path.is_file():
        kind = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {path} {kind}; give the path of a .ckpt file written by a training run")
    if path.stat().st_size == 0:
        raise UserInputError(f"checkpoint {path} is empty (0 bytes, e.g. a run killed while writing it); "
                             f"{_what_to_do(path)}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=not trust,
                                    mmap=mmap and zipfile.is_zipfile(path))  # mmap reads zip saves only
    except pickle.UnpicklingError as err:
        name = refused_name(err)
        if name is None:
            raise _unreadable(path, err) from err
        raise UserInputError(f"checkpoint {path} needs {name}, which safe loading refuses (unpickling it could "
                             "run any code); add trust_checkpoint=true only if you trust the file") from None
    # besides UnpicklingError, the weights-only unpickler fails on malformed bytes with Index/Key/TypeError
    except (EOFError, OSError, RuntimeError, ValueError, AttributeError, ImportError, IndexError, KeyError,
            TypeError) as err:
        raise _unreadable(path, err) from err
    if not isinstance(checkpoint, dict):
        raise UserInputError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict; "
                             "give a .ckpt written by a training run")
    return checkpoint
