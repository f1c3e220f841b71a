"""int4 round-to-nearest vs GPTQ (symmetric / zero-point grids, groups 32/64/128) on MiniLM and
EfficientNet-Lite0: registers the codecs below in ``codec_suite.CODECS`` and runs the model benchmark's
``main`` with them, so the numbers come from the same compress -> save -> reload round trip.

    python benchmarks/quant_int4.py minilm          # every int4 / svdq-int4 codec below
    python benchmarks/quant_int4.py efficientnet --codecs int4-gptq-asym-g64 int4-rtn-asym-g64

Codec names: ``int4-<rounding>-<grid>-g<group>`` quantize each whole weight (no SVD);
``svdq-int4-<rounding>-<grid>-g64-e<bound>`` pick the smallest SVD rank (or the whole int4 matrix, then int8)
whose output error on the calibration inputs is <= bound. ``tsvd-0.01-s<steps>``: ternary SVD at the
published tolerance; ``auto-r<ratio>``: the ``layer=auto`` plan over int8 / int4 (GPTQ, zero point) at
``fp16 bytes / ratio`` of the replaced layers.
"""
from __future__ import annotations

import sys

from codec_suite import CODECS, Codec

ROUNDINGS = {"rtn": "nearest", "gptq": "gptq"}
GRIDS = {"sym": True, "asym": False}
AUTO_CHOICES = {f"int{bits}-g{group}": {"layer": "svdq", "options": {
    "bits": bits, "group_size": group, "symmetric": False, "svd": False, "rounding": "gptq"}}
    for bits, group in ((8, None), (4, 128), (4, 64), (4, 32))}


def int4_codecs() -> dict[str, Codec]:
    codecs = {}
    for short, rounding in ROUNDINGS.items():
        for grid, symmetric in GRIDS.items():
            options = {"bits": 4, "symmetric": symmetric, "rounding": rounding}
            for group in (32, 64, 128):
                codecs[f"int4-{short}-{grid}-g{group}"] = Codec(
                    "svdq", options={**options, "group_size": group, "svd": False}, calibrate=True)
            for bound in (0.05, 0.1):
                codecs[f"svdq-int4-{short}-{grid}-g64-e{bound}"] = Codec(
                    "svdq", options={**options, "group_size": 64, "max_error": bound, "fallback_bits": 8},
                    calibrate=True)
    for steps in (20, 5):
        codecs[f"tsvd-0.01-s{steps}"] = Codec("tsvd", options={"tolerance": 0.01, "steps": steps})
    for ratio in (2.0, 2.5, 3.0, 3.5, 4.0):
        codecs[f"auto-r{ratio}"] = Codec("auto", options={"choices": AUTO_CHOICES, "target_ratio": ratio},
                                         calibrate=True)
    return codecs


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("minilm", "efficientnet"):
        raise SystemExit("usage: python benchmarks/quant_int4.py {minilm,efficientnet} [--codecs NAME ...]")
    model, rest = sys.argv[1], sys.argv[2:]
    CODECS.update(int4_codecs())
    if "--codecs" not in rest:
        rest = ["--codecs", *[name for name in int4_codecs() if name.startswith(("int4", "svdq"))]]
    sys.argv = [sys.argv[0], *rest]
    if model == "minilm":
        from compress_minilm import main as run
    else:
        from compress_efficientnet import main as run
    run()


if __name__ == "__main__":
    main()
