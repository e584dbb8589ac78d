"""One run per --output_dir: real processes racing on one folder, a SIGKILLed holder, a requeue's takeover."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from util.errors import MaeError  # noqa: E402
from util.run_lock import LOCK_FILE, RunLockedError, acquire_run_lock  # noqa: E402

FAST = [
    "--synthetic_videos", "24", "--input_size", "32", "--num_frames", "4", "--pred_t_dim", "2",
    "--repeat_aug", "1", "--batch_size", "2", "--num_workers", "0", "--log_every", "1", "--blr", "5e-3",
    "--warmup_epochs", "1", "--decoder_embed_dim", "64", "--decoder_depth", "1", "--precision", "fp32",
    "--vis_every", "0", "--save_every", "0",
]
HOLDER = """
import os, sys, time
sys.path.insert(0, {root!r})
from util.run_lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1])
if len(sys.argv) > 2:  # leave a child holding the locked file, and go (as an orphaned worker would)
    child = os.fork()
    if child == 0:
        time.sleep(600)
        os._exit(0)
    print("locked", child, flush=True)
    os._exit(0)
print("locked", flush=True)
time.sleep(600)
"""


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def start_holder(out: Path, *args: str, **extra_env: str) -> tuple[subprocess.Popen, str]:
    """A real process that takes the lock and says so; returns it and its 'locked ...' line."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT)), str(out), *args], env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # returns at the print, or at EOF if the holder died
    assert line.startswith("locked"), proc.stderr.read()
    return proc, line


def wait_for(predicate, limit_s: float = 300) -> None:
    """Poll until `predicate()` (a safety limit, not the assertion)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.2)


def logged_steps(out: Path) -> list[int]:
    path = out / "log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_second_run_on_one_folder_refuses_at_once_and_the_first_keeps_its_log(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "main_pretrain.py"), "--output_dir", str(out), *FAST]
    first = subprocess.Popen([*cmd, "--epochs", "200"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(logged_steps(out)) >= 2 or first.poll() is not None)  # mid-run, holding the lock
        assert first.poll() is None, first.stdout.read()[-3000:]
        second = subprocess.run([*cmd, "--epochs", "1"], cwd=ROOT, env=env(), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode != 0
        assert f"{out} is in use by another run: {socket.gethostname()} pid {first.pid}, started" in second.stderr
        assert str(out / LOCK_FILE) in second.stderr
        (out / "STOP").touch()  # the first run stops after its next step, saves and exits
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
    steps = logged_steps(out)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3  # nothing of its log was lost
    assert (out / "checkpoints" / "latest").exists()
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_sigkilled_holder_never_blocks_the_next_run(tmp_path: Path) -> None:
    holder, _ = start_holder(tmp_path)
    try:
        with pytest.raises(MaeError, match=rf"in use by another run: {socket.gethostname()} pid {holder.pid}, "):
            acquire_run_lock(tmp_path, job_id=None)  # one of the project's own errors (MaeError)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = acquire_run_lock(tmp_path, job_id=None)  # at once: the kernel dropped the dead process's lock
    try:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_requeue_of_the_same_job_takes_over_a_lock_its_gone_process_left_held(tmp_path: Path) -> None:
    """The job's old process is gone, but a child of it still holds the file: the same job id takes over,
    any other run (another job, or a live process of the same job) is refused."""
    holder, line = start_holder(tmp_path, "leave-child", SLURM_JOB_ID="4242")
    child = int(line.split()[1])
    try:
        assert holder.wait(timeout=60) == 0
        with pytest.raises(RunLockedError, match=r"pid \d+, started .*, job 4242 holds"):
            acquire_run_lock(tmp_path, job_id="5555")
        lock = acquire_run_lock(tmp_path, job_id="4242")
        try:
            record = json.loads((tmp_path / LOCK_FILE).read_text())
            assert record["pid"] == os.getpid() and record["job_id"] == "4242"
            with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}, started .*, job 4242"):
                acquire_run_lock(tmp_path, job_id="4242")  # its holder is alive: a concurrent run, not a requeue
            with pytest.raises(RunLockedError):
                acquire_run_lock(tmp_path, job_id=None)
        finally:
            lock.release()
        assert not list(tmp_path.glob(f"{LOCK_FILE}.*"))  # the takeover's file was renamed into place
    finally:
        os.kill(child, signal.SIGKILL)
