"""main_pretrain.py end to end: the demo's outputs, exact resume after SIGKILL, NaN stops."""

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
# Small enough for 2 CPU cores: 24 generated videos, micro model on 32 px x 4 frames.
FAST = [
    "--synthetic_videos", "24", "--input_size", "32", "--num_frames", "4", "--pred_t_dim", "2",
    "--repeat_aug", "1", "--batch_size", "2", "--num_workers", "0", "--log_every", "1", "--blr", "5e-3",
    "--warmup_epochs", "1", "--decoder_embed_dim", "64", "--decoder_depth", "1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# FAST without the MAE's own flags: what the other objectives (rho) accept.
SHARED_FAST = [a for i, a in enumerate(FAST) if not (a.startswith("--pred_t_dim") or a.startswith("--decoder_")
                                                     or FAST[i - 1].startswith(("--pred_t_dim", "--decoder_")))]


def command(out: Path, nproc: int, extra: list[str], fast: list[str] = FAST) -> list[str]:
    base = [sys.executable]
    if nproc > 1:
        base += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return base + [str(ROOT / "main_pretrain.py"), "--output_dir", str(out), *fast, *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def losses(out: Path) -> dict[int, float]:
    """Per-step losses of log.jsonl, keeping the last entry of a step logged twice (before a kill)."""
    result: dict[int, float] = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            result[rec["step"]] = rec["loss"]
    return result


def kill_at_checkpoint(cmd: list[str], out: Path, step: int) -> None:
    """Start `cmd`, SIGKILL its process group once OUT/checkpoints/latest names step-`step`; assert it was killed."""
    victim = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if latest.is_symlink() and latest.resolve().name == f"step-{step}":
            break
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_demo_writes_logs_checkpoint_tensorboard_and_images(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(command(out, 1, ["--epochs", "2", "--save_every", "5", "--vis_every", "1"]), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = losses(out)
    assert sorted(steps) == list(range(1, len(steps) + 1)) and len(steps) >= 4
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert {"lr", "grad_norm", "clips_per_s", "data_wait", "mfu", "mem_gb"} <= first.keys()
    assert (out / "checkpoints" / "latest").resolve().name == f"step-{max(steps)}"
    assert (out / "checkpoints" / f"step-{max(steps)}" / "trainer_state.pt").is_file()
    assert any((out / "tensorboard").iterdir())
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["epoch-0000.png", "epoch-0001.png"]
    assert (out / "config.yaml").is_file()
    # A second run with the same output folder resumes: nothing left to do, no step is repeated.
    again = subprocess.run(command(out, 1, ["--epochs", "2", "--vis_every", "1"]), cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(out) == steps


@pytest.mark.parametrize(
    "backend",
    [["--dist", "ddp"],  # FSDP2 and ZeRO-2 run with `-m slow` (.ci/run): ~45 s each
     pytest.param(["--dist", "fsdp", "--async_save"], marks=pytest.mark.slow),
     pytest.param(["--dist", "deepspeed", "--zero_stage", "2"], marks=pytest.mark.slow)],
    ids=["ddp", "fsdp-async-save", "zero2"],
)
def test_exact_resume_after_sigkill(tmp_path: Path, backend: list[str]) -> None:
    """A run SIGKILLed after a mid-epoch save, then resumed, logs the same losses as one uninterrupted run."""
    args = ["--epochs", "4", "--save_every", "3", "--precision", "fp32", *backend]  # 6 steps/epoch on 2 ranks
    ref = tmp_path / "ref"
    proc = subprocess.run(command(ref, 2, args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = losses(ref)

    out = tmp_path / "killed"
    victim = subprocess.Popen(command(out, 2, args), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if latest.is_symlink() and latest.resolve().name == "step-3":  # step 3 of 6: mid-epoch
            break
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = int(latest.resolve().name.split("-")[1])
    assert killed_at < max(expected)

    resumed = subprocess.run(command(out, 2, args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got = losses(out)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6 * max(1.0, abs(loss)), (step, got[step], loss)


def test_nonfinite_loss_stops_with_the_step_and_no_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "nan"
    proc = subprocess.run(command(out, 1, ["--epochs", "3", "--lr", "1e30", "--clip_grad", "0", "--save_every", "1"]),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "NaN/inf" in proc.stderr and "global step" in proc.stderr
    bad = int(proc.stderr.split("at or before global step ")[-1].split()[0])
    saved = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp")]
    assert all(s < bad for s in saved)


@pytest.mark.slow  # end to end in subprocesses: .ci/run's slow step runs it
def test_fifo_listed_as_a_video_is_skipped_and_the_run_finishes(tmp_path: Path) -> None:
    """`mkfifo D/extra/fifo.mp4`, listed: the run goes on (the FIFO counted as a bad video), never waits on it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_data_helpers import write_counter_video

    data = tmp_path / "data"
    (data / "extra").mkdir(parents=True)
    rows = [f"v{i}.mp4 0\n" for i in range(5)]  # with the FIFO: 6 items, all drawn by 3 steps of 2
    for i in range(5):
        write_counter_video(str(data / f"v{i}.mp4"), 24, width=48, height=40)
    os.mkfifo(data / "extra" / "fifo.mp4")
    (data / "train.csv").write_text("extra/fifo.mp4 0\n" + "".join(rows))
    out = tmp_path / "run"
    extra = ["--data_path", str(data), "--num_workers", "1", "--max_steps", "3", "--data_timeout", "120",
             "--max_failure_rate", "0.5", "--vis_every", "0", "--precision", "fp32"]
    proc = subprocess.run(command(out, 1, extra), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fifo.mp4 is a FIFO (named pipe), not a regular file" in proc.stderr
    assert sorted(losses(out)) == [1, 2, 3]
