"""A table of bad inputs -- overrides, paths, checkpoints, data files, config combinations, NaN during training --
each of which must fail at once with one short line that names the key (or file) and the fix.

Config cases run in-process (compose as run.py does, then ``check_config``); a few go through ``python run.py``
to check what a user sees: exit status 2, one ``error:`` line, no traceback. ``{tmp}``, ``{empty}``,
``{garbage}``, ``{truncated}`` in an override are files made per test.
"""
import gzip
import os
import re
import subprocess
import sys
import time

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from structured_compress.callbacks.finite_guard import FiniteGuard, NonFiniteError
from structured_compress.config_checks import DATA_FAMILY, TASK_FAMILY, ConfigError, check_config
from structured_compress.datamodules.fashion_mnist import FashionMNISTDataModule, read_idx
from structured_compress.layers.gaudi import GaudiGBLRLinear
from structured_compress.utils.checkpoints import load_checkpoint_file

from .conftest import CONFIG_DIR, ROOT, compose_config, experiment_names

# (id, overrides, regex the one-line message must match: the key and the fix or the allowed values)
CONFIG_CASES = [
    # layer group: unknown keys and names, with "did you mean"
    ("typo-key-budjet", ["+layer.budjet=0.25"], r"^layer\.budjet=0\.25: unknown key.*did you mean budget\?"),
    ("typo-options", ["+layer.option.rank=3"], r"^layer\.option=.*did you mean options\?"),
    ("typo-option-rnk", ["+layer.options.rnk=3"], r"layer\.options\.rnk=3: .*no such option.*did you mean rank\?"),
    ("unknown-layer-name", ["layer.name=lowrnk"], r"layer\.name=lowrnk: unknown layer type.*did you mean lowrank\?"),
    ("unknown-layer-in-dict", ["layer.name={blocks.*:butterfly}"], r"layer\.name\.blocks\.\*=butterfly: unknown"),
    ("option-of-other-type", ["+layer.max_error=0.1"], r"layer\.max_error=0\.1: .*belongs to layer=auto/svdq"),
    ("auto-target-type", ["layer=auto", "layer.target_ratio=abc"], r"layer\.target_ratio=abc: expected"),
    ("auto-target-range", ["layer=auto", "layer.target_ratio=-2"], r"layer\.target_ratio=-2: must be > 0"),
    ("auto-choice-type", ["layer=auto", "layer.options.choices.int8.layer=foo"],
     r"layer\.options\.choices\.int8\.layer=foo: unknown layer type"),
    ("auto-choice-option", ["layer=auto", "+layer.options.choices.int8.options.bitz=8"],
     r"choices\.int8\.options\.bitz=8: layer type svdq has no such option"),
    ("option-choice-typo", ["layer.options.init=whitten"], r"layer\.options\.init=whitten: .*did you mean whiten\?"),
    ("gaudi-compute-mode", ["layer=gaudi", "layer.options.compute_mode=sparse"],
     r"layer\.options\.compute_mode=sparse: expected one of auto, dense, lr, compact"),
    ("svdq-bits", ["layer=svdq", "layer.options.bits=3"], r"layer\.options\.bits=3: expected one of 4, 8"),
    # layer group: types and ranges
    ("budget-abc", ["layer.budget=abc"], r"^layer\.budget=abc: expected a number"),
    ("budget-zero", ["layer.budget=0"], r"^layer\.budget=0: must be > 0"),
    ("budget-above-one", ["layer.budget=1.5"], r"^layer\.budget=1\.5: must be <= 1"),
    ("budget-negative", ["layer.budget=-0.1"], r"^layer\.budget=-0\.1: must be"),
    ("budget-nan", ["layer.budget=nan"], r"^layer\.budget=nan: NaN is not a valid setting"),
    ("budget-bool", ["layer.budget=true"], r"^layer\.budget=True: expected a number"),
    ("budget-dict-abc", ["layer.budget={blocks.*:abc}"], r"^layer\.budget\.blocks\.\*=abc: expected a number"),
    ("budget-dict-2", ["layer.budget={blocks.*:2.0}"], r"^layer\.budget\.blocks\.\*=2\.0: must be"),
    ("rank-abc", ["+layer.options.rank=abc"], r"layer\.options\.rank=abc: expected an integer or null"),
    ("rank-zero", ["+layer.options.rank=0"], r"layer\.options\.rank=0: must be >= 1"),
    ("gaudi-niter-abc", ["layer=gaudi", "layer.options.niter=abc"], r"layer\.options\.niter=abc: expected an integer"),
    ("gaudi-niter-unused", ["layer=gaudi", "layer.options.niter=50"],
     r"layer\.options\.niter=50: it acts on the greedy and given starts only.*add greedy to starts"),
    ("gaudi-drop-empty", ["layer=gaudi", "layer.options.drop_empty=maybe"],
     r"drop_empty=maybe: expected true or false"),
    ("svdq-max-error-negative", ["layer=svdq", "layer.max_error=-0.5"], r"layer\.max_error=-0\.5: must be > 0"),
    ("calibration-negative", ["layer.calibration_batches=-1"],
     r"layer\.calibration_batches=-1: must be an integer >= 0"),
    ("calibration-abc", ["layer.calibration_batches=abc"], r"layer\.calibration_batches=abc: must be an integer"),
    ("whiten-without-calibration", ["layer.options.init=whiten"],
     r"layer\.calibration_batches=0: .*init=whiten.*layer\.calibration_batches=4"),
    ("max-error-without-calibration", ["layer=svdq", "layer.max_error=0.05"],
     r"layer\.calibration_batches=0: .*max_error.*calibration_batches=4"),
    ("monarch-nblocks-negative", ["layer=monarch", "layer.options.nblocks=-2"], r"nblocks=-2: must be > 0"),
    ("tsvd-tolerance-negative", ["layer=tsvd", "layer.options.tolerance=-1"], r"tolerance=-1: must be > 0"),
    ("hyper-codebook-int", ["layer=hyper", "layer.options.codebook_sizes=100"],
     r"codebook_sizes=100: expected a non-empty list"),
    ("blockdiag-refine-negative", ["layer=blockdiag", "layer.options.refine_steps=-3"], r"refine_steps=-3: must be"),
    ("include-not-patterns", ["layer.include=5"], r"layer\.include=5: must be a list of fnmatch patterns"),
    # run-level keys
    ("seed-abc", ["seed=abc"], r"^seed=abc: must be an integer.*seed=42"),
    ("seed-float", ["seed=1.5"], r"^seed=1\.5: must be an integer"),
    ("max-epochs-minus-one", ["trainer.max_epochs=-1"], r"trainer\.max_epochs=-1: .*needs a step limit.*max_steps"),
    ("max-epochs-zero", ["trainer.max_epochs=0"], r"trainer\.max_epochs=0: must be >= 1"),
    ("max-epochs-abc", ["trainer.max_epochs=abc"], r"trainer\.max_epochs=abc: must be an integer"),
    ("max-steps-abc", ["trainer.max_steps=abc"], r"trainer\.max_steps=abc: must be an integer.*-1"),
    ("max-steps-below", ["trainer.max_steps=-5"], r"trainer\.max_steps=-5: must be"),
    ("limit-train-fraction", ["trainer.limit_train_batches=1.5"], r"trainer\.limit_train_batches=1\.5: must be"),
    ("limit-val-negative", ["trainer.limit_val_batches=-1"], r"trainer\.limit_val_batches=-1: must be"),
    ("accumulate-zero", ["trainer.accumulate_grad_batches=0"], r"trainer\.accumulate_grad_batches=0: must be"),
    ("precision-typo", ["trainer.precision=bf16-mix"], r"trainer\.precision=bf16-mix: .*did you mean bf16-mixed\?"),
    ("accelerator-typo", ["trainer.accelerator=gpus"], r"trainer\.accelerator=gpus: .*did you mean gpu\?"),
    ("clip-negative", ["trainer.gradient_clip_val=-1"], r"trainer\.gradient_clip_val=-1: must be"),
    ("val-size-negative", ["datamodule.val_size=-5000"], r"datamodule\.val_size=-5000: must be an integer >= 0"),
    ("batch-size-zero", ["datamodule.batch_size=0"], r"datamodule\.batch_size=0: must be an integer >= 1"),
    ("batch-size-abc", ["datamodule.batch_size=abc"], r"datamodule\.batch_size=abc: must be an integer >= 1"),
    ("num-workers-negative", ["datamodule.num_workers=-1"], r"datamodule\.num_workers=-1: must be"),
    ("optimized-mode-typo", ["optimized_mode=maximum"],
     r"optimized_mode=maximum: must be min or max.*did you mean max"),
    # mode against its train / test steps
    ("eval-with-train", ["mode=eval", "train=true"], r"^train=True: mode=eval does not train.*use mode=train"),
    ("compress-with-train", ["mode=compress", "train=true"], r"^train=True: mode=compress does not train"),
    ("eval-without-test", ["mode=eval", "test=false"], r"^test=False: mode=eval only tests.*drop test=false"),
    ("train-nothing", ["train=false", "test=false"], r"^test=False: with train=false too, nothing would run"),
    ("train-flag-abc", ["train=abc"], r"^train=abc: must be true or false"),
    # monitored metrics: the names the task logs (tasks/metric_names.py)
    ("monitor-unknown", ["callbacks.model_checkpoint.monitor=val/nonexistent"],
     r"^callbacks\.model_checkpoint\.monitor=val/nonexistent: task ClassificationTask logs no such metric "
     r"\(it logs .*val/acc.*set callbacks\.model_checkpoint\.monitor to one of them"),
    ("optimized-metric-unknown", ["optimized_metric=val/accuracy"],
     r"^callbacks\.model_checkpoint\.monitor=val/accuracy: .*did you mean val/acc\?.*set optimized_metric"),
    ("early-stopping-monitor", ["+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
                                "+callbacks.early_stopping.monitor=val/los"],
     r"^callbacks\.early_stopping\.monitor=val/los: .*did you mean val/loss\?"),
    ("lm-monitor-acc", ["experiment=wt2/gpt2-dense", "optimized_metric=val/acc"],
     r"monitor=val/acc: task LanguageModelTask logs no such metric.*val/perplexity"),
    # optimizer and schedule numbers
    ("lr-abc", ["task.optimizer.lr=abc"], r"^task\.optimizer\.lr=abc: expected a number \(learning rate"),
    ("lr-negative", ["task.optimizer.lr=-0.1"], r"^task\.optimizer\.lr=-0\.1: must be > 0"),
    ("weight-decay-negative", ["task.weight_decay=-1"], r"^task\.weight_decay=-1: must be >= 0 \(decay of the"),
    ("betas-above-one", ["task.optimizer.betas=[0.9,1.5]"],
     r"^task\.optimizer\.betas=\[0\.9,1\.5\]: every item must be < 1"),
    ("betas-one-number", ["task.optimizer.betas=[0.9]"], r"^task\.optimizer\.betas=\[0\.9\]: must be two numbers"),
    ("momentum-abc", ["+task.optimizer.momentum=abc"], r"^task\.optimizer\.momentum=abc: expected a number"),
    ("warmup-fraction-2", ["task.warmup_fraction=2"], r"^task\.warmup_fraction=2: must be <= 1 \(share of the"),
    ("min-lr-ratio-negative", ["task.min_lr_ratio=-0.5"], r"^task\.min_lr_ratio=-0\.5: must be >= 0"),
    ("label-smoothing-1", ["task.label_smoothing=1.0"], r"^task\.label_smoothing=1\.0: must be < 1"),
    ("structure-lr-abc", ["task.structure_optim={lr:abc}"], r"^task\.structure_optim\.lr=abc: expected a number"),
    ("structure-optim-typo", ["task.structure_optim={lrr:0.001}"],
     r"^task\.structure_optim\.lrr=0\.001: structure_optim has no such option.*did you mean lr\?"),
    # mode=compress storage policy (StoragePolicy's typed fields)
    ("storage-dtype", ["mode=compress", "mode.storage.dtype=fp8"], r"^mode\.storage\.dtype=fp8: expected one of fp16"),
    ("storage-key-typo", ["mode=compress", "+mode.storage.embedings=int8"],
     r"^mode\.storage\.embedings=int8: storage has no such option.*did you mean embeddings\?"),
    ("storage-embeddings", ["mode=compress", "mode.storage.embeddings=int3"],
     r"^mode\.storage\.embeddings=int3: expected one of none, int8, int4"),
    ("storage-group-size", ["mode=compress", "mode.storage.group_size=0"], r"^mode\.storage\.group_size=0: must be"),
    # paths and checkpoints
    ("eval-without-ckpt", ["mode=eval"], r"^ckpt_path=null: mode=eval .*ckpt_path=<run dir>/checkpoints/last\.ckpt"),
    ("ckpt-missing", ["ckpt_path=/nonexistent/last.ckpt"], r"ckpt_path=/nonexistent/last\.ckpt: no such file"),
    ("ckpt-directory", ["mode=eval", "ckpt_path={tmp}"], r"ckpt_path=.*: is a directory.*last\.ckpt"),
    ("ckpt-empty", ["mode=eval", "ckpt_path={empty}"], r"ckpt_path=.*empty\.ckpt: the file is empty"),
    ("ckpt-garbage", ["mode=eval", "ckpt_path={garbage}"], r"ckpt_path=.*garbage\.ckpt: not a PyTorch checkpoint"),
    ("ckpt-truncated", ["mode=eval", "ckpt_path={truncated}"], r"ckpt_path=.*truncated\.ckpt: .*truncated"),
    ("pretrained-missing", ["model.pretrained_path=/nonexistent/dense.ckpt"],
     r"model\.pretrained_path=/nonexistent/dense\.ckpt: no such file"),
    ("finetune-without-dense", ["experiment=fashion_mnist/vit-gaudi-finetune"],
     r"model\.pretrained_path=.*fashion_mnist-vit-dense\.safetensors: no such file"),
    ("imagenet-missing", ["experiment=imagenet/vit-gaudi", "paths.data_dir={tmp}"],
     r"datamodule=imagenet: ImageNet .*not found.*datamodule\.path"),
    ("imagenet-lowrank-missing", ["experiment=imagenet/vit-b-lowrank", "paths.data_dir={tmp}"],
     r"datamodule=imagenet: ImageNet .*not found"),
    # combinations that cannot work: one line naming a working experiment
    ("cifar10-on-fmnist-vit", ["datamodule=cifar10"], r"model\.in_chans=1: .*datamodule=cifar10 gives 3.*experiment="),
    ("minilm-on-images", ["model=minilm"], r"model=minilm \(labelled text\).*experiment=tweets/minilm-dense"),
    ("minilm-compress-svdq", ["mode=compress", "model=minilm", "layer=svdq"], r"experiment=tweets/minilm-dense"),
    ("gpt2-on-images", ["model=gpt2"], r"model=gpt2 \(text for language modelling\).*experiment=wt"),
    ("lm-task-on-images", ["task=language_model"], r"task=language_model .*do not fit together"),
    ("text-data-image-model", ["datamodule=tweets_sentiment"], r"datamodule=tweets_sentiment \(labelled text\)"),
    ("num-classes-mismatch", ["model.num_classes=100"], r"model\.num_classes=100: .*gives 10.*model\.num_classes=10"),
    ("img-size-mismatch", ["model.img_size=32"], r"model\.img_size=32: .*gives 28"),
    ("gaudi-callbacks-lowrank", ["callbacks=[default,gaudi]"],
     r"callbacks\.gaudi_shrink=GaudiShrink: acts on Gaudi layers only.*layer=gaudi"),
    ("gaudi-experiment-lowrank", ["experiment=tweets/minilm-gaudi", "layer=lowrank"],  # keeps its gaudi options
     r"layer\.options\.num_components=96: layer type lowrank has no such option"),
    ("tsvd-qat-without-tsvd", ["+callbacks.qat._target_=structured_compress.callbacks.tsvd_qat.TernaryQAT"],
     r"callbacks\.qat=TernaryQAT: .*ternary-SVD layers only.*layer=tsvd"),
    ("broken-interpolation", ["task.num_classes=${model.nope}"],
     r"task\.num_classes=.*cannot be resolved.*experiment="),
]


