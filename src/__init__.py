"""structured-compress. ``from src import load_compressed, save_compressed`` resolves lazily (PEP 562), so
torch-free modules such as :mod:`src.config_checks` import without pulling in torch."""

__all__ = ["load_compressed", "save_compressed"]


def __getattr__(name: str):
    if name in __all__:
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'src' has no attribute {name!r}")
