"""Crash-safe checkpoints: OUT/checkpoints/<name>/ plus an atomically replaced `latest` symlink.

Layout of one checkpoint directory:
    trainer_state.pt   epoch, step, sampler, lr position, RNG states, backend, world size, config
    config.yaml        the resolved config (for humans)
    state/             the backend's own files: model.pt (DDP), DCP shards (FSDP2), zero/ (DeepSpeed)
CLI (offline, no process group):
    python -m util.checkpoint export OUT/checkpoints/latest weights.pth
    python -m util.checkpoint info OUT/checkpoints/latest

File reading for imported weights lives here too (`read_weights`: our folders, our exports, official
releases; weights-only); mapping their keys onto a model is `models/convert.py`'s job.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import shutil
import sys
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from util import distributed as du
from util.errors import CheckpointError, MaeError, MissingFileError, UnsafeCheckpointError
from util.optim import clean_name
from util.safe_load import detect_format, forced_weights_only, load_weights_file, verify_checkpoint_dir

if TYPE_CHECKING:
    from util.parallel import Backend

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
log = logging.getLogger(__name__)


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
def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, torch.save's RuntimeError, DCP's CheckpointException."""
    from torch.distributed.checkpoint.api import CheckpointException

    return OSError, RuntimeError, CheckpointException


WRITE_ERRORS = _write_errors()


class CheckpointWriteError(MaeError, RuntimeError):
    """A checkpoint could not be written; the partial folder was removed and `latest` is unchanged."""


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


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


class Checkpointer:
    """Saves `OUT/checkpoints/<name>/` collectively and owns the one asynchronous save in flight."""

    def __init__(self, output_dir: str | Path, keep_last: int = 3, async_save: bool = False) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last, self.async_save = keep_last, async_save
        self._pending: tuple[Future, Path, Path] | None = None  # (future, tmp dir, final dir)

    def finish_pending(self, wait: bool = True) -> None:
        """Complete an asynchronous save: rename it and move `latest` once its data is all written.

        Cheap to call every step with wait=False. Rank 0's DCP future resolves only after every rank's
        shards are written and the metadata is committed, so rank 0 can finish it alone.
        """
        if self._pending is None:
            return
        future, tmp, final = self._pending
        if not wait and not future.done():
            return
        self._pending = None
        try:
            future.result()  # re-raises a failed write here, in the training thread
        except WRITE_ERRORS as exc:
            raise self._write_error(exc, tmp) from exc
        if du.is_main_process():
            _finalize(tmp, final, self.keep_last)

    def _write_error(self, exc: BaseException, tmp: Path) -> CheckpointWriteError:
        """Remove a partial folder and describe the failure (disk space when that is the cause)."""
        written = _tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        latest = find_latest(self.root.parent)
        need = max(_tree_bytes(latest) if latest else 0, written)
        free = shutil.disk_usage(self.root).free
        # torch.save reports a full disk as a RuntimeError from its zip writer, not as ENOSPC
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) or free < need
        if full:
            return CheckpointWriteError(
                f"no space left on device while writing checkpoint {tmp.name.removesuffix('.tmp')} "
                f"({need / 2**20:.0f} MB needed, {free / 2**20:.0f} MB free in {self.root}); the partial folder "
                f"was removed and `latest` still names {latest.name if latest else 'nothing'}. Free space or "
                f"lower --keep_last, then rerun the same command to resume")
        return CheckpointWriteError(f"writing checkpoint {tmp} failed ({exc}); the partial folder was removed "
                                    f"and `latest` still names {latest.name if latest else 'nothing'}")

    def save(self, backend: Backend, name: str, trainer_state: dict) -> Path:
        """Collective save into OUT/checkpoints/<name>/ via <name>.tmp/; `latest` moves only once it is complete.

        With `async_save` (FSDP2) the shards are written in the background and the checkpoint is
        finished by `finish_pending` (the loop polls it every step and waits at the end). A failed
        write on any rank (a full disk) removes the partial folder and raises `CheckpointWriteError`
        on every rank; the previous checkpoint stays `latest`.
        """
        self.finish_pending(wait=True)  # one save in flight at a time
        tmp, final = self.root / f"{name}.tmp", self.root / name
        if du.is_main_process():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):  # left behind by a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        du.barrier()
        future, error = None, None
        try:
            future = backend.save(tmp / STATE_DIR, async_save=self.async_save)
            rngs = du.all_gather_object(rng_state())
            if du.is_main_process():
                state = dict(trainer_state)
                state.update(rng=rngs, backend=backend.name, world_size=du.get_world_size(), name=name)
                torch.save(state, tmp / TRAINER_STATE)
                if isinstance(state.get("config"), dict):
                    import yaml

                    (tmp / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))
        except WRITE_ERRORS as exc:
            error = exc
        if not du.all_agree(error is None):  # one rank's full disk must not leave the others waiting
            raise self._write_error(error or OSError(errno.EIO, "another rank failed to write"), tmp)
        if future is not None:
            self._pending = (future, tmp, final)
            return final
        if du.is_main_process():
            _finalize(tmp, final, self.keep_last)
        du.barrier()  # nobody runs on (or gets killed) believing a save exists before `latest` names it
        return final


