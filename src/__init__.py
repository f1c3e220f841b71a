"""structured-compress. ``from src import load_compressed, save_compressed`` resolves lazily (PEP 562), so
torch-free modules such as :mod:`src.config_checks` import without pulling in torch; the config resolvers are
registered on import (run.py, the tests and notebooks all import src first)."""
from .utils.resolvers import register_resolvers

__all__ = ["load_compressed", "save_compressed"]

register_resolvers()


def __getattr__(name: str):
    if name in __all__:
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'src' has no attribute {name!r}")
