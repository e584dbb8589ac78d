"""Attentive probe (V-JEPA's frozen-feature protocol): frozen encoder, grid of probes, selection, end to end, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from main_finetune import get_args_parser
from models import create_model
from models.probe import AttentiveProbe, ProbeGrid
from tasks.classify import FinetuneTask, make_task
from util.config import ConfigError, parse_args, run_config
from util.evaluate import evaluate
from util.lr_sched import apply_lr
from util.optim import build_optimizer
from util.trainer import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model", "vit_micro_patch8", "--input_size", "32", "--num_frames", "4", "--num_classes", "8"]


def grid_model(hparams: list[tuple[float, float]], queries: int = 1, blocks: int = 0) -> ProbeGrid:
    torch.manual_seed(0)
    enc = create_model("vit_micro_patch8", img_size=32, num_frames=4, num_classes=8, drop_path_rate=0.5, dropout=0.5)
    return ProbeGrid(enc, AttentiveProbe(enc.embed_dim, 4, 8, queries, blocks), hparams)


def test_encoder_is_frozen_in_eval_mode_and_only_the_probes_learn() -> None:
    model = grid_model([(1.0, 0.01), (0.5, 0.1)], queries=3, blocks=1).train()
    assert not model.encoder.training and model.probes[0].training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert model.probes[0].query_tokens.shape == (1, 3, 128)
    clips = torch.randn(2, 3, 4, 32, 32)
    logits = model(clips)
    assert logits.shape == (2, 2, 8)
    torch.testing.assert_close(logits[:, 0], logits[:, 1])  # identical start: the grid differs only in lr/wd
    # eval-mode encoder: drop path 0.5 and dropout are off, so the tokens are deterministic
    torch.testing.assert_close(model.features(clips), model.features(clips), rtol=0, atol=0)
    assert not model.features(clips).requires_grad
    logits.sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.probes.parameters())
    model.selected = 1
    assert model(clips).shape == (2, 8)


def test_each_probe_has_its_own_optimizer_group() -> None:
    model = grid_model([(1.0, 0.01), (0.3, 0.1)])
    cfg = SimpleNamespace(weight_decay=0.05, layer_decay=0.75, wd_skip="tokens", opt_betas=[0.9, 0.999])
    opt = build_optimizer(model, cfg, 1e-3, torch.device("cpu"))
    seen = {}
    names = dict((id(p), n) for n, p in model.named_parameters())
    for g in opt.param_groups:
        for p in g["params"]:
            seen[names[id(p)]] = (g["lr"], g["weight_decay"])
    assert all(n.startswith("probes.") for n in seen)  # nothing of the frozen encoder
    assert seen["probes.0.linear.weight"] == (pytest.approx(1e-3), 0.01)
    assert seen["probes.1.query_tokens"] == (pytest.approx(3e-4), 0.1)
    assert seen["probes.1.linear.bias"] == (pytest.approx(3e-4), 0.0)  # biases and norms never decay


def train_probe_losses(flags: list[str], steps: int = 4) -> list[dict[str, float]]:
    """The task's own model, loss and optimizer groups, trained as the Trainer steps (lr schedule, seed per step)."""
    args = parse_args(get_args_parser(), [*MODEL, "--probe", "attentive", "--batch_size", "2", *flags])
    task = make_task(args)
    cfg = apply_overrides(run_config(args), task.run_overrides(), {})
    torch.manual_seed(cfg.loop.seed)
    model = task.build_model(SimpleNamespace(cfg=cfg)).train()
    opt = build_optimizer(model, cfg.optim, cfg.optim.lr, torch.device("cpu"))
    data = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        apply_lr(opt.param_groups, cfg.optim.lr * (1 - step / steps))
        torch.manual_seed(100 + step)
        batch = {"clips": torch.randn(4, 3, 4, 32, 32, generator=data), "label": torch.randint(0, 8, (4,), generator=data)}
        losses = task.loss(model, batch)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append({k: float(v.detach()) for k, v in losses.items()})
    return out


def test_grid_trains_each_probe_as_it_trains_alone() -> None:
    lrs, wds = [1e-2, 3e-3], [0.0, 0.5]
    grid = train_probe_losses(["--probe_lrs", ",".join(map(str, lrs)), "--probe_wds", ",".join(map(str, wds)),
                               "--probe_val_split", "val"])
    i = 0
    for lr in lrs:
        for wd in wds:
            alone = train_probe_losses(["--probe_lrs", str(lr), "--probe_wds", str(wd)])
            got = [s[f"loss_probe{i}"] for s in grid]
            assert got == pytest.approx([s["loss"] for s in alone], abs=1e-6), (lr, wd)
            i += 1
    # the grid's settings matter: after training, the probes' losses differ
    assert len({round(grid[-1][f"loss_probe{j}"], 5) for j in range(4)}) == 4


def test_grid_flags_are_checked() -> None:
    def task(*flags: str) -> FinetuneTask:
        return make_task(parse_args(get_args_parser(), [*MODEL, *flags]))

    with pytest.raises(ConfigError, match="--probe_val_split"):
        task("--probe", "attentive", "--probe_lrs", "1e-3,3e-4")
    with pytest.raises(ConfigError, match="--probe attentive"):
        task("--probe_lrs", "1e-3")
    with pytest.raises(ConfigError, match="--linprobe"):
        task("--linprobe", "--probe", "attentive")
    with pytest.raises(SystemExit):  # the parser's range check: "comma-separated numbers >= 0"
        task("--probe", "attentive", "--probe_wds", "0.1,x")
    assert task("--probe", "linear").kind == task("--linprobe").kind == "linear"
    t = task("--probe", "attentive", "--probe_lrs", "1e-3,5e-4", "--probe_wds", "0.01,0.1,0.4",
             "--probe_val_split", "val")
    assert t.grid_size == 6 and t.run_overrides() == {"clip_grad": 0.0, "lr": 1e-3}
    assert t.grid(0.05)[3] == (0.5, 0.01)


