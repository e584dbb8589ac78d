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
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

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


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that could run code (or is not what its name says) was refused before use."""


# ----------------------------------------------------------------------------- single files
def load_weights_file(path: str | Path) -> dict:
    """torch.load(weights_only=True) with a clear error when the file would need code to unpickle."""
    try:
        # mae_st's and VideoMAE's save_model store their flags as `args`: an argparse.Namespace is rebuilt
        # from its __dict__ (no code of its own), and its values pass the same weights-only checks.
        with torch.serialization.safe_globals(PLAIN_CONTAINERS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: {Path(path).name} is not a plain weights checkpoint (weights-only "
            f"unpickling failed, it would run or import code: `{_offending_global(e)}`). "
            "Re-export it as tensors only."
        ) from None


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
    return text.splitlines()[0] if text else type(error).__name__


def verify_torch_file(path: str | Path, extra_globals: list | tuple = (), advice: str = "") -> None:
    """Unpickle `path` weights-only (plus `extra_globals`), memory-mapped so no tensor data is read; raise if refused."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            # mmap: only the pickle is parsed; the (possibly GB-sized) storages are never read here.
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: unpickling it needs `{_offending_global(e)}`, which a checkpoint of "
            f"this project never contains (it could run code). {advice}".rstrip()
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UnsafeCheckpointError(f"cannot read {path} as a torch file ({_offending_global(e)}): "
                                    "truncated or not a checkpoint file") from None


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
    with open(path, "rb") as f:
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
        if index.fqn not in byte_fqns:
            continue  # tensors: DCP's reader already loads them with weights_only=True
        if info.transform_descriptors:
            raise UnsafeCheckpointError(f"refusing to load {root}: entry {index.fqn} is stored through "
                                        f"{list(info.transform_descriptors)}, which this project never writes")
        with open(data, "rb") as f:
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
        except (RuntimeError, EOFError) as e:
            raise UnsafeCheckpointError(f"cannot read entry {index.fqn} of {data}: {_offending_global(e)}") from None


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


def verify_deepspeed_dir(state_dir: str | Path, tag: str = DEEPSPEED_TAG) -> None:
    """Every file under `<state_dir>/<tag>/` loads weights-only with DeepSpeed's own safe globals, or raise."""
    state_dir = Path(state_dir)
    tag_dir = state_dir / tag
    if not tag_dir.is_dir():
        raise UnsafeCheckpointError(f"{state_dir} has no DeepSpeed checkpoint folder {tag!r}")
    advice = f"DeepSpeed would unpickle it with weights_only=False. {_advice(_checkpoint_of(state_dir))}"
    safe = deepspeed_safe_globals()
    seen: set[str] = set()
    # Every file, whatever its name: DeepSpeed picks files by glob patterns and config switches
    # (bf16 prefixes, universal checkpoints in <tag>/zero/, MoE experts) that a name list would miss.
    for dirpath, dirnames, filenames in os.walk(tag_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        for name in sorted(filenames):
            verify_torch_file(Path(dirpath) / name, safe, advice)


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
    raise ValueError(f"{state_dir} holds no DDP file, DCP metadata or DeepSpeed 'zero' folder")


def verify_checkpoint_dir(path: str | Path) -> str:
    """Check a checkpoint folder (`.../step-N`, with trainer_state.pt and state/) or its state/ folder; returns the format.

    Raises UnsafeCheckpointError, naming the file and what it asked for, before any library reads it.
    """
    path = Path(path)
    state_dir = path / STATE_DIR if (path / STATE_DIR).is_dir() else path
    advice = _advice(_checkpoint_of(state_dir))
    if (path / TRAINER_STATE).is_file():
        verify_torch_file(path / TRAINER_STATE, advice=advice)
    fmt = detect_format(state_dir)
    if fmt == "ddp":
        verify_torch_file(state_dir / DDP_FILE, advice=advice)
    elif fmt == "dcp":
        verify_dcp_checkpoint(state_dir)
    else:
        verify_deepspeed_dir(state_dir)
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
