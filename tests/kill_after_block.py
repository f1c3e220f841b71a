"""Test-only wrapper of run.py: SIGKILL the process right after the compressed folder's N-th block shard is on
disk (``KILL_AFTER_BLOCKS=N``), as a preemption mid-compression would."""
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from structured_compress.io.save import CompressedWriter  # noqa: E402

write_part = CompressedWriter.write_part


def write_then_die(self, *args, **kwargs):
    part = write_part(self, *args, **kwargs)
    if len(self.written) == int(os.environ["KILL_AFTER_BLOCKS"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return part


CompressedWriter.write_part = write_then_die
sys.argv = [str(ROOT / "run.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
