"""Open checkpoints without running code: every file the project reads is checked before a library unpickles it.

Plain pickle runs whatever a file asks for. Three libraries we hand folders to unpickle with it:
- torch DCP reads `.metadata` with `pickle.load`, and non-tensor entries of its data files
  (optimizer hyper-parameters) with `torch.load(weights_only=False)`;
- DeepSpeed's `load_checkpoint` and `zero_to_fp32` read every `*_states.pt` with `weights_only=False`.
So a folder must pass `verify_checkpoint_dir` before it reaches them:
- DCP `.metadata` is read by an unpickler that admits only DCP's own metadata types (and the torch
  types they hold); the non-tensor entries and every other `.pt` file are read with
  `torch.load(weights_only=True)`; DeepSpeed files also admit the four DeepSpeed types its own
  ZeRO checkpoints hold (`DEEPSPEED_SAFE_GLOBALS`), nothing that can run code.
`forced_weights_only()` is the second lock: around DeepSpeed's or DCP's own load it makes every
`torch.load` inside weights-only, so a file the scan did not predict (or one swapped after it) is refused too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import pickle
import re
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from util.errors import CheckpointError, UnsafeCheckpointError

# Layout names; util/checkpoint.py and util/parallel.py use the same ones (a test checks). They are
# repeated here because checkpoint.py imports this module, so this module cannot import it back.
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.pt"
DDP_FILE = "model.pt"
DCP_METADATA = ".metadata"
DEEPSPEED_TAG = "zero"

# DeepSpeed classes found in the ZeRO-1/2/3 checkpoints DeepSpeed writes (fp32, bf16; fp16 adds the
# dynamic scaler). Each is rebuilt by __new__ plus an attribute update, runs no code of its own while
# loading and holds only numbers, tensors, dtypes and strings: see `deepspeed_safe_globals`.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # static loss scale {cur_scale, dynamic}
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16: scale, window, hysteresis counters, dtype
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # int enum: 0..3
    "deepspeed.utils.tensor_fragment.fragment_address",  # dataclass (numel, start) of ZeRO-1/2 param slices
)


# Admitted in single weights files only (the original training code's `args`); nothing else is added.
PLAIN_CONTAINERS = [argparse.Namespace]


# ----------------------------------------------------------------------------- what may be read
def _kind(mode: int) -> str:
    """'a FIFO', 'a device', ... for a stat mode that is not a regular file."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a directory" if stat.S_ISDIR(mode) else "not a regular file"


def _stat(path: Path) -> os.stat_result:
    """os.stat with a CheckpointError naming the file (a dangling or looping symlink, no permission)."""
    try:
        return os.stat(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None


def inside(path: str | Path, root: str | Path) -> Path:
    """The real location of `path`; refused (target named) when a symlink takes it out of folder `root`."""
    path, root = Path(path), Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))  # never raises, even on a symlink loop (stat reports that later)
    if real != root and root not in real.parents:
        target = os.readlink(path) if path.is_symlink() else real
        raise UnsafeCheckpointError(f"refusing to read {path}: it leads to {target} ({real}), outside the checkpoint "
                                    f"folder {root}; a checkpoint folder holds its own files (copy them in instead)")
    return real