def save_checkpoint(backend: Backend, output_dir: str | Path, name: str, trainer_state: dict,
                    keep_last: int = 3) -> Path:
    """One synchronous collective save (see `Checkpointer.save`)."""
    return Checkpointer(output_dir, keep_last).save(backend, name, trainer_state)


def find_latest(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names under OUT/checkpoints (or the newest complete one if the link is broken)."""
    root = Path(output_dir) / "checkpoints"
    link = root / LATEST
    if link.is_symlink() or link.exists():
        try:
            target = link.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or a loop (`latest -> latest`): both fall back alike
            target = None
        if target is not None and _is_complete(target):
            return target
    done = complete_checkpoints(root)
    return done[-1] if done else None


def find_resumable(output_dir: str | Path) -> Path | None:
    """What auto-resume continues from: `latest`, else the newest intact checkpoint, each skip logged with why.

    A damaged checkpoint (truncated, not a torch file, a FIFO) is skipped; one that asks to run code is
    refused (someone changed it). Checkpoints that are all damaged are an error, never a fresh start
    over the run's outputs.
    """
    root = Path(output_dir) / "checkpoints"
    first = find_latest(output_dir)
    older = [p.resolve() for p in reversed(complete_checkpoints(root))]
    skipped: list[str] = []
    for ckpt in dict.fromkeys(([first] if first else []) + older):
        try:
            verify_checkpoint_dir(ckpt)
            read_trainer_state(ckpt)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", ckpt, exc)
            skipped.append(f"{ckpt.name}: {exc}")
            continue
        if skipped:
            log.warning("resuming from %s, the newest intact checkpoint (skipped %s)", ckpt,
                        ", ".join(s.split(":")[0] for s in skipped))
        return ckpt
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {root} to resume from ({'; '.join(skipped)}); move the "
                              "damaged folders out of it to start over there, or use a new --output_dir")
    return None


TRAINER_KEYS = ("backend", "world_size")  # what every save adds to the trainer state


def read_trainer_state(path: str | Path) -> dict:
    """The trainer_state.pt of a checkpoint directory, loaded weights_only; not a saved trainer state -> error."""
    file = Path(os.path.realpath(path)) / TRAINER_STATE
    state = load_weights_file(file)
    missing = [k for k in TRAINER_KEYS if k not in state] if isinstance(state, dict) else []
    if not isinstance(state, dict) or missing:
        what = f"a {type(state).__name__}" if not isinstance(state, dict) else f"a dict without {', '.join(missing)}"
        raise CheckpointError(f"{file} holds {what}, not a trainer state this project saved (a dict with "
                              f"{', '.join(TRAINER_KEYS)}, global_step, ...): it was replaced or damaged; resume "
                              "from another checkpoint (--resume OUT/checkpoints/step-N) or use a new --output_dir")
    return state


def load_checkpoint(backend: Backend, path: str | Path) -> dict:
    """Collective: restore model + optimizer into backend and this rank's RNG; returns the trainer state."""
    path = Path(os.path.realpath(path))  # never raises on a symlink loop; the checks below name it
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such checkpoint folder (a dangling or looping symlink?)")
    if not path.is_dir():
        raise ValueError(f"--resume takes a checkpoint folder (OUT/checkpoints/step-N), but {path} is a file; "
                         f"to start a run from weights use --init_from {path} (pretraining) or --finetune {path}")
    verify_checkpoint_dir(path)  # every rank, before any file reaches DCP or DeepSpeed
    state = read_trainer_state(path)
    if state.get("backend") != backend.name:
        raise ValueError(
            f"{path} was saved by --dist {state.get('backend')}, this run uses --dist {backend.name}; resume with "
            f"--dist {state.get('backend')}, or export its weights (python -m util.checkpoint export {path} w.pth) "
            f"and start a new run from them with --init_from w.pth (--finetune w.pth for fine-tuning)"
        )
    if backend.name == "deepspeed" and state.get("world_size") != du.get_world_size():
        raise ValueError(
            f"{path} holds DeepSpeed ZeRO partitions for {state.get('world_size')} ranks and cannot be resharded; "
            f"resume it on {state.get('world_size')} ranks (torchrun --nproc_per_node {state.get('world_size')} ...), "
            f"or export its weights (python -m util.checkpoint export {path} w.pth) and start a new run in a new "
            f"--output_dir with --init_from w.pth (weights only: a fresh optimizer and schedule)"
        )
    with forced_weights_only(deepspeed=backend.name == "deepspeed"):  # the libraries' own loads too
        backend.load(path / STATE_DIR)
    rngs = state.get("rng") or []
    rank = du.get_rank()
    if rank < len(rngs) and len(rngs) == du.get_world_size():
        set_rng_state(rngs[rank])  # same layout: continue each rank's own stream exactly
    elif rngs:
        set_rng_state(rngs[0])  # new world size: per-rank streams cannot carry over; data randomness is per sample
    return state


CONTAINER_KEYS = ("model", "model_state", "module", "state_dict")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a weights file or one of our checkpoint/output folders, weights-only.

    Files: our exports `{"model": sd}`, the official MAE-ST release (`model`), PySlowFast `.pyth`
    (`model_state`), VideoMAE (`module`/`model`) or a bare state dict. Folders: our checkpoint folder,
    or an output folder (its `latest`), consolidated from any backend. Wrapper prefixes (DDP's
    `module.`, checkpoint and compile wrappers) are stripped, so the names are plain-model names.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    if path.is_dir():
        # lexists: a FIFO or dangling trainer_state.pt still marks a checkpoint folder, which the check then names
        ckpt = path if os.path.lexists(path / TRAINER_STATE) else find_latest(path)
        if ckpt is None:
            raise MissingFileError(f"{path} is neither a checkpoint folder nor an output folder with checkpoints")
        with tempfile.TemporaryDirectory() as td:
            obj = {"model": export_weights(ckpt, Path(td) / "weights.pth")}
    else:
        obj = load_weights_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of weights (a state dict, or a dict "
                              f"with one of the keys {CONTAINER_KEYS})")
    for key in CONTAINER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if torch.is_tensor(v) and not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: weight names must be strings, but {len(bad)} are not (e.g. {bad[0]!r:.60}, a "
                              f"{type(bad[0]).__name__}); it is not a state dict: export it again")
    sd = {clean_name(k): v for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    return sd


# ----------------------------------------------------------------------------- offline export
def check_destination(out: str | Path, overwrite: bool = False) -> Path:
    """Where an export may write: never inside a checkpoint folder, an existing file only with `overwrite`."""
    dest = Path(os.path.realpath(out))  # a symlinked destination counts where it leads
    for folder in dest.parents:
        if os.path.lexists(folder / TRAINER_STATE):
            raise CheckpointError(f"refusing to write {out}: it is inside the checkpoint folder {folder}, whose "
                                  "files it could overwrite; write the export elsewhere (e.g. OUT/weights.pth)")
    if dest.is_dir():
        raise CheckpointError(f"refusing to write {out}: it is a folder; give a file name (e.g. {out}/weights.pth)")
    if os.path.lexists(out) and not overwrite:
        raise CheckpointError(f"refusing to write {out}: the file exists; pass --overwrite to replace it")
    return dest


def _model_of(obj: object, source: Path) -> dict:
    """The 'model' state dict of a backend's saved state, or a CheckpointError naming `source`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        what = type(obj).__name__ if not isinstance(obj, dict) else f"dict without a 'model' dict ({sorted(map(str, obj))[:5]})"
        raise CheckpointError(f"{source} holds a {what}, not the saved model state; the checkpoint is damaged: resume "
                              "or export another one")
    return obj["model"]


def export_weights(ckpt: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write {'model': consolidated fp32 state dict with plain names} from any backend's checkpoint, atomically."""
    dest = check_destination(out, overwrite)  # before the (possibly long) consolidation
    state_dir = Path(os.path.realpath(ckpt)) / STATE_DIR
    fmt = verify_checkpoint_dir(ckpt)  # nothing in the folder may run code
    if fmt == "ddp":
        sd = _model_of(load_weights_file(state_dir / "model.pt"), state_dir / "model.pt")
    elif fmt == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as td:
            with forced_weights_only():
                dcp_to_torch_save(state_dir, Path(td) / "full.pt")
            sd = _model_of(load_weights_file(Path(td) / "full.pt"), state_dir)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with forced_weights_only(deepspeed=True):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag="zero")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{state_dir}: the model state holds {len(bad)} entries that are not name -> tensor "
                              f"(e.g. {str(bad[0])[:60]!r}); the checkpoint is damaged: resume or export another one")
    sd = {clean_name(k): v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in sd.items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.partial"  # the old file stays whole until the rename
    try:
        torch.save({"model": sd}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return sd


def describe(ckpt: str | Path) -> str:
    """One-paragraph summary of a checkpoint directory."""
    path = Path(os.path.realpath(ckpt))
    if not os.path.lexists(path / TRAINER_STATE):
        raise CheckpointError(f"{ckpt} is not a checkpoint folder (no {TRAINER_STATE} in it); give "
                              "OUT/checkpoints/step-N or OUT/checkpoints/latest")
    s = read_trainer_state(path)
    keys = ("name", "global_step", "epoch", "step_in_epoch", "backend", "world_size")
    lines = [f"checkpoint: {path}"] + [f"  {k}: {s.get(k)}" for k in keys]
    lines.append(f"  format: {detect_format(path / STATE_DIR)}")
    lines.append(f"  other keys: {sorted(k for k in s if k not in keys and k != 'rng')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: `export CKPT OUT.pth` or `info CKPT`."""
    parser = argparse.ArgumentParser(prog="python -m util.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="write one consolidated weights file {'model': state_dict}")
    exp.add_argument("checkpoint")
    exp.add_argument("output")
    exp.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    info = sub.add_parser("info", help="print what a checkpoint holds")
    info.add_argument("checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "export":
            sd = export_weights(args.checkpoint, args.output, overwrite=args.overwrite)
            print(f"wrote {args.output}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} values")
        else:
            print(describe(args.checkpoint))
    except MaeError as exc:  # a refusal is a message, not a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
