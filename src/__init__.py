from .io import load_compressed, save_compressed  # noqa: F401
from .utils.resolvers import register_resolvers

register_resolvers()  # configs resolve when src is imported: run.py, the tests and notebooks all import it first