def open_regular(path: str | Path) -> BinaryIO:
    """Open `path` for reading only if it is a regular file: a FIFO or device is refused, never waited on."""
    path = Path(path)
    mode = _stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"refusing to read {path}: it is {_kind(mode)}, not a regular file (reading it "
                              "could block forever); replace it with the real file")
    try:  # O_NONBLOCK: if it was swapped for a FIFO since the stat, the open still returns at once
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"cannot open {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"refusing to read {path}: it is {_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _torch_load(f: BinaryIO, path: Path, mmap: bool = False) -> Any:
    """torch.load(weights_only=True) of an open regular file; mmap through /proc so no other file is opened."""
    proc = f"/proc/self/fd/{f.fileno()}"
    if mmap and os.path.exists(proc):  # mmap needs a file name: this one is the file already checked
        return torch.load(proc, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(f, map_location="cpu", weights_only=True)


def _unreadable(path: Path, error: Exception, advice: str = "") -> CheckpointError:
    """The error for a torch file that failed to load: code it asked for (UnsafeCheckpointError), else damage."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and re.search(r"GLOBAL ([\w.]+)", text):
        return UnsafeCheckpointError(
            f"refusing to load {path}: unpickling it needs `{_offending_global(error)}`, which a checkpoint of this "
            f"project never contains (it could run code). {advice}".rstrip())
    return CheckpointError(f"cannot read {path} as a torch file ({_offending_global(error)}): truncated, damaged or "
                           "not a torch file; save or export it again")


# ----------------------------------------------------------------------------- single files
def load_weights_file(path: str | Path) -> Any:
    """torch.load(weights_only=True) of a regular file; code it asks for, truncation or damage -> CheckpointError."""
    path = Path(path)
    with open_regular(path) as f:
        try:
            # mae_st's and VideoMAE's save_model store their flags as `args`: an argparse.Namespace is rebuilt
            # from its __dict__ (no code of its own), and its values pass the same weights-only checks.
            with torch.serialization.safe_globals(PLAIN_CONTAINERS):
                return _torch_load(f, path)
        except pickle.UnpicklingError as e:
            # The weights-only unpickler refused an instruction: a payload in a plain pickle shows up as an
            # unsupported operand, not always as a GLOBAL, so any refusal counts as "may run code".
            raise UnsafeCheckpointError(
                f"refusing to load {path}: {path.name} is not a plain weights checkpoint (weights-only "
                f"unpickling failed, it would run or import code, or it is no torch file: `{_offending_global(e)}`). "
                "Re-export it as tensors only."
            ) from None
        except Exception as e:  # torch's zip reader, the unpickler, a short read: all mean a damaged file
            raise _unreadable(path, e) from None


def _checkpoint_of(state_dir: Path) -> Path:
    """The checkpoint folder (`.../step-N`) a state folder belongs to, for the export command in messages."""
    return state_dir.parent if state_dir.name == STATE_DIR else state_dir


def _advice(ckpt: Path) -> str:
    """What to do instead: the same sentence for every refusal."""
    return ("Only load checkpoint folders your own runs wrote. For weights from elsewhere, use a consolidated "
            f"file made by someone who trusts the folder (python -m util.checkpoint export {ckpt} weights.pth) "
            "and pass that file (e.g. --finetune weights.pth).")


def _offending_global(error: Exception) -> str:
    """The global a weights-only load refused ('posix.system'), or the error's first line."""
    text = str(error).strip()
    found = re.search(r"GLOBAL ([\w.]+)", text)  # torch's weights-only message: "... GLOBAL posix.system ..."
    if found:
        return found.group(1)
    detail = text.split("WeightsUnpickler error:", 1)  # torch's preamble first, then what it refused
    if len(detail) == 2 and detail[1].strip():
        return detail[1].strip().splitlines()[0][:200]
    return text.splitlines()[0][:200] if text else type(error).__name__


def verify_torch_file(path: str | Path, extra_globals: list | tuple = (), advice: str = "") -> None:
    """Unpickle `path` weights-only (plus `extra_globals`), memory-mapped so no tensor data is read; raise if refused."""
    path = Path(path)
    with open_regular(path) as f:
        try:
            is_zip = zipfile.is_zipfile(f)
            f.seek(0)
            with torch.serialization.safe_globals(list(extra_globals)):
                # mmap: only the pickle is parsed; the (possibly GB-sized) storages are never read here.
                _torch_load(f, path, mmap=is_zip)
        except Exception as e:  # code it asks for, or any sign of a damaged file (the unpickler's IndexError too)
            raise _unreadable(path, e, advice) from None


# ----------------------------------------------------------------------------- torch DCP
def _dcp_metadata_types() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for everything DCP's `.metadata` pickle may name; nothing else loads."""
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint import metadata as md

    allowed: list[Any] = [
        md.Metadata, md.TensorStorageMetadata, md.BytesStorageMetadata, md.ChunkStorageMetadata,
        md.TensorProperties, md.MetadataIndex, md.StorageMeta, md._MEM_FORMAT_ENCODING,
        filesystem._StorageInfo,
        torch.Size,
        # Pure path objects: StorageMeta.checkpoint_id may be the Path the checkpoint was saved to.
        pathlib.PurePosixPath, pathlib.PosixPath,
    ]
    table = {(obj.__module__, obj.__qualname__): obj for obj in allowed}
    for cls in (pathlib.PurePosixPath, pathlib.PosixPath):
        for module in ("pathlib", "pathlib._local"):  # Python >= 3.13 defines them in pathlib._local
            table[(module, cls.__name__)] = cls
    # torch.layout pickles as _get_layout('torch.strided'): a lookup in a table of torch's layouts.
    get_layout = getattr(torch.serialization, "_get_layout", None)
    if get_layout is not None:
        table[("torch.serialization", "_get_layout")] = get_layout
    for name, value in vars(torch).items():  # dtypes pickle as the attribute `torch.<name>`
        if isinstance(value, torch.dtype):
            table[("torch", name)] = value
    return table


class _DcpMetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only DCP metadata types (never imports a module the file names)."""

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file)
        self.source, self.allowed = source, _dcp_metadata_types()
        self.advice = _advice(_checkpoint_of(source.parent))

    def find_class(self, module: str, name: str) -> Any:
        obj = self.allowed.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"refusing to load {self.source}: this DCP metadata file asks for `{module}.{name}`, which is "
                "not one of torch DCP's metadata types; unpickling it could run code. torch DCP did not write "
                f"this file as it is (crafted or corrupted). {self.advice}"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"refusing to load {self.source}: DCP metadata holds no persistent ids")


def verify_dcp_metadata(checkpoint_dir: str | Path) -> Any:
    """Read `<dir>/.metadata` with the DCP-types-only unpickler; returns the Metadata or raises UnsafeCheckpointError."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(checkpoint_dir) / DCP_METADATA
    with open_regular(path) as f:
        try:
            meta = _DcpMetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # malformed pickle, or an admitted type given arguments it rejects
            raise UnsafeCheckpointError(f"cannot read {path} as DCP metadata: {_offending_global(e)}") from None
    if not isinstance(meta, Metadata):
        raise UnsafeCheckpointError(f"refusing to load {path}: it holds a {type(meta).__name__}, not DCP Metadata")
    return meta


def verify_dcp_checkpoint(checkpoint_dir: str | Path) -> None:
    """Metadata as above; every data reference inside the folder; every non-tensor entry loads weights-only."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    root = Path(checkpoint_dir).resolve()
    meta = verify_dcp_metadata(root)
    byte_fqns = {fqn for fqn, m in meta.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)}
    for index, info in (meta.storage_data or {}).items():
        rel = Path(str(info.relative_path))
        data = (root / rel).resolve()
        if rel.is_absolute() or ".." in rel.parts or root not in data.parents:
            raise UnsafeCheckpointError(f"refusing to load {root}: its metadata points outside the folder "
                                        f"({info.relative_path!r} for {index.fqn})")
        open_regular(data).close()  # DCP's reader opens every data file: none may be a FIFO
        if index.fqn not in byte_fqns:
            continue  # tensors: DCP's reader already loads them with weights_only=True
        if info.transform_descriptors:
            raise UnsafeCheckpointError(f"refusing to load {root}: entry {index.fqn} is stored through "
                                        f"{list(info.transform_descriptors)}, which this project never writes")
        with open_regular(data) as f:
            f.seek(int(info.offset))
            blob = f.read(int(info.length))
        try:
            # DCP's planner would torch.load this blob with weights_only=False: try it weights-only first.
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"refusing to load {data}: its entry {index.fqn} needs `{_offending_global(e)}` to unpickle, "
                f"which DCP never writes (it could run code). {_advice(_checkpoint_of(root))}"
            ) from None
        except Exception as e:  # a damaged blob: torch's reader raises many types
            raise CheckpointError(f"cannot read entry {index.fqn} of {data}: {_offending_global(e)}") from None


# ----------------------------------------------------------------------------- DeepSpeed
def deepspeed_safe_globals() -> list[Any]:
    """The classes of DEEPSPEED_SAFE_GLOBALS, imported from the installed DeepSpeed (absent ones skipped)."""
    import importlib

    found = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # an older/newer DeepSpeed without that class cannot have written it either
    return found


def checkpoint_files(top: str | Path, root: str | Path) -> Iterator[Path]:
    """Every regular file under `top` (symlinks followed while they stay inside `root`), each real folder once.

    Bounded by construction: only folders inside `root` are entered, each at most once (a symlink loop
    ends there); a symlink out of `root` and anything that is neither a folder nor a regular file (a
    FIFO, a device) is refused naming it, never opened.
    """
    seen: set[Path] = set()
    stack = [Path(top)]
    while stack:
        folder = stack.pop()
        real = inside(folder, root)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            path = Path(entry.path)
            mode = _stat(inside(path, root)).st_mode
            if stat.S_ISDIR(mode):
                stack.append(path)
            elif stat.S_ISREG(mode):
                yield path
            else:
                raise CheckpointError(f"refusing to read {path}: it is {_kind(mode)}, not a regular file (reading it "
                                      "could block forever); remove it from the checkpoint folder")


def verify_deepspeed_dir(state_dir: str | Path, tag: str = DEEPSPEED_TAG, root: str | Path | None = None) -> None:
    """Every file under `<state_dir>/<tag>/` (inside `root`) loads weights-only with DeepSpeed's safe globals, or raise."""
    state_dir = Path(state_dir)
    tag_dir = state_dir / tag
    if not tag_dir.is_dir():
        raise UnsafeCheckpointError(f"{state_dir} has no DeepSpeed checkpoint folder {tag!r}")
    advice = f"DeepSpeed would unpickle it with weights_only=False. {_advice(_checkpoint_of(state_dir))}"
    safe = deepspeed_safe_globals()
    # Every file, whatever its name: DeepSpeed picks files by glob patterns and config switches
    # (bf16 prefixes, universal checkpoints in <tag>/zero/, MoE experts) that a name list would miss.
    for path in checkpoint_files(tag_dir, root if root is not None else state_dir):
        verify_torch_file(path, safe, advice)


# ----------------------------------------------------------------------------- one entry point
def detect_format(state_dir: str | Path) -> str:
    """'ddp' (model.pt), 'dcp' (.metadata) or 'deepspeed' (zero/ folder) for a checkpoint's state folder."""
    state_dir = Path(state_dir)
    if (state_dir / DDP_FILE).is_file():
        return "ddp"
    if (state_dir / DCP_METADATA).is_file():
        return "dcp"
    if (state_dir / DEEPSPEED_TAG).is_dir():
        return "deepspeed"
    raise CheckpointError(f"{state_dir} holds no DDP file, DCP metadata or DeepSpeed 'zero' folder: not a checkpoint "
                          "of this project")


def verify_checkpoint_dir(path: str | Path) -> str:
    """Check a checkpoint folder (`.../step-N`, with trainer_state.pt and state/) or its state/ folder; returns the format.

    Raises UnsafeCheckpointError, naming the file and what it asked for, before any library reads it.
    """
    path = Path(path)
    root = Path(os.path.realpath(path))  # the folder itself may be a symlink (`latest`): its target is the root
    if not root.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (it is {'missing' if not os.path.lexists(path) else 'not a folder'}); "
                              "give OUT/checkpoints/step-N or OUT/checkpoints/latest")
    state_dir = root / STATE_DIR if os.path.lexists(root / STATE_DIR) else root
    inside(state_dir, root)
    advice = _advice(_checkpoint_of(state_dir))
    if os.path.lexists(root / TRAINER_STATE):
        verify_torch_file(inside(root / TRAINER_STATE, root), advice=advice)
    for name in (DDP_FILE, DCP_METADATA):  # a FIFO under a layout name is refused, not taken for "absent"
        if os.path.lexists(state_dir / name):
            open_regular(inside(state_dir / name, root)).close()
    fmt = detect_format(state_dir)
    if fmt == "ddp":
        verify_torch_file(state_dir / DDP_FILE, advice=advice)
    elif fmt == "dcp":
        verify_dcp_checkpoint(state_dir)
    else:
        verify_deepspeed_dir(state_dir, root=root)
    return fmt


@contextlib.contextmanager
def forced_weights_only(deepspeed: bool = False) -> Iterator[None]:
    """Inside: every torch.load is weights-only, even one that asks for weights_only=False (DeepSpeed, DCP).

    `deepspeed=True` also admits DEEPSPEED_SAFE_GLOBALS for the duration. Uses torch's own switch,
    TORCH_FORCE_WEIGHTS_ONLY_LOAD, which torch.load reads at every call. It does not cover DCP's
    `.metadata` (plain pickle, not torch.load): call verify_checkpoint_dir first.
    """
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set is an error in torch.load
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals() if deepspeed else []):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
