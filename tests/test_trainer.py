"""The shared run loop as a user meets it: resume on another world size, never a NaN checkpoint, a full
disk, a changed config on resume, a log without repeats, and bad values stopped before any work."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from dist_launch import python, torchrun  # noqa: E402
from resume_worker import NUM_SAMPLES  # noqa: E402

# The tiny pretraining run of tests/test_pretrain.py (24 generated videos, micro model at 32 px).
FAST = ["--synthetic_videos", "24", "--input_size", "32", "--num_frames", "4", "--pred_t_dim", "2",
        "--repeat_aug", "1", "--batch_size", "2", "--num_workers", "0", "--log_every", "1", "--blr", "5e-3",
        "--warmup_epochs", "1", "--decoder_embed_dim", "64", "--decoder_depth", "1", "--precision", "fp32",
        "--vis_every", "0"]
RUN = ["--batch_size", "2", "--repeat_aug", "1", "--num_workers", "0", "--epochs", "1", "--log_every", "1",
       "--precision", "fp32", "--warmup_epochs", "0", "--blr", "1e-3", "--save_every", "0"]


def pretrain(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """main_pretrain.py in one process with the tiny flags."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "main_pretrain.py"), "--output_dir", str(out), *FAST, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def seen(out: Path) -> collections.Counter:
    """How often each sample index was trained on, over every rank and run."""
    counts: collections.Counter = collections.Counter()
    for line in (out / "seen.jsonl").read_text().splitlines():
        counts.update(json.loads(line)["index"])
    return counts


# One direction per backend in the default suite (time); the other two run with `-m slow` (.ci/run).
@pytest.mark.parametrize("backend, before, after", [
    pytest.param("ddp", 2, 1, marks=pytest.mark.slow), ("ddp", 1, 2), pytest.param("fsdp", 2, 1, marks=pytest.mark.slow),
    pytest.param("fsdp", 1, 2, marks=pytest.mark.slow)])
def test_resume_on_another_world_size_trains_each_sample_once(tmp_path: Path, backend: str, before: int,
                                                               after: int) -> None:
    """Stopped after 2 steps on one world size, resumed on another: the epoch's samples, each exactly once."""
    def launch(nproc: int, *extra: str) -> None:
        args = [str(tmp_path), *RUN, "--dist", backend, *extra]
        torchrun(nproc, "resume_worker.py", *args, timeout=600) if nproc > 1 else python("resume_worker.py", *args)

    launch(before, "--max_steps", "2")
    saved = torch.load(tmp_path / "checkpoints" / "latest" / "trainer_state.pt", weights_only=True)
    assert saved["global_step"] == 2 and saved["sampler"] == {"epoch": 0, "consumed": 2 * 2 * before}
    launch(after)
    counts = seen(tmp_path)
    assert sorted(counts) == list(range(NUM_SAMPLES)) and set(counts.values()) == {1}, counts
    final = torch.load(tmp_path / "checkpoints" / "latest" / "trainer_state.pt", weights_only=True)
    assert final["epoch"] == 1 and final["world_size"] == after


@pytest.mark.slow  # end to end in subprocesses: .ci/run's slow step runs it
def test_zero_checkpoint_on_another_world_size_is_refused_with_the_command_that_works(tmp_path: Path) -> None:
    """ZeRO partitions cannot be resharded: the message names the rank count and the --init_from route."""
    python("resume_worker.py", str(tmp_path), *RUN, "--dist", "deepspeed", "--max_steps", "2")
    with pytest.raises(AssertionError) as exc:
        torchrun(2, "resume_worker.py", str(tmp_path), *RUN, "--dist", "deepspeed", timeout=600)
    message = str(exc.value)
    assert "ZeRO partitions for 1 ranks" in message and "--nproc_per_node 1" in message
    assert "python -m util.checkpoint export" in message and "--init_from w.pth" in message


def test_nan_state_is_never_saved_and_the_run_fails(tmp_path: Path) -> None:
    """A diverging run that stops at --max_steps (no log step on the way) exits non-zero, no NaN checkpoint."""
    out = tmp_path / "nan"
    proc = pretrain(out, "--blr", "1e12", "--warmup_epochs", "0", "--clip_grad", "0", "--max_steps", "3",
                    "--log_every", "100", "--save_every", "0", check=False)
    assert proc.returncode != 0
    assert "NaN/inf" in proc.stderr and "no checkpoint was written" in proc.stderr
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))


