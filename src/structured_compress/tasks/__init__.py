"""LightningModules that train and evaluate a (compressed) model on one kind of task."""
