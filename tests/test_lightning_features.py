"""Lightning and Hydra features users expect: learning-rate curves, FLOPs in the model summary, the compression
report in every logger, each log line once, --help listing experiments and layer types, nested tab completion."""
import csv
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.model_summary import ModelSummary
from torch import nn
from torch.utils.data import TensorDataset

from structured_compress.callbacks.lr_monitor import LearningRateMonitor
from structured_compress.layers import LAYERS
from structured_compress.surgery import compress_
from structured_compress.tasks.classification import ClassificationTask
from structured_compress.tasks.glue import SequenceClassificationTask
from structured_compress.tasks.language_model import LanguageModelTask
from structured_compress.utils.logs import route_lightning_logs_to_root
from structured_compress.utils.report_logging import COLUMNS, CSV_NAME, log_report

from .conftest import ROOT, experiment_names

ADAMW = partial(torch.optim.AdamW, lr=1e-3)


def tiny_classification(tmp_path, logger):
    """A 2-step fit of a linear classifier on random 4x4 'images' (one channel), with the LR monitor."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,)))
    datamodule = pl.LightningDataModule.from_datasets(train_dataset=data, val_dataset=data, batch_size=8)
    task = ClassificationTask(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), num_classes=3, optimizer=ADAMW)
    trainer = pl.Trainer(max_steps=2, log_every_n_steps=1, logger=logger, callbacks=[LearningRateMonitor()],
                         enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=datamodule)
    return task


def test_learning_rate_reaches_the_logger(tmp_path):
    tiny_classification(tmp_path, CSVLogger(tmp_path, name="csv", version=""))
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    lrs = {group: [float(r[f"lr-AdamW/{group}"]) for r in rows if r.get(f"lr-AdamW/{group}")]
           for group in ("decay", "no_decay")}  # one curve per named parameter group
    assert lrs["decay"][0] == lrs["no_decay"][0] == 1e-3  # step 0 of 2: no warmup step, cosine factor 1


def test_learning_rate_monitor_without_logger_does_not_raise(tmp_path):
    tiny_classification(tmp_path, False)


def test_example_input_from_the_data_gives_the_summary_real_flops(tmp_path):
    task = tiny_classification(tmp_path, False)
    assert task.example_input_array.shape == (1, 1, 4, 4)
    assert ModelSummary(task).total_flops == 2 * 16 * 3  # one sample through Linear(16, 3)


def test_hf_tasks_example_inputs_reach_the_model():
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    bert = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16, num_labels=2))
    glue = SequenceClassificationTask(bert, num_labels=2, optimizer=ADAMW, glue_task="sst2")
    batch = {"input_ids": torch.randint(0, 30, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.zeros(4, dtype=torch.long)}
    glue.example_input_array = glue.example_input(batch)
    assert ModelSummary(glue).total_flops > 0
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=16))
    lm = LanguageModelTask(gpt, optimizer=ADAMW)
    lm.example_input_array = lm.example_input(torch.randint(0, 30, (4, 6)))
    assert lm.example_input_array.shape == (1, 6) and ModelSummary(lm).total_flops > 0


@pytest.fixture
def report():
    torch.manual_seed(0)
    return compress_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), "lowrank", 0.5, include=["*"])


def test_report_reaches_csv_and_tensorboard(report, tmp_path):
    with_tensorboard = importlib.util.find_spec("tensorboard") is not None  # the loggers extra
    csv_logger = CSVLogger(tmp_path, name="csv", version="")
    loggers = [csv_logger] + ([TensorBoardLogger(tmp_path / "tb", name=None, version="")] if with_tensorboard else [])
    log_report(loggers, report, {"bytes_on_disk": 1234, "compressed_path": "/not/a/number"})
    (metrics,) = csv.DictReader(open(tmp_path / "csv" / "metrics.csv"))
    assert float(metrics["compression/replaced_params_after"]) == report.params_after
    assert float(metrics["compression/bytes_on_disk"]) == 1234 and "compression/compressed_path" not in metrics
    layers = list(csv.DictReader(open(tmp_path / "csv" / CSV_NAME)))
    assert [r["name"] for r in layers] == ["0", "2"] and list(layers[0]) == list(COLUMNS)
    assert sum(int(r["params_after"]) for r in layers) == report.params_after
    if not with_tensorboard:
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Scalars("compression/replaced_layers")[0].value == 2
    text = make_ndarray(events.Tensors("compression/layers/text_summary")[0].tensor_proto).item().decode()
    assert text.splitlines()[0].split()[0] == "layer" and f"{report.params_before}->{report.params_after}" in text


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="pip install -e '.[loggers]'")
def test_report_reaches_wandb_offline(report, tmp_path):
    import json

    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    log_report([logger], report)
    logger.experiment.finish()
    (table,) = tmp_path.rglob("layers_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == list(COLUMNS) and len(content["data"]) == 2


def test_lightning_lines_print_once(capfd):
    root, stream = logging.getLogger(), io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        route_lightning_logs_to_root()
        logging.getLogger("lightning.pytorch.utilities.rank_zero").warning("marker-line")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().count("marker-line") == 1
    assert "marker-line" not in capfd.readouterr().err  # Lightning's own console handler is gone


def hydra_query(line: str) -> list[str]:
    env = {**os.environ, "COMP_LINE": line}
    out = subprocess.run([sys.executable, "run.py", "-sc", "query=bash"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_help_lists_every_experiment_and_layer_type():
    out = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split(":")[0]: line.split(":", 1)[1] for line in out.stdout.splitlines() if ": " in line}
    for name in experiment_names():
        folder, _, experiment = name.rpartition("/")
        assert experiment in lines[f"experiment/{folder}"].replace(",", " ").split()
    assert set(LAYERS) <= set(lines["layer"].replace(",", " ").split())


def test_tab_completion_reaches_nested_experiments():
    assert hydra_query("python run.py experiment=") == [f"experiment={n}" for n in experiment_names()]
    assert hydra_query("python run.py layer=mo") == ["layer=monarch"]
    glue = hydra_query("python run.py layer=dense experiment=glue/")
    assert glue == [f"experiment={n}" for n in experiment_names() if n.startswith("glue/")] and len(glue) >= 2


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_installed_bash_completion_offers_nested_experiments(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "python"  # the completion script calls `python run.py -sc query=bash`
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    script = subprocess.run([sys.executable, "run.py", "-sc", "install=bash"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120).stdout
    probe = (f"{script}\nCOMP_LINE='python run.py experiment=cifar10/vit'; COMP_WORDS=(python run.py "
             "experiment=cifar10/vit); COMP_CWORD=2; COMP_POINT=${#COMP_LINE}; hydra_bash_completion; "
             "printf '%s\\n' \"${COMPREPLY[@]}\"")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    expected = [f"experiment={n}" for n in experiment_names() if n.startswith("cifar10/vit")]
    assert out.stdout.split() == expected and len(expected) >= 2, out.stderr
