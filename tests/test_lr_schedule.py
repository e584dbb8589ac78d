"""Learning-rate schedules: cosine and warm-up-stable-decay by hand-computed values, and wsd's exact mid-epoch resume."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from test_pretrain import ROOT, command, env, kill_at_checkpoint, losses

from main_pretrain import get_args_parser as pretrain_parser
from util.config import ConfigError, parse_args
from util.lr_sched import decay_factor, lr_at, schedule_line


def test_cosine_is_unchanged_by_the_new_arguments() -> None:
    # warm-up 2 of 10 epochs: at epoch 6 the cosine is half-way: min + (lr - min) / 2
    assert lr_at(1.0, 1e-3, 0.0, 2, 10) == pytest.approx(5e-4)
    assert lr_at(6.0, 1e-3, 1e-5, 2, 10) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr_at(6.0, 1e-3, 1e-5, 2, 10, "cosine", decay_fraction=0.5, decay_shape="sqrt") == lr_at(6.0, 1e-3, 1e-5, 2, 10)


@pytest.mark.parametrize("shape,at_quarter", [("linear", 0.75), ("cosine", (1 + math.cos(math.pi / 4)) / 2),
                                               ("sqrt", 0.5)])
def test_wsd_values_by_hand(shape: str, at_quarter: float) -> None:
    # 100 epochs, warm-up 10, decay over the last 20% = epochs 80..100; lr 1e-3, min 1e-5.
    def lr(e: float) -> float:
        return lr_at(e, 1e-3, 1e-5, 10, 100, "wsd", 0.2, shape)

    assert lr(0.0) == 0.0 and lr(5.0) == pytest.approx(5e-4)  # linear warm-up from 0
    assert lr(10.0) == 1e-3 and lr(45.5) == 1e-3 and lr(80.0) == 1e-3  # stable: exactly the peak
    # epoch 85 is a quarter into the decay: linear 1 - 0.25, sqrt 1 - sqrt(0.25) = 0.5, cosine (1 + cos(pi/4)) / 2
    assert lr(85.0) == pytest.approx(1e-5 + (1e-3 - 1e-5) * at_quarter)
    assert lr(90.0) == pytest.approx(1e-5 + (1e-3 - 1e-5) * {"linear": 0.5, "cosine": 0.5, "sqrt": 1 - 0.5 ** 0.5}[shape])
    assert lr(100.0) == pytest.approx(1e-5) and lr(120.0) == pytest.approx(1e-5)  # ends at (and stays at) min_lr
    # A fractional position inside an epoch (step 3 of 12 of epoch 87): the same function of the float epoch.
    assert lr(87 + 3 / 12) == pytest.approx(1e-5 + (1e-3 - 1e-5) * decay_factor((7 + 0.25) / 20, shape))


def test_wsd_decay_never_starts_inside_the_warm_up() -> None:
    # decay_fraction 1 on 10 epochs with warm-up 4: decay runs 4..10, not 0..10.
    assert lr_at(4.0, 1.0, 0.0, 4, 10, "wsd", 1.0, "linear") == 1.0
    assert lr_at(7.0, 1.0, 0.0, 4, 10, "wsd", 1.0, "linear") == pytest.approx(0.5)


def test_schedule_flags_parse_and_are_checked() -> None:
    a = parse_args(pretrain_parser(), ["--lr_schedule", "wsd", "--decay_fraction", "0.1", "--decay_shape", "sqrt"])
    assert (a.lr_schedule, a.decay_fraction, a.decay_shape) == ("wsd", 0.1, "sqrt")
    assert parse_args(pretrain_parser(), []).lr_schedule == "cosine"  # the default is unchanged
    with pytest.raises((ConfigError, SystemExit)):
        parse_args(pretrain_parser(), ["--decay_fraction", "0"])
    with pytest.raises((ConfigError, SystemExit)):
        parse_args(pretrain_parser(), ["--lr_schedule", "step"])
    line = schedule_line(100, 10, 4, 1e-3, None, 1.6e-3, "videos", 160, "wsd", 0.2, "sqrt")
    assert "wsd: constant to epoch 80, then sqrt decay over the last 20 (80 effective)" in line


def test_wsd_per_step_lrs_split_at_any_step_match_the_uninterrupted_sequence() -> None:
    """In-process: the trainer's position (epoch + consumed / samples_per_epoch) restored mid-epoch gives the same lrs."""
    samples, batch, epochs = 24, 2, 3  # 12 steps per epoch

    def lr_of(epoch: int, consumed: int) -> float:
        return lr_at(epoch + consumed / samples, 1e-3, 0.0, 0.5, epochs, "wsd", 0.5, "sqrt")

    def run(start: tuple[int, int] = (0, 0)) -> list[float]:
        out, (epoch, consumed) = [], start
        while epoch < epochs:
            out.append(lr_of(epoch, consumed))
            consumed += batch
            if consumed == samples:
                epoch, consumed = epoch + 1, 0
        return out

    full = run()
    for step in (3, 15, 20, 29):  # mid-epoch, in warm-up, stable and decay phases
        assert run((step // 12, 2 * (step % 12))) == full[step:]
    assert full[6:18] == [1e-3] * 12  # stable from epoch 0.5 to 1.5 exactly
    assert all(a > b for a, b in zip(full[18:], full[19:], strict=False))  # strictly decaying after


def lrs(out: Path) -> dict[int, float]:
    """Per-step lrs of log.jsonl (the last entry of a step logged twice)."""
    return {r["step"]: r["lr"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "lr" in r}


@pytest.mark.slow  # end-to-end subprocess runs (10-60 s on 2 cores): .ci/run's slow step runs it
def test_wsd_exact_resume_after_sigkill(tmp_path: Path) -> None:
    """A wsd run SIGKILLed after a mid-epoch save in its decay phase, then resumed, logs the same losses and lrs."""
    # 1 process, 8 steps per epoch (16 of the 24 generated videos train), 2 epochs: warm-up 0.5, stable to
    # epoch 1, then the sqrt decay; saved at step 11 of 16 (epoch 1, step 3 of 8: mid-epoch, inside the decay).
    args = ["--epochs", "2", "--warmup_epochs", "0.5", "--lr_schedule", "wsd", "--decay_fraction", "0.5",
            "--decay_shape", "sqrt", "--save_every", "11", "--precision", "fp32"]
    ref = tmp_path / "ref"
    proc = subprocess.run(command(ref, 1, args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected, expected_lr = losses(ref), lrs(ref)
    # step s runs at position (s - 1) / 8: peak from step 5 (epoch 0.5) through step 9 (epoch 1), then decaying
    assert len(expected) == 16 and expected_lr[5] == expected_lr[7] == expected_lr[9] > expected_lr[4]
    assert expected_lr[16] < expected_lr[12] < expected_lr[10] < expected_lr[9]

    out = tmp_path / "killed"
    kill_at_checkpoint(command(out, 1, args), out, 11)
    assert (out / "checkpoints" / "latest").resolve().name == "step-11"

    resumed = subprocess.run(command(out, 1, args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got, got_lr = losses(out), lrs(out)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6 * max(1.0, abs(loss)), (step, got[step], loss)
        assert got_lr[step] == pytest.approx(expected_lr[step], rel=1e-12, abs=0), step
