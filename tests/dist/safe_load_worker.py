"""One process (1-rank gloo group): write real checkpoints with each backend, or load folders under forced_weights_only.

usage:
    python tests/dist/safe_load_worker.py OUT save KIND [KIND ...]
        KIND in ddp, fsdp, fsdp_async, zero1, zero2, zero3, zero1_bf16: one training step, save_checkpoint
        into OUT/KIND, then verify_checkpoint_dir and reload it into a fresh backend inside
        forced_weights_only (DeepSpeed's and DCP's own loaders, every torch.load forced weights-only).
    python tests/dist/safe_load_worker.py OUT load CKPT_DIR:KIND [...]
        backend.load(CKPT_DIR/state) inside forced_weights_only, without verify_checkpoint_dir first.
Writes OUT/results_<mode>.json; the assertions live in tests/test_safe_load.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import batch, make_backend, make_model, micro_step  # noqa: E402

from util import distributed as du  # noqa: E402
from util.checkpoint import TRAIN, Checkpointer, Value  # noqa: E402
from util.safe_load import forced_weights_only, verify_checkpoint_dir  # noqa: E402


def build(kind: str):
    """A fresh tiny model wrapped by the backend KIND names."""
    name, _, precision = kind.partition("_")
    flags: dict = {"dist": name} if name in ("ddp", "fsdp") else {"dist": "deepspeed", "zero_stage": int(name[-1])}
    if precision in ("bf16", "fp16"):
        flags["precision"] = precision
    info = du.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    return make_backend(make_model(), info, **flags)


def save_and_reload(out: Path, kind: str) -> dict:
    """Train one step, save, verify, reload under forced weights-only: are the weights the saved ones?"""
    backend = build(kind)
    clips, noise = batch([0, 1, 2, 3])
    micro_step(backend, clips, noise)
    backend.step()
    saved = backend.full_model_state_dict()
    checkpointer = Checkpointer(out / kind, async_save=kind == "fsdp_async")
    final = checkpointer.save(backend, "step-1", {TRAIN: Value({"global_step": 1})})
    checkpointer.finish_pending(wait=True)
    fmt = verify_checkpoint_dir(final)
    fresh = build(kind)
    with forced_weights_only(deepspeed=fresh.name == "deepspeed"):
        fresh.load(final / "state")
    loaded = fresh.full_model_state_dict()
    same = sorted(saved) == sorted(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    return {"format": fmt, "checkpoint": str(final), "reloaded_equal": same, "num_tensors": len(saved)}


def load_unverified(spec: str) -> dict:
    """backend.load of a (possibly crafted) folder with only the forced weights-only switch in place."""
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's errors derive from BaseException

    ckpt, kind = spec.rsplit(":", 1)
    backend = build(kind)
    try:
        with forced_weights_only(deepspeed=backend.name == "deepspeed"):
            backend.load(Path(ckpt) / "state")
    except (Exception, CheckpointException) as e:  # reported to the test, which checks it is the weights-only refusal
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def main() -> None:
    out, mode, items = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    run = save_and_reload if mode == "save" else None
    results = {}
    for item in items:
        results[item] = run(out, item) if run else load_unverified(item)
    (out / f"results_{mode}.json").write_text(json.dumps(results, indent=1))
    du.cleanup()


if __name__ == "__main__":
    main()
