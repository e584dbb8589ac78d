"""Save one checkpoint, then die by SIGKILL in the middle of the next save (test helper, one process).

usage: python tests/dist/kill_save.py OUT_DIR
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_backend, make_model  # noqa: E402

from util.checkpoint import save_checkpoint  # noqa: E402
from util.distributed import DistInfo  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    backend = make_backend(make_model(), info)
    save_checkpoint(backend, out, "step-1", {"global_step": 1, "epoch": 0, "step_in_epoch": 1})
    real_save = backend.save

    def save_then_die(path, async_save=False):
        real_save(path)  # the model file is complete, the trainer state is not written yet
        (Path(path) / "half-written.bin").write_bytes(b"\0" * 1024)
        os.kill(os.getpid(), signal.SIGKILL)

    backend.save = save_then_die
    save_checkpoint(backend, out, "step-2", {"global_step": 2, "epoch": 0, "step_in_epoch": 2})
    raise SystemExit("unreachable: the save above kills this process")


if __name__ == "__main__":
    main()