@pytest.fixture
def files(tmp_path):
    """Placeholders for path overrides: a folder, an empty, a garbage and a truncated checkpoint."""
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "garbage.ckpt").write_text("this is not a checkpoint\n")
    torch.save({"state_dict": {"w": torch.ones(64, 64)}}, tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    names = ("empty", "garbage", "truncated")
    return {"tmp": str(tmp_path), **{name: str(tmp_path / f"{name}.ckpt") for name in names}}


def fill(overrides: list[str], files: dict[str, str]) -> list[str]:
    """Put the per-test file paths into the ``{name}`` placeholders (other braces are Hydra syntax)."""
    for name, path in files.items():
        overrides = [o.replace("{" + name + "}", path) for o in overrides]
    return overrides


def one_line(message: str) -> str:
    assert "\n" not in message and len(message) < 600, message
    return message


@pytest.mark.parametrize("overrides,pattern", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_fails_at_compose_time(overrides, pattern, files, tmp_path):
    cfg = compose_config(fill(overrides, files), tmp_path)
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert re.search(pattern, one_line(str(info.value))), str(info.value)


def test_the_table_covers_at_least_fifty_distinct_inputs():
    assert len({c[0] for c in CONFIG_CASES}) == len(CONFIG_CASES) >= 50


# ------------------------------------------------------------- no false alarms, and the schema is the code's


@pytest.mark.parametrize("experiment", experiment_names())
def test_every_runnable_experiment_passes(experiment, tmp_path):
    """Experiments that run offline pass; the others (hub data or weights, or weights an earlier run exports)
    fail only with a ConfigError about missing inputs."""
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    if cfg.get("offline_available", True) and not cfg.model.get("pretrained_path"):
        check_config(cfg)
    else:
        try:
            check_config(cfg)
        except ConfigError as err:
            assert "not found" in str(err) or "no such file" in str(err), str(err)


@pytest.mark.parametrize("overrides", [["layer=gaudi", "layer.options.starts=[given]",
                                        "layer.options.location_init=0.0"],
                                       ["layer.budget={blocks.*:0.3,head:1.0}"],
                                       ["layer=svdq"],
                                       ["trainer.max_epochs=-1", "trainer.max_steps=100"],
                                       ["trainer.limit_train_batches=0.25", "trainer.limit_val_batches=2"],
                                       ["layer.options.init=whiten", "layer.calibration_batches=2"]])
def test_good_overrides_pass(overrides, tmp_path):
    check_config(compose_config(overrides, tmp_path))


def test_mixed_layer_types_with_per_type_options(tmp_path):
    mixed = ["layer.name={blocks.*.fc1:lowrank,blocks.*:dense}", "layer.include=[blocks.*]"]
    check_config(compose_config([*mixed, "~layer.options", "+layer.options={lowrank:{rank:4}}"], tmp_path))
    cfg = compose_config([*mixed, "~layer.options", "+layer.options={lowrnk:{rank:4}}"], tmp_path)
    with pytest.raises(ConfigError, match=r"layer\.options\.lowrnk=.*did you mean lowrank\?"):
        check_config(cfg)


def test_family_tables_cover_every_datamodule_and_task():
    from omegaconf import OmegaConf

    for group, table in (("datamodule", DATA_FAMILY), ("task", TASK_FAMILY)):
        for path in (CONFIG_DIR / group).glob("*.yaml"):
            assert OmegaConf.load(path)._target_.rsplit(".", 1)[-1] in table, path
    assert FashionMNISTDataModule.input_shape == (1, 28, 28) and FashionMNISTDataModule.num_classes == 10


def test_config_checks_do_not_import_torch():
    code = "import sys, structured_compress.config_checks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ------------------------------------------------------------------------------- checkpoints and data files


def test_checkpoint_files_fail_with_the_file_and_an_alternative(files, tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    cases = {"empty": r"is empty.*use an earlier checkpoint such as .*\.ckpt",
             "garbage": r"cannot be read \(\w+Error.*use an earlier checkpoint",
             "truncated": r"cannot be read .*truncated, corrupt",
             "list": r"holds a list, not a checkpoint dict"}
    for name, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern) as info:
            load_checkpoint_file(tmp_path / f"{name}.ckpt")
        assert str(tmp_path / f"{name}.ckpt") in one_line(str(info.value))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.ckpt")
    assert load_checkpoint_file(tmp_path / "good.ckpt")["state_dict"]["w"].shape == (64, 64)


def write_idx(path, array):
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def small_fashion_mnist(folder, n_train=20):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", 10)):
        write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))


