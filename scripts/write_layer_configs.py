"""Write ``configs/layer/<name>.yaml`` for every layer type from its typed config (``layers/config.py``).

The dataclasses hold each option's type, default, doc and range; the YAML files are generated from them, so
defaults are written once. ``tests/test_layer_configs.py`` fails when a file and its dataclass differ.
    python scripts/write_layer_configs.py           # rewrite the files
    python scripts/write_layer_configs.py --check   # exit 1 and name the stale files
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from structured_compress.layers.config import CONFIGS, layer_yaml  # noqa: E402
from structured_compress import surgery  # noqa: E402,F401  (registers every type, the planner's auto included)


def stale_files(folder: Path) -> dict[Path, str]:
    """The layer YAML files whose text differs from their generated text, with that text."""
    wanted = {folder / f"{name}.yaml": layer_yaml(cls) for name, cls in sorted(CONFIGS.items())}
    return {path: text for path, text in wanted.items() if not path.exists() or path.read_text() != text}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args()
    stale = stale_files(ROOT / "configs" / "layer")
    for path, text in stale.items():
        print(f"{'stale' if args.check else 'wrote'}: {path.relative_to(ROOT)}")
        if not args.check:
            path.write_text(text)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
