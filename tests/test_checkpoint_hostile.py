"""Hostile checkpoint folders and weights files: real FIFOs, symlinks, truncated and wrong-typed files.

Each case is refused (or, for auto-resume, skipped) with an error of the project's own types that
names the file; nothing blocks: FIFOs are never opened for a blocking read, so the subprocess
timeouts here are a safety net, not the assertion.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from common import make_backend, make_model  # noqa: E402
from dist_launch import REPO  # noqa: E402

from util.checkpoint import (  # noqa: E402
    find_latest,
    find_resumable,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from util.checkpoint_cli import describe  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.errors import CheckpointError, MaeError, UnsafeCheckpointError  # noqa: E402
from util.safe_load import verify_checkpoint_dir  # noqa: E402
from util.weights import export_weights, read_weights  # noqa: E402

ALONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m util.checkpoint ARGS` offline (a hang would fail at the timeout: a safety net only)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "util.checkpoint", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def deadline():
    """Safety net for in-process FIFO cases: a blocked open() is interrupted after 60 s (the test then fails)."""
    def hung(signum, frame):
        raise TimeoutError("blocked on a FIFO for 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    """An output folder with two real DDP checkpoints, step-1 and step-2 (`latest`)."""
    backend = make_backend(make_model(), ALONE)
    for step in (1, 2):
        save_checkpoint(backend, tmp_path / "out", f"step-{step}", {"global_step": step, "epoch": 0})
    return tmp_path / "out"


def deepspeed_layout(ckpt: Path) -> Path:
    """Turn a DDP checkpoint into a DeepSpeed-layout folder (state/zero/ holding one real torch file)."""
    zero = ckpt / "state" / "zero"
    zero.mkdir()
    os.replace(ckpt / "state" / "model.pt", zero / "mp_rank_00_model_states.pt")
    return zero


# ----------------------------------------------------------------------------- FIFOs and symlinks
def test_fifo_inside_a_deepspeed_folder_is_refused_not_read(out: Path) -> None:
    """export on a folder whose zero/ holds a FIFO returns at once, naming the FIFO; the FIFO has no writer."""
    ckpt = out / "checkpoints" / "step-2"
    zero = deepspeed_layout(ckpt)
    os.mkfifo(zero / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    proc = cli("export", str(ckpt), str(out / "w.pth"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" in proc.stderr and "FIFO" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "w.pth").exists()


@pytest.mark.parametrize("name", ["state/model.pt", "trainer_state.pt", "state/.metadata"])
def test_fifo_under_a_layout_name_is_refused(out: Path, name: str, deadline) -> None:
    """A FIFO as model.pt, trainer_state.pt or .metadata: the folder check names it instead of blocking."""
    ckpt = out / "checkpoints" / "step-2"
    (ckpt / name).unlink(missing_ok=True)
    os.mkfifo(ckpt / name)
    with pytest.raises(CheckpointError, match=rf"{name.split('/')[-1]}: it is a FIFO"):
        verify_checkpoint_dir(ckpt)
    if name == "trainer_state.pt":
        with pytest.raises(CheckpointError, match="it is a FIFO"):
            read_trainer_state(ckpt)


def test_symlink_out_of_the_folder_is_refused_with_its_target(out: Path, tmp_path: Path) -> None:
    """A file (or folder) symlinked from outside the checkpoint is refused, naming where it leads."""
    ckpt = out / "checkpoints" / "step-2"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.replace(ckpt / "state" / "model.pt", elsewhere / "model.pt")
    (ckpt / "state" / "model.pt").symlink_to(elsewhere / "model.pt")
    with pytest.raises(UnsafeCheckpointError, match=rf"model\.pt: it leads to {elsewhere / 'model.pt'}.*outside"):
        verify_checkpoint_dir(ckpt)
    zero = deepspeed_layout(out / "checkpoints" / "step-1")
    (zero / "extra").symlink_to(elsewhere)  # a folder outside: DeepSpeed's globs would read it
    with pytest.raises(UnsafeCheckpointError, match=rf"extra: it leads to {elsewhere}"):
        verify_checkpoint_dir(out / "checkpoints" / "step-1")


def test_symlink_loops_inside_a_deepspeed_folder_end(out: Path) -> None:
    """A folder symlinked to itself and to its parent (inside the checkpoint) is walked once: the check ends and passes."""
    zero = deepspeed_layout(out / "checkpoints" / "step-2")
    (zero / "self").symlink_to(".")
    (zero / "up").symlink_to("..")
    assert verify_checkpoint_dir(out / "checkpoints" / "step-2") == "deepspeed"
    (zero / "loop.pt").symlink_to("loop.pt")  # a file-level loop: named, not followed forever
    with pytest.raises(CheckpointError, match=r"loop\.pt"):
        verify_checkpoint_dir(out / "checkpoints" / "step-2")


# ----------------------------------------------------------------------------- export destination
@pytest.mark.slow  # end to end in subprocesses: .ci/run's slow step runs it
def test_export_refuses_a_destination_inside_a_checkpoint(out: Path) -> None:
    """export CKPT CKPT/trainer_state.pt (or into any checkpoint folder) is refused; the checkpoint is unchanged."""
    ckpt = out / "checkpoints" / "step-2"
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    for dest in (ckpt / "trainer_state.pt", ckpt / "state" / "w.pth", out / "checkpoints" / "step-1" / "w.pth",
                 out / "checkpoints" / "latest" / "w.pth"):
        proc = cli("export", str(ckpt), str(dest))
        assert proc.returncode == 2 and "inside the checkpoint folder" in proc.stderr and str(dest) in proc.stderr
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    assert not (out / "checkpoints" / "step-1" / "w.pth").exists()


def test_export_overwrites_only_with_the_flag_and_through_a_rename(out: Path) -> None:
    """An existing file is kept without --overwrite; with it, replaced by a new inode (written aside, renamed)."""
    dest = out / "w.pth"
    dest.write_bytes(b"keep me")
    proc = cli("export", str(out / "checkpoints" / "latest"), str(dest))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and str(dest) in proc.stderr
    assert dest.read_bytes() == b"keep me"
    inode = dest.stat().st_ino
    proc = cli("export", str(out / "checkpoints" / "latest"), str(dest), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert dest.stat().st_ino != inode and "model" in torch.load(dest, weights_only=True)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "w.pth"]  # no partial file left
    with pytest.raises(CheckpointError, match="is a folder"):
        export_weights(out / "checkpoints" / "latest", out, overwrite=True)


# ----------------------------------------------------------------------------- damaged checkpoints
def test_latest_loop_falls_back_like_a_dangling_link(out: Path) -> None:
    """`latest -> latest` and `latest -> missing` both mean: the newest complete checkpoint."""
    latest = out / "checkpoints" / "latest"
    for target in ("latest", "step-9"):
        latest.unlink()
        latest.symlink_to(target)
        assert find_latest(out) == (out / "checkpoints" / "step-2").resolve()
        assert find_resumable(out) == (out / "checkpoints" / "step-2").resolve()
        with pytest.raises(CheckpointError, match="latest"):
            load_checkpoint(make_backend(make_model(), ALONE), latest)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", b"\x80\x02}q\x00", b"PK\x03\x04" + b"\0" * 64,
                                     bytes(range(256)) * 4], ids=["empty", "text", "short-pickle", "zip-header", "bytes"])
def test_non_torch_model_file_names_the_file(out: Path, content: bytes) -> None:
    """Whatever bytes stand in for model.pt, the folder check says that file is not a torch file."""
    ckpt = out / "checkpoints" / "step-2"
    (ckpt / "state" / "model.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'state' / 'model.pt'}"):
        verify_checkpoint_dir(ckpt)


@pytest.mark.parametrize("value", [{}, [1, 2], "text", {"global_step": 3}])
def test_trainer_state_of_the_wrong_type_names_the_file(out: Path, value) -> None:
    """trainer_state.pt holding {} or a list: an error naming the file, from read, resume and info alike."""
    ckpt = out / "checkpoints" / "step-2"
    torch.save(value, ckpt / "trainer_state.pt")
    file = str(ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="not a trainer state") as err:
        read_trainer_state(ckpt)
    assert file in str(err.value)
    with pytest.raises(CheckpointError, match="not a trainer state"):
        load_checkpoint(make_backend(make_model(), ALONE), ckpt)
    proc = cli("info", str(ckpt))
    assert proc.returncode == 2 and file in proc.stderr and "Traceback" not in proc.stderr


def test_truncated_trainer_state_in_latest_resumes_from_the_previous(out: Path, caplog) -> None:
    """A truncated trainer_state.pt in `latest`: auto-resume takes step-1 and says it skipped step-2 and why."""
    state = out / "checkpoints" / "step-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="util.checkpoint"):
        assert find_resumable(out) == (out / "checkpoints" / "step-1").resolve()
    assert f"skipping checkpoint {state.parent}" in caplog.text and str(state) in caplog.text
    (out / "checkpoints" / "step-1" / "state" / "model.pt").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="no intact checkpoint") as err:  # never a silent fresh start
        find_resumable(out)
    assert "step-1" in str(err.value) and "step-2" in str(err.value)


@pytest.mark.parametrize("cut", [0, 10, 0.5])
def test_truncated_weights_file_names_the_file(out: Path, cut) -> None:
    """A truncated .pth given to --finetune / --init_from (read_weights): an error naming the file."""
    full = out / "w.pth"
    export_weights(out / "checkpoints" / "latest", full)
    data = full.read_bytes()
    bad = out / "cut.pth"
    bad.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(CheckpointError, match=rf"{bad}.*truncated"):
        read_weights(bad)


def test_weights_with_int_keys_name_the_file(tmp_path: Path) -> None:
    """A .pth mapping ints to tensors is not a state dict: said, naming the file."""
    bad = tmp_path / "ints.pth"
    torch.save({"model": {0: torch.zeros(2), 1: torch.ones(2)}}, bad)
    with pytest.raises(CheckpointError, match=rf"{bad}: weight names must be strings"):
        read_weights(bad)


def test_info_on_a_folder_that_is_no_checkpoint(tmp_path: Path) -> None:
    """`info` on any other folder: a one-line error naming it, no traceback."""
    proc = cli("info", str(tmp_path))
    assert proc.returncode == 2 and f"{tmp_path} is not a checkpoint folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(MaeError, match="not a checkpoint folder"):
        describe(tmp_path)


TINY = ["--synthetic_videos", "24", "--input_size", "32", "--num_frames", "4", "--batch_size", "2", "--repeat_aug",
        "1", "--num_workers", "0", "--epochs", "1", "--precision", "fp32", "--save_every", "1"]


def test_pretraining_resumes_past_a_truncated_latest(tmp_path: Path) -> None:
    """main_pretrain with a truncated trainer_state.pt in `latest`: resumes from the previous step, saying so."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "main_pretrain.py", "--output_dir", str(tmp_path), *TINY]
    first = subprocess.run([*cmd, "--max_steps", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    state = tmp_path / "checkpoints" / "step-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    again = subprocess.run([*cmd, "--max_steps", "3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert f"skipping checkpoint {state.parent}" in log and str(state) in log
    assert f"resumed from {(tmp_path / 'checkpoints' / 'step-1').resolve()}" in log
