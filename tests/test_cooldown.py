"""Cooldown: a run at 8 frames starting from a 4-frame pretraining checkpoint, optimizer state kept.

Default suite: the cooldown's starting state (positional tables = the interpolation of the saved ones;
AdamW moments carried except for the resized tables, which restart at step 0) and the refusal without
a folder. Slow: an FSDP2 (DCP) pretraining run, then a wsd cooldown SIGKILLed after a mid-epoch save
and resumed, logging the uninterrupted run's losses and lrs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from test_lr_schedule import lrs
from test_pretrain import FAST, ROOT, command, env, kill_at_checkpoint, losses

import tasks
from main_pretrain import build_task, get_args_parser
from models.video_vit import resize_temporal_pos_embed
from util.config import ConfigError, flag_values, run_config
from util.safe_load import load_weights_file
from util.trainer import Trainer

PRETRAIN = ["--epochs", "1", "--save_every", "0", "--precision", "fp32"]
COOLDOWN = ["--num_frames", "8", "--pred_t_dim", "4", "--init_optimizer", "keep", "--lr_schedule", "wsd",
            "--decay_fraction", "1", "--warmup_epochs", "0", "--epochs", "1", "--precision", "fp32"]
RESIZED = {"pos_embed_temporal", "decoder_pos_embed_temporal"}


def pretrain(out: Path, extra: list[str] = ()) -> Path:
    """A 4-frame pretraining run (8 steps) that saves at its end; returns its output folder."""
    proc = subprocess.run(command(out, 1, [*PRETRAIN, *extra]), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def set_up(argv: list[str]) -> Trainer:
    """A Trainer set up in this process (model, weights, backend, optimizer), without data."""
    args = tasks.parse("pretrain", argv)
    trainer = Trainer(run_config(args), build_task(args), flag_values(args, get_args_parser(["--objective", "mae"])))
    trainer.setup(train=False)
    return trainer


@pytest.mark.slow  # end-to-end subprocess runs (10-60 s on 2 cores): .ci/run's slow step runs it
def test_cooldown_starts_from_interpolated_tables_and_kept_moments(tmp_path: Path) -> None:
    """Step 0 of the cooldown: resized tables interpolate the saved ones; other moments and steps are the saved ones."""
    pre = pretrain(tmp_path / "pre")
    saved = load_weights_file(pre / "checkpoints" / "latest" / "state" / "model.pt")
    trainer = set_up(["--output_dir", str(tmp_path / "cool"), *FAST, *COOLDOWN, "--init_from", str(pre)])
    model = trainer.backend.unwrapped
    for name in RESIZED:
        got, old = getattr(model, name).detach(), saved["model"][name]
        assert got.shape[1] == 2 * old.shape[1] == 4
        assert torch.equal(got, resize_temporal_pos_embed(old, 4)), name
    assert torch.equal(model.pos_embed_spatial.detach(), saved["model"]["pos_embed_spatial"])
    names = {p: n for n, p in model.named_parameters()}
    state = {names[p]: s for p, s in trainer.backend.optimizer.state.items()}
    old_state = saved["optimizer"]["state"]
    assert set(state) == set(old_state) and len(state) > 20
    for name, s in state.items():
        if name in RESIZED:
            assert float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any(), name
        else:
            assert float(s["step"]) == float(old_state[name]["step"]) == 8, name
            assert torch.equal(s["exp_avg"], old_state[name]["exp_avg"]), name
            assert torch.equal(s["exp_avg_sq"], old_state[name]["exp_avg_sq"]), name
    trainer.release()


def test_keep_needs_a_folder_to_keep_from(tmp_path: Path) -> None:
    """--init_optimizer keep without --init_from (or with a weights file) is refused, naming the way out."""
    with pytest.raises(ConfigError, match="--init_optimizer keep needs --init_from a run or checkpoint folder"):
        set_up(["--output_dir", str(tmp_path / "cool"), *FAST, *COOLDOWN])


@pytest.mark.slow
def test_fsdp_cooldown_resumes_exactly_after_sigkill(tmp_path: Path) -> None:
    """FSDP2 (DCP state) 4-frame run, then an 8-frame wsd cooldown (12 steps, saved at step 5), killed and resumed."""
    pre = pretrain(tmp_path / "pre", ["--dist", "fsdp"])
    args = [*COOLDOWN, "--init_from", str(pre), "--dist", "fsdp", "--save_every", "5", "--synthetic_videos", "36"]
    ref = tmp_path / "ref"
    proc = subprocess.run(command(ref, 1, args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fresh (shape changed or absent): ['decoder_pos_embed_temporal', 'pos_embed_temporal']" in proc.stderr
    expected, expected_lr = losses(ref), lrs(ref)
    assert len(expected) >= 8 and expected_lr[len(expected)] < expected_lr[1]  # the decay phase throughout

    out = tmp_path / "killed"
    kill_at_checkpoint(command(out, 1, args), out, 5)
    resumed = subprocess.run(command(out, 1, args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got, got_lr = losses(out), lrs(out)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6 * max(1.0, abs(loss)), (step, got[step], loss)
        assert got_lr[step] == pytest.approx(expected_lr[step], rel=1e-12, abs=0), step