def test_per_head_scores_equal_each_head_scored_alone() -> None:
    model = grid_model([(1.0, 0.0), (1.0, 0.0), (1.0, 0.0)]).eval()
    for i, probe in enumerate(model.probes):  # three different probes
        torch.manual_seed(i)
        probe.linear.weight.data.normal_(0, 1)
    clips = torch.randn(6, 3, 4, 32, 32)
    batches = [{"clips": clips[j:j + 2], "index": torch.tensor([j // 2, j // 2 + 3]) % 3,
                "label": torch.tensor([j % 8, (j + 1) % 8])} for j in range(0, 6, 2)]
    for b in batches:  # labels per video consistent: video v has label v
        b["label"] = b["index"].clone()
    res = evaluate(model, batches, 3, 8, torch.device("cpu"), expected_views=2, heads=3)
    for i in range(3):
        model.selected = i
        alone = evaluate(model, batches, 3, 8, torch.device("cpu"), expected_views=2)
        assert res["heads"][i]["top1"] == alone["top1"] and res["heads"][i]["top5"] == alone["top5"]
        torch.testing.assert_close(res["heads"][i]["scores"], alone["scores"])
    model.selected = None


TINY = ["--synthetic_videos", "24", "--input_size", "32", "--num_frames", "4", "--batch_size", "2",
        "--repeat_aug", "1", "--num_workers", "0", "--log_every", "1", "--mixup", "0", "--cutmix", "0",
        "--test_num_temporal_views", "2", "--test_num_spatial_crops", "1", "--model", "vit_micro_patch8",
        "--eval_split", "test", "--probe", "attentive", "--probe_lrs", "1e-3,3e-4", "--probe_wds", "0.01,0.1",
        "--probe_val_split", "val", "--precision", "fp32"]


def command(out: Path, nproc: int, *extra: str) -> list[str]:
    base = [sys.executable]
    if nproc > 1:
        from tests.test_pretrain import free_port

        base += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return [*base, str(ROOT / "main_finetune.py"), "--output_dir", str(out), *TINY, *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


def logged(out: Path) -> dict[int, dict]:
    """Per-step records of log.jsonl with losses (the last one of a step logged twice, before a kill)."""
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "loss" in r}


@pytest.mark.slow  # end-to-end subprocess runs (10-60 s on 2 cores): .ci/run's slow step runs it
def test_main_finetune_attentive_probe_grid_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "probe"
    proc = subprocess.run(command(out, 1, "--max_steps", "2", "--epochs", "1"), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = logged(out)
    assert sorted(steps) == [1, 2] and all(f"loss_probe{i}" in steps[2] for i in range(4))
    assert steps[2]["loss"] == pytest.approx(sum(steps[2][f"loss_probe{i}"] for i in range(4)), rel=1e-5)
    grid = json.loads((out / "probe_grid.json").read_text())
    assert grid["split"] == "val" and len(grid["probes"]) == 4 and 0 <= grid["chosen"] < 4
    # flat: pytest.approx takes no nested tuples on newer pytest (the 3.13 venv's)
    assert [v for p in grid["probes"] for v in (p["lr"], p["weight_decay"])] == pytest.approx(
        [1e-3, 0.01, 1e-3, 0.1, 3e-4, 0.01, 3e-4, 0.1])
    final = json.loads((out / "eval_test.json").read_text())
    assert final["videos"] > 0 and final["views"] == 2 * final["videos"]
    config = yaml.safe_load((out / "config.yaml").read_text())  # the task's overrides are recorded
    assert config["clip_grad"] == 0.0 and config["lr"] == pytest.approx(1e-3)
    again = subprocess.run(command(out, 1, "--max_steps", "2", "--epochs", "1", "--eval"), cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=600)  # re-tests the run's latest checkpoint
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    retest = json.loads((out / "eval_test.json").read_text())
    assert (retest["top1"], retest["top5"]) == (final["top1"], final["top5"])
    assert json.loads((out / "probe_grid.json").read_text())["probes"] == grid["probes"]


@pytest.mark.slow
def test_two_rank_ddp_probe_resumes_exactly_after_sigkill(tmp_path: Path) -> None:
    """2-process DDP (gloo): SIGKILL after a mid-epoch save, resume, same per-probe losses as one clean run."""
    args = ["--epochs", "2", "--save_every", "2", "--synthetic_videos", "40", "--eval_every", "0"]
    ref = tmp_path / "ref"
    proc = subprocess.run(command(ref, 2, *args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = logged(ref)
    out = tmp_path / "killed"
    victim = subprocess.Popen(command(out, 2, *args), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if latest.is_symlink() and latest.resolve().name == "step-2":
            break
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert int(latest.resolve().name.split("-")[1]) < max(expected)
    resumed = subprocess.run(command(out, 2, *args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got = logged(out)
    assert sorted(got) == sorted(expected)
    for step, rec in expected.items():
        for key in ["loss", *(f"loss_probe{i}" for i in range(4))]:
            assert abs(got[step][key] - rec[key]) <= 1e-6 * max(1.0, abs(rec[key])), (step, key)
    assert json.loads((out / "eval_test.json").read_text())["top1"] == json.loads(
        (ref / "eval_test.json").read_text())["top1"]
