"""Crash-safe checkpoints: OUT/checkpoints/<name>/ plus an atomically replaced `latest` symlink.

Layout of one checkpoint directory:
    trainer_state.pt   epoch, step, sampler, lr position, RNG states, backend, world size, config
    config.yaml        the resolved config (for humans)
    state/             the backend's own files: model.pt (DDP), DCP shards (FSDP2), zero/ (DeepSpeed)
CLI (offline, no process group):
    python -m util.checkpoint export OUT/checkpoints/latest weights.pth
    python -m util.checkpoint info OUT/checkpoints/latest
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from util import distributed as du
from util.optim import clean_name

if TYPE_CHECKING:
    from util.parallel import Backend

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """This process's python / numpy / torch / cuda RNG states, as weights_only-loadable values."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- helpers
def _fsync_dir(path: Path) -> None:
    """Make a rename/symlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file under `path` (what other ranks wrote included, on a shared file system)."""
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def _is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith(".tmp") and (path / TRAINER_STATE).is_file()


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Finished checkpoint directories, oldest first (by when their trainer state was written)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if not p.is_symlink() and _is_complete(p)]
    return sorted(found, key=lambda p: ((p / TRAINER_STATE).stat().st_mtime_ns, p.name))


def _point_latest(ckpt_root: Path, name: str) -> None:
    """Replace `latest` atomically: a new symlink under a temp name, then os.replace over the old one."""
    tmp_link = ckpt_root / f".{LATEST}.{os.getpid()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(name, tmp_link)  # relative target: the output folder can be moved
    os.replace(tmp_link, ckpt_root / LATEST)
    _fsync_dir(ckpt_root)


def _prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete the oldest complete checkpoints beyond keep_last, never the one `latest` names."""
    latest = find_latest(ckpt_root.parent)
    done = complete_checkpoints(ckpt_root)
    for old in done[: max(0, len(done) - keep_last)]:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- save / load
# An asynchronous save in flight: (future, tmp dir, final dir, keep_last). Rank 0 finishes it.
_pending: tuple | None = None


def _finalize(tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0: make a fully written `<name>.tmp` the checkpoint `<name>` and point `latest` at it."""
    root = final.parent
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step after a resume: the new save wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _point_latest(root, final.name)
    _prune(root, keep_last)


def finish_pending_save(wait: bool = True) -> None:
    """Complete an asynchronous save: rename it and move `latest` once its data is all written.

    Cheap to call every step with wait=False. Rank 0's DCP future resolves only after every rank's
    shards are written and the metadata is committed, so rank 0 can finish it alone.
    """
    global _pending
    if _pending is None:
        return
    future, tmp, final, keep_last = _pending
    if not wait and not future.done():
        return
    future.result()  # re-raises a failed write here, in the training thread
    _pending = None
    if du.is_main_process():
        _finalize(tmp, final, keep_last)


def save_checkpoint(
    backend: Backend, output_dir: str | Path, name: str, trainer_state: dict, keep_last: int = 3,
    async_save: bool = False,
) -> Path:
    """Collective save into OUT/checkpoints/<name>/ via <name>.tmp/; `latest` moves only once it is complete.

    With `async_save` (FSDP2) the shards are written in the background and the checkpoint is
    finished by `finish_pending_save` (the engine polls it every step, the mains wait at the end).
    """
    global _pending
    finish_pending_save(wait=True)  # one save in flight at a time
    root = Path(output_dir) / "checkpoints"
    tmp, final = root / f"{name}.tmp", root / name
    if du.is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):  # left behind by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    du.barrier()
    future = backend.save(tmp / STATE_DIR, async_save=True) if async_save else backend.save(tmp / STATE_DIR)
    rngs = du.all_gather_object(rng_state())
    if du.is_main_process():
        state = dict(trainer_state)
        state.update(rng=rngs, backend=backend.name, world_size=du.get_world_size(), name=name)
        torch.save(state, tmp / TRAINER_STATE)
        if isinstance(state.get("config"), dict):
            import yaml

            (tmp / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))
    if future is not None:
        _pending = (future, tmp, final, keep_last)
        return final
    du.barrier()  # every rank's shards are written
    if du.is_main_process():
        _finalize(tmp, final, keep_last)
    du.barrier()  # nobody runs on (or gets killed) believing a save exists before `latest` names it
    return final