@pytest.mark.slow  # end to end in subprocesses: .ci/run's slow step runs it
def test_changed_config_on_resume_architecture_refused_schedule_warned(tmp_path: Path) -> None:
    """Another decoder in the same folder is an error naming the flag; another mask ratio is a warning."""
    out = tmp_path / "run"
    pretrain(out, "--max_steps", "2")
    proc = pretrain(out, "--max_steps", "3", "--decoder_depth", "2", check=False)
    assert proc.returncode != 0 and "--decoder_depth 1 -> 2" in proc.stderr and "another architecture" in proc.stderr
    proc = pretrain(out, "--max_steps", "3", "--mask_ratio", "0.6")
    assert "changed flags" in proc.stderr and "mask_ratio: 0.5 -> 0.6" in proc.stderr
    assert "max_steps: 2 -> 3" in proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.slow  # end to end in subprocesses: .ci/run's slow step runs it
def test_log_holds_each_step_once_after_a_resume_that_repeats_steps(tmp_path: Path) -> None:
    """Steps logged after the checkpoint ran again on resume: the log keeps only their second run."""
    out = tmp_path / "run"
    pretrain(out, "--max_steps", "5", "--save_every", "2", "--keep_last", "5")
    # Go back to the step-2 checkpoint, as after a kill that came before the step-4 save finished.
    latest = out / "checkpoints" / "latest"
    latest.unlink()
    latest.symlink_to("step-2")
    for later in ("step-4", "step-5"):
        import shutil

        shutil.rmtree(out / "checkpoints" / later)
    pretrain(out, "--max_steps", "5", "--save_every", "2")
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.slow  # end to end in subprocesses: .ci/run's slow step runs it
def test_weights_file_as_resume_is_a_clear_error_and_init_from_starts_a_new_run(tmp_path: Path) -> None:
    """--resume takes folders; an exported file starts a new run with --init_from (weights only)."""
    run = tmp_path / "run"
    pretrain(run, "--max_steps", "2")
    weights = tmp_path / "w.pth"
    subprocess.run([sys.executable, "-m", "util.checkpoint", "export", str(run / "checkpoints" / "latest"),
                    str(weights)], cwd=ROOT, check=True, capture_output=True)
    proc = pretrain(tmp_path / "new", "--resume", str(weights), check=False)
    assert proc.returncode != 0 and "--init_from" in proc.stderr and "is not one" in proc.stderr
    proc = pretrain(tmp_path / "new", "--init_from", str(weights), "--max_steps", "1", "--log_every", "1")
    first = json.loads((tmp_path / "new" / "log.jsonl").read_text().splitlines()[0])
    start = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] < start["loss"]  # starts from the trained weights


@pytest.mark.parametrize("argv, needle", [
    (["--batch_size", "-2"], "--batch_size -2 is out of range"),
    (["--mask_ratio", "1.0"], "--mask_ratio 1.0 is out of range: in (0, 1)"),
    (["--mask_ratio", "0"], "--mask_ratio 0.0 is out of range: in (0, 1)"),
    (["--opt_betas", "0.9", "1.5"], "--opt_betas"),
    (["--bench", "gpu"], "--bench 'gpu' is out of range"),
])
def test_bad_values_stop_before_any_output(tmp_path: Path, argv: list[str], needle: str) -> None:
    """Ranges are checked with the flags, before any work: nothing is written."""
    proc = pretrain(tmp_path / "out", *argv, check=False)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_empty_config_file_is_an_error(tmp_path: Path) -> None:
    """An empty YAML would silently train the 800-epoch ViT-L defaults: refused."""
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    proc = pretrain(tmp_path / "out", "--config", str(tmp_path / "empty.yaml"), check=False)
    assert proc.returncode == 2 and "is empty" in proc.stderr and not (tmp_path / "out").exists()


def test_full_disk_keeps_latest_and_says_how_much_space_is_missing(tmp_path: Path) -> None:
    """On a small tmpfs the second save does not fit: the partial folder goes, `latest` stays, the message
    names the space."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        out = mnt / "run"
        proc = pretrain(out, "--max_steps", "4", "--save_every", "2", "--keep_last", "5", check=False)
        assert proc.returncode != 0
        assert "no space left on device while writing checkpoint step-4" in proc.stderr, proc.stderr[-2000:]
        assert "MB needed" in proc.stderr and "MB free" in proc.stderr
        ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert ckpts == ["latest", "step-2"] and (out / "checkpoints" / "latest").resolve().name == "step-2"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
