"""Weights out of checkpoints and into models: `read_weights` for --finetune / --init_from, and `export`.

`read_weights` reads our exports `{"model": sd}`, the official MAE-ST release (`model`), PySlowFast
`.pyth` (`model_state`), VideoMAE (`module`/`model`), a bare state dict, or one of our checkpoint /
output folders (consolidated from any backend). Everything is loaded weights-only and checked by
`util/safe_load.py` first; mapping the keys onto a model is `models/convert.py`'s job.
`export_weights` is what `python -m util.checkpoint export` runs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from util.checkpoint import STATE_DIR, TRAINER_STATE, find_latest
from util.errors import CheckpointError, MissingFileError
from util.optim import clean_name
from util.safe_load import forced_weights_only, load_weights_file, verify_checkpoint_dir

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


def weights_fingerprint(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of the weights `read_weights` gives: names, dtypes, shapes and bytes.

    Computed on the plain-name tensors, so a checkpoint folder (any backend) and its export have one fingerprint.
    """
    digest = hashlib.sha256()
    for name, t in sorted(read_weights(path).items()):
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()[:16]


def checkpoint_folder(path: str | Path) -> Path:
    """A checkpoint folder itself, or an output folder's latest checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path} is not a checkpoint or output folder")
    ckpt = path if os.path.lexists(path / TRAINER_STATE) else find_latest(path)
    if ckpt is None:
        raise MissingFileError(f"{path} is neither a checkpoint folder nor an output folder with checkpoints")
    return ckpt


def read_optimizer_state(path: str | Path) -> dict:
    """The consolidated optimizer state {"state": {name: {...}}, "param_groups": [...]} of a DDP or FSDP2 checkpoint.

    Names are plain parameter names, tensors full-size on the CPU (weights-only reads, checked first).
    """
    ckpt = checkpoint_folder(path)
    state_dir = Path(os.path.realpath(ckpt)) / STATE_DIR
    fmt = verify_checkpoint_dir(ckpt)
    if fmt == "ddp":
        optim = load_weights_file(state_dir / "model.pt").get("optimizer")
    elif fmt == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as td:
            with forced_weights_only():
                dcp_to_torch_save(state_dir, Path(td) / "full.pt")
            optim = load_weights_file(Path(td) / "full.pt").get("optim")
    else:
        raise CheckpointError(f"{ckpt} is a DeepSpeed checkpoint: its optimizer state is partitioned per rank and "
                              "cannot be carried into a model of another shape; use --init_optimizer reset")
    if not isinstance(optim, dict) or not isinstance(optim.get("state"), dict):
        raise CheckpointError(f"{ckpt} holds no optimizer state; use --init_optimizer reset")
    return optim


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
