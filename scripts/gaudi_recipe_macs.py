"""Total MACs of the Gaudi-GBLR paper recipes, from their configs, against the paper's numbers.

A recipe's model MACs per sample = the dense model's linear maps (counted by forward hooks, patch/stem convs and
heads included) + attention products (2 T^2 d per transformer block, which torch's FLOP counter misses for fused
attention) - for every replaced layer, (1 - its budget) x its dense MACs: ``from_dense`` keeps each layer's MACs
at most ``budget`` of dense and fills it to within one component. Recipes whose shrink callback has a
target mean width ``w`` (it sets the final widths) count layers at ``K (m + n) w / (m n)``, ``K = min(m, n)``.
GPT-2 is also given in the paper's own formula (Gaudi reference code, algorithms.md §3.7):
``(sum_layers 1024 MACs + 12 (1024^2 768 + 1024 768^2)) / 9.66e10``. Models are built with random weights.

    python scripts/gaudi_recipe_macs.py
"""
from __future__ import annotations

import fnmatch
import json
import pathlib

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from structured_compress.modeltree import dense_view, select_layers
from structured_compress.utils.flops import linear_macs_per_sample

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAPER = {  # the paper's numbers (algorithms.md §9): absolute MACs per image, or GPT-2's relative FLOPs
    "imagenet/vit-b-gaudi": ("macs", 5.65e9),
    "imagenet/vit-b-gaudi-finetune": ("macs", 5.65e9),
    "imagenet/resnet18-gaudi-finetune": ("macs", 1.01e9),
    "wt103/gpt2-gaudi-finetune": ("relative", 0.437),
}


def recipe_config(experiment: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose("config", overrides=[f"experiment={experiment}"])


def build_model(cfg) -> tuple[torch.nn.Module, torch.Tensor, int, int]:
    """The recipe's architecture with random weights, one input sample, its tokens and width (0, 0 for CNNs)."""
    if "gpt2" in str(cfg.model.get("source", "")):
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small, the architecture of the recipe's checkpoint
        return model, torch.zeros(1, 8, dtype=torch.long), 1024, 768  # linear MACs scale by 1024 / 8 below
    from structured_compress.models.timm_models import create_timm_model

    model = create_timm_model(cfg.model.name, num_classes=1000).eval()
    if hasattr(model, "blocks"):
        return model, torch.zeros(1, 3, 224, 224), 197, model.embed_dim
    return model, torch.zeros(1, 3, 224, 224), 0, 0


def layer_budget(name: str, budget) -> float:
    """The first matching pattern's budget, as surgery picks it."""
    if not OmegaConf.is_dict(budget):
        return float(budget)
    return float(next(v for k, v in budget.items() if fnmatch.fnmatchcase(name, k)))


@torch.no_grad()
def recipe_macs(experiment: str) -> dict:
    cfg = recipe_config(experiment)
    model, sample, tokens, width = build_model(cfg)
    per_layer = linear_macs_per_sample(model, sample)
    if sample.dim() == 2:  # token ids: linear maps cost the same per token, so a short sequence is counted
        per_layer = {name: macs * tokens // sample.shape[1] for name, macs in per_layer.items()}
    if hasattr(model, "lm_head"):
        per_layer.pop("lm_head")  # the paper's GPT-2 count leaves out the embedding and the LM head
    blocks = len(getattr(model, "blocks", getattr(getattr(model, "transformer", None), "h", [])))
    attention = blocks * 2 * tokens ** 2 * width
    dense = sum(per_layer.values()) + attention
    replaced = select_layers(model, list(cfg.layer.include), list(cfg.layer.exclude))
    target_width = float(OmegaConf.select(cfg, "callbacks.gaudi_shrink.target_width", default=0.0) or 0.0)
    kept = {}
    for name, module in replaced.items():
        rows, cols = dense_view(module)[1].shape
        fraction = min(rows, cols) * (rows + cols) * target_width / (rows * cols) if target_width > 0 \
            else layer_budget(name, cfg.layer.budget)
        kept[name] = fraction * per_layer[name]
    total = dense - sum(per_layer[n] for n in replaced) + sum(kept.values())
    result = {"experiment": experiment, "dense_macs": dense, "macs": round(total), "relative": total / dense,
              "replaced_layers": len(replaced)}
    if hasattr(model, "lm_head"):  # the reference's formula: 1024 tokens, 1024^2 768 attention, c_proj kept
        result["relative_paper_formula"] = (sum(kept.values()) + 12 * (1024 ** 2 * 768 + 1024 * 768 ** 2)) / 9.66e10
    kind, value = PAPER[experiment]
    ours = result["relative_paper_formula"] if kind == "relative" else total
    result.update({"paper": value, "paper_unit": kind, "ratio_to_paper": ours / value})
    return result


def main() -> None:
    print(json.dumps([recipe_macs(name) for name in PAPER], indent=1))


if __name__ == "__main__":
    main()
