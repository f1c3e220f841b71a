"""A test-only callback: SIGKILL the training process right after a given optimizer step (a preemption)."""
import os
import signal
import time

import lightning.pytorch as pl


class KillAtStep(pl.Callback):
    def __init__(self, step: int, delay_s: float = 0.0, whole_group: bool = False):
        self.step = step
        self.delay_s = delay_s  # time for other processes (W&B's writer) to save what they were sent
        # a preempted job loses its helper processes too (W&B's service): kill the process group (the test starts
        # the run in a session of its own)
        self.whole_group = whole_group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            time.sleep(self.delay_s)
            if self.whole_group:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
