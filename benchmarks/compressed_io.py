"""Time and peak memory of reading and writing a compressed folder (``load_compressed`` / ``save_compressed``).

Each step runs in a fresh process (its peak RSS is its own): ``load`` reads the folder (sharded or single-file)
on the meta-device skeleton, shard by shard; ``save`` loads it, then writes it again as one file to a temp
folder (the save time excludes the load). Prints one JSON line per step.

    PYTHONPATH=src python benchmarks/compressed_io.py logs/compress/runs/<run>/compressed
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(step: str, folder: str) -> dict:
    import torch

    from structured_compress.io import load_compressed, save_compressed

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.perf_counter()
    model = load_compressed(folder)
    load_s = time.perf_counter() - start
    result = {"load_s": round(load_s, 2)}
    if step == "save":
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            save_compressed(model, out)
            result["save_s"] = round(time.perf_counter() - start, 2)
            result["saved_bytes"] = sum(f.stat().st_size for f in Path(out).iterdir())
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--child", choices=["load", "save"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder)))
        return
    folder = Path(args.folder)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    for step in ("load", "save"):
        out = subprocess.run([sys.executable, __file__, str(folder), "--child", step], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        row = {"benchmark": "compressed_io", "step": step, "folder": str(folder), "weight_files": len(files),
               "bytes_on_disk": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
               **json.loads(out.stdout.strip().splitlines()[-1]), "load_avg": os.getloadavg()[0],
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
