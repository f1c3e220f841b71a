"""A task whose training fails with a plain ValueError, for the run.py error-policy tests (``task._target_``)."""
from structured_compress.tasks.classification import ClassificationTask


class TrainingStepFails(ClassificationTask):
    def training_step(self, batch, batch_idx: int):
        raise ValueError("boom inside training_step")
