"""Random number generator states in checkpoints, so a resumed run draws what the uninterrupted one would."""
from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch


class RandomState(pl.Callback):
    """Saves the Python, NumPy, torch CPU and CUDA generator states with every checkpoint and restores them
    when training resumes from it (dropout masks, augmentations and random inits then continue unchanged)."""

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        random.setstate(state_dict["python"])
        np.random.set_state(state_dict["numpy"])
        torch.set_rng_state(state_dict["torch"].cpu())
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state_dict["cuda"]])
