"""Where Hugging Face weights and tokenizers come from: a local folder, a folder inside an installed package,
a GGUF file shipped by packages (converted once to a cached safetensors folder), or a hub name.

A *source* string is one of
  ``/path/to/dir``                          a saved ``from_pretrained`` folder;
  ``package:<module>/<subdir>``             ``Path(<module>.__file__).parent / <subdir>``;
  ``gguf-package:<module>``                 a package exposing ``MODEL_NAME`` and ``assemble(path)`` (chunked GGUF);
  ``<org>/<name>`` or ``<name>``            a hub name: used when it is in the local HF cache or the network is up.
Models and datamodules resolve the same string, so a tokenizer always matches its model; both import this module,
which imports nothing of the project's (and no torch until a GGUF is converted).
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
GGUF_PREFIX = "gguf-package:"


class ModelSourceNotFoundError(FileNotFoundError):
    """The weights named by a source string are not on this machine and cannot be downloaded."""


def network_available(host: str = "pypi.org", port: int = 443, timeout: float = 2.0) -> bool:
    """True when a TCP connection opens quickly; used to refuse downloads that would hang offline."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def cache_root() -> Path:
    """``$STRUCTURED_COMPRESS_CACHE`` or ``$XDG_CACHE_HOME/structured_compress`` (default ``~/.cache/...``)."""
    if os.environ.get("STRUCTURED_COMPRESS_CACHE"):
        return Path(os.environ["STRUCTURED_COMPRESS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "structured_compress"


def _import_package(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ModelSourceNotFoundError(
            f"python package {module!r} is not installed; `pip install {module.replace('_', '-')}` "
            "(it is in the project's `offline` extra: `pip install -e '.[offline]'`)"
        ) from err


def package_dir(spec: str) -> Path:
    """``<module>/<subdir>`` -> the folder inside the installed package."""
    module, _, subdir = spec.partition("/")
    path = Path(_import_package(module).__file__).parent / subdir
    if not path.is_dir():
        raise ModelSourceNotFoundError(f"package {module!r} has no folder {subdir!r} (looked at {path})")
    return path


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists() \
        and (folder / "tokenizer_config.json").exists()


def gguf_package_file(module: str, root: Path | None = None) -> Path:
    """The GGUF file the package ``module`` ships in chunks, assembled once into the cache (under a temporary
    name, then renamed): the converted model and the storage that keeps the file's own blocks read it."""
    package = _import_package(module)
    target = (root or cache_root()) / "gguf" / package.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{package.MODEL_NAME}.tmp-{os.getpid()}"
    try:
        os.replace(package.assemble(tmp), target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def convert_gguf_package(module: str, root: Path | None = None) -> Path:
    """Dequantize the GGUF shipped by ``module`` into a float32 safetensors HF folder, once.

    Assembling and dequantizing take a couple of minutes; later loads read the cached folder in seconds.
    The folder is written under a temporary name and renamed, so a crash or a concurrent run never leaves a
    half-written model behind.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = (root or cache_root()) / module
    if _is_converted(target):
        return target
    gguf = gguf_package_file(module, root)
    tmp = target.parent / f".{module}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        log.info("converting the GGUF from package %s to %s (once; takes a few minutes)", module, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # weights are dequantized: the folder is a plain float model
        config.save_pretrained(str(tmp))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(tmp))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not _is_converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _in_hf_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str) \
        or isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)


def resolve_source(source: str) -> str:
    """A path or hub name ``from_pretrained`` can load without hanging (see module docstring)."""
    source = str(source)
    if source.startswith(PACKAGE_PREFIX):
        return str(package_dir(source[len(PACKAGE_PREFIX):]))
    if source.startswith(GGUF_PREFIX):
        return str(convert_gguf_package(source[len(GGUF_PREFIX):]))
    local = Path(source).expanduser()
    if local.is_dir():
        return str(local)
    if source.startswith((".", "/", "~")):
        raise ModelSourceNotFoundError(f"model folder {local} does not exist")
    if _in_hf_cache(source) or network_available("huggingface.co"):
        return source
    raise ModelSourceNotFoundError(
        f"{source!r} is neither a local folder nor in the Hugging Face cache, and the hub cannot be reached. "
        f"Download it on a machine with internet (`huggingface-cli download {source} --local-dir DIR`), copy DIR "
        "here and set the source (model.source / datamodule.tokenizer) to DIR."
    )


def load_tokenizer(source: str):
    """``AutoTokenizer`` for a source string; GPT-style tokenizers without a pad token reuse EOS for padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(source))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