def find_latest(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names under OUT/checkpoints (or the newest complete one if the link is broken)."""
    root = Path(output_dir) / "checkpoints"
    link = root / LATEST
    if link.is_symlink() or link.exists():
        target = link.resolve()
        if _is_complete(target):
            return target
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_trainer_state(path: str | Path) -> dict:
    """The trainer_state.pt of a checkpoint directory, loaded weights_only."""
    return load_weights_file(Path(path).resolve() / TRAINER_STATE)


def load_checkpoint(backend: Backend, path: str | Path) -> dict:
    """Collective: restore model + optimizer into backend and this rank's RNG; returns the trainer state."""
    path = Path(path).resolve()
    state = read_trainer_state(path)
    if state.get("backend") != backend.name:
        raise ValueError(
            f"{path} was saved by --dist {state.get('backend')}, this run uses --dist {backend.name}; "
            f"export its weights (python -m util.checkpoint export {path} w.pth) to switch backends"
        )
    if backend.name == "deepspeed" and state.get("world_size") != du.get_world_size():
        raise ValueError(
            f"{path} holds DeepSpeed ZeRO partitions for {state.get('world_size')} ranks; resume it on the same "
            f"number of ranks, or export its weights (python -m util.checkpoint export {path} w.pth) and start from those"
        )
    backend.load(path / STATE_DIR)
    rngs = state.get("rng") or []
    rank = du.get_rank()
    if rank < len(rngs) and len(rngs) == du.get_world_size():
        set_rng_state(rngs[rank])  # same layout: continue each rank's own stream exactly
    elif rngs:
        set_rng_state(rngs[0])  # new world size: per-rank streams cannot carry over; data randomness is per sample
    return state


def load_weights_file(path: str | Path) -> dict:
    """torch.load(weights_only=True) with a clear error when the file would need code to unpickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: {Path(path).name} is not a plain weights checkpoint (weights-only "
            f"unpickling failed, it would run or import code: {str(e).splitlines()[0]}). "
            "Re-export it as tensors only."
        ) from None


# ----------------------------------------------------------------------------- offline export
def _detect_format(state_dir: Path) -> str:
    if (state_dir / "model.pt").is_file():
        return "ddp"
    if (state_dir / ".metadata").is_file():
        return "dcp"
    if (state_dir / "zero").is_dir():
        return "deepspeed"
    raise ValueError(f"{state_dir} holds no DDP file, DCP metadata or DeepSpeed 'zero' folder")


def export_weights(ckpt: str | Path, out: str | Path) -> dict:
    """Write {'model': consolidated fp32 state dict with plain names} from any backend's checkpoint."""
    state_dir = Path(ckpt).resolve() / STATE_DIR
    fmt = _detect_format(state_dir)
    if fmt == "ddp":
        sd = load_weights_file(state_dir / "model.pt")["model"]
    elif fmt == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as td:
            dcp_to_torch_save(state_dir, Path(td) / "full.pt")
            sd = load_weights_file(Path(td) / "full.pt")["model"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag="zero")
    sd = {clean_name(k): v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in sd.items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd}, out)
    return sd


def describe(ckpt: str | Path) -> str:
    """One-paragraph summary of a checkpoint directory."""
    path = Path(ckpt).resolve()
    s = read_trainer_state(path)
    keys = ("name", "global_step", "epoch", "step_in_epoch", "backend", "world_size")
    lines = [f"checkpoint: {path}"] + [f"  {k}: {s.get(k)}" for k in keys]
    lines.append(f"  format: {_detect_format(path / STATE_DIR)}")
    lines.append(f"  other keys: {sorted(k for k in s if k not in keys and k != 'rng')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: `export CKPT OUT.pth` or `info CKPT`."""
    parser = argparse.ArgumentParser(prog="python -m util.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="write one consolidated weights file {'model': state_dict}")
    exp.add_argument("checkpoint")
    exp.add_argument("output")
    info = sub.add_parser("info", help="print what a checkpoint holds")
    info.add_argument("checkpoint")
    args = parser.parse_args(argv)
    if args.cmd == "export":
        sd = export_weights(args.checkpoint, args.output)
        print(f"wrote {args.output}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} values")
    else:
        print(describe(args.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())


class TrainingSaver:
    """The mains' save function: the training position (an engine `TrainState`) and the backend as `step-N`.

    Remembers the last step saved, so the epoch loop saves at a stop or an epoch end only when
    `save_every` has not just done it.
    """

    def __init__(self, backend: Backend, args: argparse.Namespace, videos_per_step: int, last_step: int) -> None:
        self.backend, self.args, self.videos_per_step, self.last_step = backend, args, videos_per_step, last_step

    def __call__(self, st) -> None:
        """Save now (collective)."""
        args = self.args
        trainer_state = {
            **st.state_dict(),  # epoch, step_in_epoch, global_step at the top: `util.checkpoint info` shows them
            "sampler": {"epoch": st.epoch, "consumed": st.step_in_epoch * self.videos_per_step},
            "config": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        }
        save_checkpoint(self.backend, args.output_dir, f"step-{st.global_step}", trainer_state,
                        keep_last=args.keep_last, async_save=args.async_save)
        self.last_step = st.global_step

    def save_if_new(self, st) -> None:
        """Save unless this step is already saved."""
        if st.global_step != self.last_step:
            self(st)
