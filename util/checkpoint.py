"""Crash-safe checkpoints: OUT/checkpoints/<name>/ plus an atomically replaced `latest` symlink.

A checkpoint holds the backend's model and optimizer and a dict of stateful objects, each with
`state_dict()` / `load_state_dict()` (torchtitan's CheckpointManager shape). The Trainer's are
"train" (util/engine.TrainState), "sampler" (its position), "rng" (util/rng_state.RankRngState),
"config" (a `Value`) and "task" (a task's own extras, when it defines them).

Layout of one checkpoint directory:
    trainer_state.pt   the "train" entry's keys at the top (epoch, step_in_epoch, global_step, consumed:
                       what `info` and tools read), every other entry under its key (sampler, rng,
                       config, task), then backend, world size and name
    config.yaml        the resolved config (for humans)
    state/             the backend's own files: model.pt (DDP), DCP shards (FSDP2), zero/ (DeepSpeed)

Weight import and export live in util/weights.py, RNG state in util/rng_state.py, and the offline
command line in util/checkpoint_cli.py, which this module runs as a script:
    python -m util.checkpoint export OUT/checkpoints/latest weights.pth
    python -m util.checkpoint info OUT/checkpoints/latest
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from util import distributed as du
from util.errors import CheckpointError, MaeError, UnsafeCheckpointError
from util.rng_state import RankRngState
from util.safe_load import forced_weights_only, load_weights_file, verify_checkpoint_dir

if TYPE_CHECKING:
    from util.parallel import Backend

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
TRAIN = "train"  # the entry whose keys sit at the top of trainer_state.pt
META_KEYS = ("backend", "world_size", "name")  # what every save adds
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- stateful objects
@runtime_checkable
class Stateful(Protocol):
    """What a checkpoint entry is: its state as plain, weights_only-loadable values, and back."""

    def state_dict(self) -> Any:
        """The object's state (tensors, numbers, strings, lists, dicts)."""

    def load_state_dict(self, state: Any) -> None:
        """Restore what `state_dict` returned."""


class Value:
    """A plain value as a checkpoint entry (e.g. the run's config); `value` holds what was loaded."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def state_dict(self) -> Any:
        """The value itself."""
        return self.value

    def load_state_dict(self, state: Any) -> None:
        """Keep the saved value."""
        self.value = state


def trainer_state_file(entries: Mapping[str, Any], backend_name: str, world_size: int, name: str) -> dict:
    """What trainer_state.pt holds: the "train" entry flat, the others under their keys, then backend, world size, name."""
    top = dict(entries.get(TRAIN) or {})
    others = {k: v for k, v in entries.items() if k != TRAIN}
    clash = sorted((set(top) & set(others)) | ((set(top) | set(others)) & set(META_KEYS)))
    if clash:
        raise ValueError(f"checkpoint entries clash on {clash}: each name may be used once, and not as one of "
                         f"{META_KEYS}")
    return {**top, **others, "backend": backend_name, "world_size": world_size, "name": name}


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

    def save(self, backend: Backend, name: str, states: Mapping[str, Stateful]) -> Path:
        """Collective save of the backend and `states` into OUT/checkpoints/<name>/; `latest` moves once complete.

        Every rank calls each object's `state_dict()` (some gather, e.g. the RNG entry); rank 0 writes
        them to trainer_state.pt (the layout above). The files go to <name>.tmp/ first.

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
            entries = {key: obj.state_dict() for key, obj in states.items()}
            state = trainer_state_file(entries, backend.name, du.get_world_size(), name)  # every rank: a clash raises
            if du.is_main_process():
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
    """One synchronous collective save of the backend, a plain `trainer_state` dict (top level) and the RNG."""
    states = {TRAIN: Value(trainer_state), "rng": RankRngState()}
    return Checkpointer(output_dir, keep_last).save(backend, name, states)


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


def _refuse_resume(path: Path, key: str, why: str) -> CheckpointError:
    """Why `path` cannot resume, and the command that starts a new run from its weights instead."""
    return CheckpointError(
        f"{path} cannot be resumed by this code: its {key!r} state {why}. Start a new run from its weights in a new "
        f"--output_dir with --init_from {path} (pretraining) or --finetune {path} (fine-tuning): weights only, a "
        "fresh optimizer and schedule")


def load_checkpoint(backend: Backend, path: str | Path, states: Mapping[str, Stateful] | None = None) -> dict:
    """Collective: restore model + optimizer into backend and each of `states` (default: the RNG only).

    Returns the whole trainer state as saved. A checkpoint without an entry that `states` asks for is
    refused before anything is loaded, one whose entry an object cannot take when it is restored; both
    messages name the `--init_from` command that starts a new run from its weights.
    """
    states = {"rng": RankRngState()} if states is None else states
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
    for key in states:
        if key != TRAIN and key not in state:
            raise _refuse_resume(path, key, "is missing (saved by another version of this code)")
    with forced_weights_only(deepspeed=backend.name == "deepspeed"):  # the libraries' own loads too
        backend.load(path / STATE_DIR)
    for key, obj in states.items():
        try:
            obj.load_state_dict(state if key == TRAIN else state[key])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise _refuse_resume(path, key, f"does not fit ({type(exc).__name__}: {exc})") from exc
    return state


# Moved to their own modules; still importable from here (the mains and older scripts do).
_MOVED = {"read_weights": "util.weights", "export_weights": "util.weights", "check_destination": "util.weights",
          "CONTAINER_KEYS": "util.weights", "describe": "util.checkpoint_cli", "rng_state": "util.rng_state",
          "set_rng_state": "util.rng_state"}


def __getattr__(name: str) -> Any:
    """Lazy re-exports of the names that moved (importing them eagerly would be an import cycle)."""
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # python -m util.checkpoint export|info ...
    from util.checkpoint_cli import main

    sys.exit(main())
