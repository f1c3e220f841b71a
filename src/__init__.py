from .io import load_compressed, save_compressed  # noqa: F401
