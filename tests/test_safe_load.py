"""Checkpoint folders never run code: real checkpoints of every backend pass, crafted files are refused.

One worker process writes real checkpoints (DDP, FSDP2 sync and async DCP, DeepSpeed ZeRO-1/2/3 and
bf16) on a 1-rank gloo group and reloads each under `forced_weights_only`. The tests then plant a
pickle whose `__reduce__` calls `os.system("touch MARKER")` in copies of those folders, where an
attacker would put it, and check that it is refused with a message naming the file and that the
marker never appears. Each attack is first shown to work on the library's own reader (a marker of
its own appears), so a refusal test cannot pass on a payload that would have done nothing.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from dist_launch import python  # noqa: E402

from util import safe_load  # noqa: E402
from util.safe_load import (  # noqa: E402
    UnsafeCheckpointError,
    forced_weights_only,
    load_weights_file,
    verify_checkpoint_dir,
    verify_dcp_metadata,
)

KINDS = ["ddp", "fsdp", "fsdp_async", "zero1", "zero2", "zero3", "zero1_bf16"]


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture(scope="session")
def real_checkpoints(tmp_path_factory) -> tuple[Path, dict]:
    """Real checkpoints of every backend (one step each); returns (out dir, worker results)."""
    out = tmp_path_factory.mktemp("safe_load")
    python("safe_load_worker.py", out, "save", *KINDS, timeout=600)
    return out, json.loads((out / "results_save.json").read_text())


def copy_of(real_checkpoints, kind: str, dest: Path) -> Path:
    """A private copy of KIND's checkpoint folder (trainer_state.pt + state/) to tamper with."""
    src = Path(real_checkpoints[1][kind]["checkpoint"])
    return Path(shutil.copytree(src, dest / f"{kind}-step-1", symlinks=True))


def poison_torch_file(path: Path, marker: Path, where: tuple[str, ...]) -> None:
    """Rewrite a real torch.save file with one nested value (dict keys `where`) replaced by the payload."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own genuine file
    node = state
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = RunsCode(marker)
    torch.save(state, path)


def genuine_metadata(state_dir: Path):
    """The Metadata object of a real DCP folder."""
    return verify_dcp_metadata(state_dir)


# ----------------------------------------------------------------------------- genuine folders pass
@pytest.mark.parametrize("kind", KINDS)
def test_real_checkpoints_pass_and_reload_under_forced_weights_only(real_checkpoints, kind: str) -> None:
    """No false refusal: every backend's own checkpoint verifies, and its backend reloads it weights-only."""
    r = real_checkpoints[1][kind]
    want = {"ddp": "ddp", "fsdp": "dcp", "fsdp_async": "dcp"}.get(kind, "deepspeed")
    assert r["format"] == want and r["reloaded_equal"] and r["num_tensors"] > 20, r
    ckpt = Path(r["checkpoint"])
    assert verify_checkpoint_dir(ckpt) == want == verify_checkpoint_dir(ckpt / "state")