def test_truncated_and_corrupt_idx_files_are_named(tmp_path):
    small_fashion_mnist(tmp_path / "fashion_mnist")
    images = tmp_path / "fashion_mnist" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{images} is truncated or padded: 1000 bytes"):
        read_idx(images)
    broken_gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    broken_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(5000))[:20])  # cut inside the stream
    with pytest.raises(ValueError, match=rf"{broken_gz} is corrupt"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte")


@pytest.mark.parametrize("val_size", [20, 70000])
def test_val_size_beyond_the_training_set(val_size, tmp_path):
    small_fashion_mnist(tmp_path / "fashion_mnist")
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=val_size, allow_download=False)
    with pytest.raises(ValueError, match=rf"datamodule\.val_size={val_size}: must be an integer in \[0, 19\]"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------- NaN / Inf guard


class TinyTask(pl.LightningModule):
    """A Gaudi layer regressed on random data; ``break_at`` poisons the loss or the widths at that step."""

    def __init__(self, break_at: int, what: str):
        super().__init__()
        self.net = nn.Sequential(GaudiGBLRLinear(8, 4, num_components=2, sigma=None))
        self.break_at, self.what = break_at, what

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        return loss * float("nan") if self.what == "loss" and self.global_step == self.break_at else loss

    def on_before_optimizer_step(self, optimizer):
        if self.what == "widths" and self.global_step == self.break_at:
            self.net[0].widths.data[0, 0] = float("inf")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("what,pattern", [("loss", r"the training loss is nan"),
                                          ("widths", r"layer net\.0: 1 of 4 widths are NaN/Inf")])
def test_finite_guard_stops_with_step_layer_and_last_checkpoint(what, pattern, tmp_path):
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randn(64, 4)), batch_size=8)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoints, FiniteGuard()])
    with pytest.raises(NonFiniteError) as info:
        trainer.fit(TinyTask(break_at=3, what=what), data)
    message = one_line(str(info.value))
    assert re.search(rf"stopped at step 4 \(epoch 0\): {pattern}; last good checkpoint: {tmp_path}/last\.ckpt",
                     message), message
    saved = load_checkpoint_file(tmp_path / "last.ckpt")
    assert saved["global_step"] == 3  # the broken step was never checkpointed
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


# --------------------------------------------------------------------------------------- through run.py


RUN_CASES = [
    (["+layer.budjet=0.25"], r"layer\.budjet=0\.25: .*did you mean budget"),
    (["trainer.max_epochs=-1"], r"trainer\.max_epochs=-1: .*trainer\.max_steps"),
    (["seed=abc"], r"seed=abc: .*seed=42"),
    (["experiment=imagenet/vit-gaudi"], r"datamodule=imagenet: ImageNet .*not found"),
    (["mode=compress", "model=minilm", "layer=svdq"], r"experiment=tweets/minilm-dense"),
    (["mode=eval", "ckpt_path={garbage}"], r"ckpt_path=.*garbage\.ckpt: not a PyTorch checkpoint"),
]


@pytest.mark.parametrize("overrides,pattern", RUN_CASES, ids=[" ".join(c[0]) for c in RUN_CASES])
def test_run_py_prints_one_line_and_exits_2(overrides, pattern, files, tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path)}
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *fill(overrides, files)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and re.search(pattern, line), line
    assert not list((tmp_path / "logs").rglob("metrics.json"))
    assert seconds < 60, f"{seconds:.1f} s: the check must come before the model and data load"
