"""Progress bars for long work (block-by-block compression, a tsvd decomposition, a Gaudi search).

Library code logs; a bar is drawn only where a person watches (stderr is a terminal), or always with
``STRUCTURED_COMPRESS_PROGRESS=1`` (``0`` turns bars off).
"""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def bars_enabled() -> bool:
    """Whether bars are drawn: the environment switch, else whether stderr is a terminal."""
    switch = os.environ.get("STRUCTURED_COMPRESS_PROGRESS")
    return switch == "1" if switch in ("0", "1") else sys.stderr.isatty()


def progress_bar(total: int | None, description: str, unit: str = "it", leave: bool = True) -> tqdm:
    """A bar over ``total`` steps (None: unknown) with its rate and ETA (a no-op object when bars are off);
    ``leave=False`` for a layer's own work under the block bar."""
    return tqdm(total=total, desc=description, unit=unit, disable=not bars_enabled(), dynamic_ncols=True,
                mininterval=0.5, leave=leave)
