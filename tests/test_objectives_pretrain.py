"""The new objectives through the real scripts: rho-BYOL / rho-MoCo killed mid-epoch and resumed log the same
losses as an uninterrupted run (momentum encoder and queue come back from the checkpoint), their encoders go
through main_finetune.py's linear probe; AMT's attention pass on 2 ranks gives the table of 1 rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_pretrain import ROOT, SHARED_FAST, command, env, losses

RHO = ["--proj_dim", "16", "--proj_hidden_dim", "32", "--pred_hidden_dim", "32", "--moco_queue", "64",
       "--rho_rand_aug", "", "--rho", "2"]


@pytest.mark.slow  # 2-rank runs, a kill and a resume, a probe: minutes on 2 cores (.ci/run runs it)
@pytest.mark.parametrize(("objective", "backend"), [("rho_byol", ["--dist", "ddp"]), ("rho_moco", ["--dist", "fsdp"])],
                         ids=["byol-ddp", "moco-fsdp"])
def test_rho_killed_and_resumed_gives_the_same_losses_then_linear_probe(tmp_path: Path, objective: str,
                                                                         backend: list[str]) -> None:
    args = ["--objective", objective, *RHO, "--epochs", "2", "--save_every", "3", "--precision", "fp32", *backend]
    ref = tmp_path / "ref"
    proc = subprocess.run(command(ref, 2, args, SHARED_FAST), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = losses(ref)

    out = tmp_path / "killed"
    victim = subprocess.Popen(command(out, 2, args, SHARED_FAST), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if latest.is_symlink() and latest.resolve().name == "step-3":  # mid-epoch (4 steps per epoch)
            break
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert int(latest.resolve().name.split("-")[1]) < max(expected)
    resumed = subprocess.run(command(out, 2, args, SHARED_FAST), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got = losses(out)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6 * max(1.0, abs(loss)), (step, got[step], loss)

    # The encoder goes into the existing linear probe (frozen ViT + BatchNorm + linear head) as it is.
    probe = subprocess.run(
        [sys.executable, str(ROOT / "main_finetune.py"), "--output_dir", str(tmp_path / "probe"), "--finetune", str(out),
         "--linprobe", "--model", "vit_micro_patch8", "--synthetic_videos", "24", "--input_size", "32",
         "--num_frames", "4", "--batch_size", "2", "--repeat_aug", "1", "--num_workers", "0", "--epochs", "1",
         "--test_num_temporal_views", "1", "--test_num_spatial_crops", "1", "--mixup", "0", "--cutmix", "0"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    assert "missing (0 encoder), 0 unexpected" in probe.stdout + probe.stderr  # only the new head is missing
    assert (tmp_path / "probe" / "eval_test.json").is_file()


@pytest.mark.slow  # two real pretraining runs, one on 2 ranks (.ci/run runs it)
def test_amt_attention_pass_on_two_ranks_matches_one_rank(tmp_path: Path) -> None:
    """2 DDP ranks (which must not broadcast the table) gather the same attention table as 1 process on the same batches.

    The attention forward through FSDP2 and ZeRO-3 is checked in test_objectives_dist.py.
    """
    args = ["--mask_type", "amt", "--mask_ratio", "0.75", "--throw_ratio", "0.3", "--amt_warmup_epochs", "1",
            "--amt_refresh_epochs", "1", "--epochs", "2", "--precision", "fp32", "--vis_every", "0"]
    tables = []
    for name, nproc, extra in (("one", 1, []), ("two", 2, ["--dist", "ddp", "--grad_ckpt", "--batch_size", "1"])):
        out = tmp_path / name
        proc = subprocess.run(command(out, nproc, [*args, *extra]), cwd=ROOT, env=env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        from util.weights import read_weights

        tables.append(read_weights(out)["amt_attention"].int())
    one, two = tables
    assert one.shape[0] == 17 and not (one == 255).all()  # every training video got the model's attention
    assert (one - two).abs().max() <= 1  # uint8 levels: at most a rounding step apart
    assert torch.equal(one.float().std(dim=(1, 2, 3)) > 0, torch.ones(17, dtype=torch.bool))  # maps, not constants