def test_dcp_metadata_of_async_save_reads_as_metadata(real_checkpoints) -> None:
    """The restricted unpickler rebuilds the full Metadata of a dcp.async_save checkpoint, bytes entries included."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    meta = genuine_metadata(Path(real_checkpoints[1]["fsdp_async"]["checkpoint"]) / "state")
    kinds = {type(m) for m in meta.state_dict_metadata.values()}
    assert kinds == {TensorStorageMetadata, BytesStorageMetadata}
    assert meta.state_dict_metadata["model.cls_token"].properties.dtype == torch.float32


def test_layout_names_match_the_savers() -> None:
    """safe_load repeats the checkpoint layout names (it cannot import checkpoint.py): they must agree."""
    from util import checkpoint, parallel

    assert (safe_load.STATE_DIR, safe_load.TRAINER_STATE) == (checkpoint.STATE_DIR, checkpoint.TRAINER_STATE)
    assert (safe_load.DDP_FILE, safe_load.DEEPSPEED_TAG) == (parallel.DDPBackend.FILE, parallel.DEEPSPEED_TAG)


# ----------------------------------------------------------------------------- DCP (FSDP2)
def test_crafted_dcp_metadata_is_refused(real_checkpoints, tmp_path: Path) -> None:
    """A real FSDP2 folder whose .metadata carries an os.system payload: refused naming the file and global."""
    ckpt = copy_of(real_checkpoints, "fsdp", tmp_path)
    meta_file = ckpt / "state" / ".metadata"
    meta = genuine_metadata(ckpt / "state")
    meta.planner_data = {"model.cls_token": RunsCode(tmp_path / "control")}
    meta_file.write_bytes(pickle.dumps(meta))
    from torch.distributed.checkpoint import FileSystemReader

    FileSystemReader(str(ckpt / "state")).read_metadata()  # what dcp.load does: the payload runs
    assert (tmp_path / "control").exists()

    marker = tmp_path / "pwned"
    meta.planner_data = {"model.cls_token": RunsCode(marker)}
    meta_file.write_bytes(pickle.dumps(meta))
    for path in (ckpt, ckpt / "state"):
        with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: this DCP metadata file asks for `posix\.system`"):
            verify_checkpoint_dir(path)
    meta_file.write_bytes(pickle.dumps(RunsCode(marker)))  # the bare payload of the issue, no metadata at all
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system.*python -m util\.checkpoint export"):
        verify_dcp_metadata(ckpt / "state")
    assert not marker.exists()


def poison_dcp_bytes_entry(state_dir: Path, marker: Path, fqn: str = "optim.param_groups.0.lr") -> None:
    """Append a torch.save'd payload to the data file and point one non-tensor entry at it (metadata stays clean)."""
    meta = genuine_metadata(state_dir)
    key = next(k for k in meta.storage_data if k.fqn == fqn)
    info = meta.storage_data[key]
    blob = io.BytesIO()
    torch.save(RunsCode(marker), blob)
    data = state_dir / info.relative_path
    info.offset, info.length = data.stat().st_size, len(blob.getvalue())
    with open(data, "ab") as f:
        f.write(blob.getvalue())
    (state_dir / ".metadata").write_bytes(pickle.dumps(meta))


def test_crafted_dcp_bytes_entry_is_refused(real_checkpoints, tmp_path: Path) -> None:
    """Clean metadata, but a non-tensor entry (which DCP torch.loads with weights_only=False) holds the payload."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = copy_of(real_checkpoints, "fsdp", tmp_path)
    poison_dcp_bytes_entry(ckpt / "state", tmp_path / "control")
    dcp_to_torch_save(ckpt / "state", tmp_path / "full.pt")  # the export path today: the payload runs
    assert (tmp_path / "control").exists()

    ckpt = copy_of(real_checkpoints, "fsdp_async", tmp_path)
    marker = tmp_path / "pwned"
    poison_dcp_bytes_entry(ckpt / "state", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"__0_0\.distcp: its entry optim\.param_groups\.0\.lr needs `posix\.system`"):
        verify_checkpoint_dir(ckpt)
    with pytest.raises(CheckpointException, match=r"(?s)UnpicklingError.*posix\.system"), forced_weights_only():
        dcp_to_torch_save(ckpt / "state", tmp_path / "full2.pt")  # the second lock, on its own
    assert not marker.exists()


def test_dcp_metadata_pointing_outside_the_folder_is_refused(real_checkpoints, tmp_path: Path) -> None:
    """A data reference like '../x' would make DCP read a file outside the checkpoint."""
    ckpt = copy_of(real_checkpoints, "fsdp", tmp_path)
    meta = genuine_metadata(ckpt / "state")
    next(iter(meta.storage_data.values())).relative_path = "../trainer_state.pt"
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UnsafeCheckpointError, match="points outside the folder"):
        verify_checkpoint_dir(ckpt)


# ----------------------------------------------------------------------------- DeepSpeed
DS_FILES = [
    ("zero2", "zero_pp_rank_0_mp_rank_00_optim_states.pt", ("optimizer_state_dict", "loss_scaler")),
    ("zero1_bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", ("optimizer_state_dict", "loss_scaler")),
    ("zero1", "mp_rank_00_model_states.pt", ("ds_version",)),
    ("zero3", "zero_pp_rank_0_mp_rank_00_model_states.pt", ("module", "cls_token")),
    ("zero3", "zero_pp_rank_0_mp_rank_00_optim_states.pt", ("optimizer_state_dict", "zero_stage")),
]


@pytest.mark.parametrize("kind, name, where", DS_FILES)
def test_crafted_deepspeed_file_is_refused_with_the_export_command(real_checkpoints, tmp_path, kind, name, where) -> None:
    """Each file DeepSpeed or zero_to_fp32 unpickles, poisoned in a real folder: refused, naming it and the way out."""
    ckpt = copy_of(real_checkpoints, kind, tmp_path)
    target = ckpt / "state" / "zero" / name
    poison_torch_file(target, tmp_path / "control", where)
    torch.load(target, weights_only=False)  # what DeepSpeed does: the payload runs
    assert (tmp_path / "control").exists()

    marker = tmp_path / "pwned"
    poison_torch_file(target, marker, where)
    with pytest.raises(UnsafeCheckpointError) as err:
        verify_checkpoint_dir(ckpt)
    msg = str(err.value)
    assert f"refusing to load {target}" in msg and "`posix.system`" in msg
    assert f"python -m util.checkpoint export {ckpt} weights.pth" in msg
    assert not marker.exists()


def test_any_extra_file_in_a_deepspeed_folder_is_checked(real_checkpoints, tmp_path: Path) -> None:
    """DeepSpeed globs file names (MoE experts, universal checkpoints): a payload under any name is refused."""
    ckpt = copy_of(real_checkpoints, "zero2", tmp_path)
    marker = tmp_path / "pwned"
    extra = ckpt / "state" / "zero" / "zero" / "cls_token" / "fp32.pt"  # a universal-checkpoint path
    extra.parent.mkdir(parents=True)
    torch.save({"param": RunsCode(marker)}, extra)
    with pytest.raises(UnsafeCheckpointError, match=r"cls_token/fp32\.pt: unpickling it needs `posix\.system`"):
        verify_checkpoint_dir(ckpt)
    assert not marker.exists()


def test_zero_to_fp32_export_under_forced_weights_only(real_checkpoints, tmp_path: Path) -> None:
    """The export's own reader: a real ZeRO-3 folder converts with DeepSpeed's safe globals (and needs them);
    a poisoned one is refused inside DeepSpeed without running the payload."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    real = Path(real_checkpoints[1]["zero3"]["checkpoint"]) / "state"
    with forced_weights_only(deepspeed=True):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(real), tag="zero")
    assert len(sd) == real_checkpoints[1]["zero3"]["num_tensors"]
    with pytest.raises(pickle.UnpicklingError, match="ZeroStageEnum|LossScaler"), forced_weights_only(deepspeed=False):
        get_fp32_state_dict_from_zero_checkpoint(str(real), tag="zero")

    ckpt = copy_of(real_checkpoints, "zero3", tmp_path)
    marker = tmp_path / "pwned"
    poison_torch_file(ckpt / "state/zero/zero_pp_rank_0_mp_rank_00_optim_states.pt", marker,
                      ("optimizer_state_dict", "loss_scaler"))
    with pytest.raises(pickle.UnpicklingError, match="posix.system"), forced_weights_only(deepspeed=True):
        get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "state"), tag="zero")
    assert not marker.exists()


