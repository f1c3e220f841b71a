"""Errors that end a run with one line (``error: <message>``, exit status 2) instead of a traceback: the input
was wrong, not the code. Torch-free, so the compose-time checks and ``run.py`` use them before torch loads.

Every other exception is a bug or a failure of the run itself and keeps its traceback (``run.py``).
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable


class UserInputError(ValueError):
    """Bad input found while the run works (e.g. a checkpoint of another model); the message names the input
    and the fix."""


class ConfigError(UserInputError):
    """A config value that cannot work, found at compose time; the one-line message names the key, the value,
    what is allowed and the fix."""


def fail(key: str, value: Any, problem: str, fix: str) -> None:
    """Raise the one-line :class:`ConfigError`: ``key=value: problem; fix``."""
    raise ConfigError(f"{key}={show(value)}: {problem}; {fix}")


def show(value: Any) -> str:
    """A value as a user would type it on the command line."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{show(v)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """``"did you mean X? "`` for the closest of ``options`` (difflib), or an empty string."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""
