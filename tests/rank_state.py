"""A test-only callback: each DDP rank writes its final parameters, so a test can compare the ranks."""
from pathlib import Path

import lightning.pytorch as pl
import torch


class SaveRankState(pl.Callback):
    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_end(self, trainer, pl_module):
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")
