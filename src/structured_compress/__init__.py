"""structured-compress (import name ``structured_compress``).
``from structured_compress import load_compressed, save_compressed`` resolves lazily (PEP 562), so
torch-free modules such as :mod:`structured_compress.config_checks` import without pulling in torch;
the config resolvers are registered on import (run.py, the tests and notebooks all import structured_compress first),
and so is the transformers quantizer that lets ``from_pretrained`` load compressed folders (:mod:`.hf_registration`)."""
from .hf_registration import register_with_transformers
from .utils.resolvers import register_resolvers

__all__ = ["load_compressed", "save_compressed"]

register_resolvers()
register_with_transformers()


def __getattr__(name: str):
    if name in __all__:
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'structured_compress' has no attribute {name!r}")