def test_backend_load_under_forced_weights_only_refuses_crafted_files(real_checkpoints, tmp_path: Path) -> None:
    """DeepSpeed's engine.load_checkpoint and FSDP2's dcp.load, given crafted folders with no scan before them:
    every torch.load inside is weights-only, so both fail on the payload and it never runs."""
    zero2, fsdp = copy_of(real_checkpoints, "zero2", tmp_path), copy_of(real_checkpoints, "fsdp", tmp_path)
    marker = tmp_path / "pwned"
    poison_torch_file(zero2 / "state/zero/zero_pp_rank_0_mp_rank_00_optim_states.pt", marker,
                      ("optimizer_state_dict", "loss_scaler"))
    poison_dcp_bytes_entry(fsdp / "state", marker)
    out = tmp_path / "loads"
    out.mkdir()
    python("safe_load_worker.py", out, "load", f"{zero2}:zero2", f"{fsdp}:fsdp", timeout=600)
    results = json.loads((out / "results_load.json").read_text())
    for spec, r in results.items():
        assert r["error"] and "UnpicklingError" in r["error"] and "posix.system" in r["error"], (spec, r)
    assert not marker.exists()


def test_fp16_dynamic_loss_scaler_is_admitted() -> None:
    """fp16 ZeRO checkpoints (GPU only) hold the DynamicLossScaler DeepSpeed builds for fp16: it loads weights-only."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler, DynamicLossScaler

    args = {"init_scale": 2.0**16, "scale_window": 1000, "min_scale": 1, "delayed_shift": 2, "consecutive_hysteresis": False}
    scaler = CreateLossScaler(dtype=torch.half, static_loss_scale=0, dynamic_scaling=True, dynamic_loss_args=args)
    assert isinstance(scaler, DynamicLossScaler)
    blob = io.BytesIO()
    torch.save({"optimizer_state_dict": {"loss_scaler": scaler}}, blob)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(blob.getvalue()), weights_only=True)
    with forced_weights_only(deepspeed=True):
        back = torch.load(io.BytesIO(blob.getvalue()), weights_only=False)["optimizer_state_dict"]["loss_scaler"]
    assert vars(back) == vars(scaler)


# ----------------------------------------------------------------------------- DDP and single files
@pytest.mark.parametrize("name, where", [("state/model.pt", ("model", "cls_token")), ("trainer_state.pt", ("global_step",))])
def test_crafted_ddp_or_trainer_state_file_is_refused(real_checkpoints, tmp_path, name: str, where) -> None:
    """The one-file DDP state and every backend's trainer_state.pt are checked weights-only too."""
    ckpt = copy_of(real_checkpoints, "ddp", tmp_path)
    marker = tmp_path / "pwned"
    poison_torch_file(ckpt / name, marker, where)
    with pytest.raises(UnsafeCheckpointError, match=rf"{name.split('/')[-1]}: unpickling it needs `posix\.system`"):
        verify_checkpoint_dir(ckpt)
    assert not marker.exists()


