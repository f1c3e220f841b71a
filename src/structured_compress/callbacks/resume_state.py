"""What a resumed run needs beyond Lightning's own state to continue exactly as an uninterrupted run would."""
from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch


class ResumeState(pl.Callback):
    """Saves the Python, NumPy, torch CPU and CUDA generator states with every checkpoint and restores them
    when training resumes from it (dropout masks, augmentations and random inits then continue unchanged),
    and hands the train loader its saved position (``ResumableDataLoader``).

    Lightning restores loader positions only if the train loader is built after the checkpoint is loaded;
    a task whose ``configure_optimizers`` asks for ``estimated_stepping_batches`` builds it earlier, so the
    position is handed over again here, before the first batch is drawn.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.fit_loop._load_combined_loader_states()

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
