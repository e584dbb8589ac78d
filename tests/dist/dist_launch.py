"""Launch a worker script under torchrun (gloo, CPU) from a test and fail with its output on error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DIST = Path(__file__).resolve().parent


def run(cmd: list[str], timeout: float = 600) -> str:
    """Run a command from the repo root on CPU; raise with the tail of its output if it fails."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout


def torchrun(nproc: int, script: str, *args: str, timeout: float = 600) -> str:
    """torchrun --standalone (free rendezvous port) --nproc_per_node nproc tests/dist/<script> args."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(DIST / script), *map(str, args)]
    return run(cmd, timeout)


def python(script: str, *args: str, timeout: float = 600) -> str:
    """A worker as one plain process: no torchrun environment (the single-process path)."""
    return run([sys.executable, str(DIST / script), *map(str, args)], timeout)