def test_load_weights_file_refuses_code_and_loads_tensors(tmp_path: Path) -> None:
    """The single-file loader: plain weights load; a payload is refused by file name as a ValueError."""
    good, bad, marker = tmp_path / "w.pth", tmp_path / "evil.pth", tmp_path / "pwned"
    torch.save({"model": {"w": torch.ones(2)}}, good)
    assert torch.equal(load_weights_file(good)["model"]["w"], torch.ones(2))
    torch.save({"model": RunsCode(marker)}, bad)
    with pytest.raises(ValueError, match=r"evil\.pth is not a plain weights checkpoint .*posix\.system"):
        load_weights_file(bad)
    assert not marker.exists()


def test_forced_weights_only_restores_the_environment(tmp_path: Path, monkeypatch) -> None:
    """The switch is torch's own environment flag: set inside, restored after, even on error."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(RuntimeError), forced_weights_only():
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
        assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
        raise RuntimeError("boom")
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


def test_folder_of_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    """A folder that is no checkpoint of ours says what it expected."""
    with pytest.raises(ValueError, match="holds no DDP file, DCP metadata or DeepSpeed 'zero' folder"):
        verify_checkpoint_dir(tmp_path)


# ----------------------------------------------------------------------------- every entry point
def _run(*cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


ROOT = Path(__file__).resolve().parents[1]
TINY = ["--synthetic_videos", "24", "--input_size", "32", "--num_frames", "4", "--batch_size", "2",
        "--repeat_aug", "1", "--num_workers", "0", "--epochs", "1", "--precision", "fp32"]


def crafted(real_checkpoints, tmp_path: Path, kind: str, marker: Path) -> Path:
    """A copy of KIND's real checkpoint with an os.system payload where an attacker would put it."""
    ckpt = copy_of(real_checkpoints, kind, tmp_path)
    if kind == "fsdp":
        (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    else:
        poison_torch_file(ckpt / "state" / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker,
                          ("optimizer_state_dict", "zero_stage"))
    return ckpt


@pytest.mark.parametrize("kind", ["fsdp", pytest.param("zero2", marks=pytest.mark.slow)])  # zero2: slow step
def test_every_entry_point_refuses_a_crafted_checkpoint(real_checkpoints, tmp_path: Path, kind: str) -> None:
    """export CLI, fine-tuning's --finetune DIR and auto-resume: refused with a clear message, nothing runs."""
    marker = tmp_path / "pwned"
    ckpt = crafted(real_checkpoints, tmp_path, kind, marker)
    export = _run("-m", "util.checkpoint", "export", str(ckpt), str(tmp_path / "w.pth"))
    finetune = _run("main_finetune.py", "--output_dir", str(tmp_path / "ft"), *TINY, "--finetune", str(ckpt))
    out = tmp_path / "resume"
    (out / "checkpoints").mkdir(parents=True)
    shutil.move(str(ckpt), out / "checkpoints" / "step-1")
    (out / "checkpoints" / "latest").symlink_to("step-1")
    dist = ["--dist", "fsdp"] if kind == "fsdp" else ["--dist", "deepspeed", "--zero_stage", "2"]
    resume = _run("main_pretrain.py", "--output_dir", str(out), *TINY, *dist)
    for name, proc in (("export", export), ("finetune", finetune), ("resume", resume)):
        assert proc.returncode != 0, name
        assert "UnsafeCheckpointError" in proc.stderr and "posix.system" in proc.stderr, (name, proc.stderr[-2000:])
        assert "python -m util.checkpoint export" in proc.stderr or "refusing" in proc.stderr, name
    assert not marker.exists()
