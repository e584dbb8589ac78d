"""DDP, FSDP2 (flat; HSDP as 2 replicas x 1 shard) and ZeRO-1/2/3 on 2 gloo ranks against one plain process.

One torchrun launch runs every scenario (tests/dist/worker.py); the tests below only read its results.
Tolerances cover floating-point reduction order only (fp32):
- losses and pre-clip grad norms: 1e-5 relative;
- parameters after 3 AdamW steps (lr 1e-3, layer decay 0.75): 3e-5 absolute. Not 1e-5 relative, because
  Adam divides by sqrt(v) + eps: a gradient that is zero in exact arithmetic (the attention key bias) is
  pure rounding noise whose update is ~lr * noise / eps, ~1.4e-5 apart between reduction orders here;
  elsewhere parameters agree to ~1e-6. A real bug (missed sync, wrong lr scale, other masks) moves
  parameters by >= 1e-4 (one lr step).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from common import make_model  # noqa: E402
from dist_launch import python, run, torchrun  # noqa: E402

from util.safe_load import load_weights_file  # noqa: E402
from util.weights import export_weights  # noqa: E402

PARITY = ["ddp", "ddp:accum=2", "fsdp", "fsdp:accum=2", "fsdp:hsdp=1", "fsdp:hsdp=1:accum=2", "zero1", "zero2",
          "zero2:accum=2", "zero3"]
HALF = ["ddp:bf16", "ddp:fp16", "fsdp:bf16", "zero2:bf16"]
CKPT_EQUIV = ["ckpt_equiv=fsdp", "ckpt_equiv=zero3"]
SHORT = ["short_accum=ddp"]
NOCLIP = ["fsdp:noclip", "zero2:noclip"]
LOSS_RTOL, PARAM_ATOL = 1e-5, 3e-5


@pytest.fixture(scope="session")
def two_rank_results(tmp_path_factory) -> tuple[dict, object]:
    """Run every scenario once on 2 ranks; returns (results, output dir holding their checkpoints)."""
    out = tmp_path_factory.mktemp("two_ranks")
    torchrun(2, "worker.py", out, *PARITY, *HALF, *CKPT_EQUIV, *SHORT, *NOCLIP, timeout=900)
    return json.loads((out / "results.json").read_text()), out


def close(a: list[float], b: list[float], rtol: float) -> bool:
    """Element-wise relative closeness of two equally long lists."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rtol, abs_tol=0) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("scenario", PARITY)
def test_two_ranks_match_one_process(two_rank_results, scenario: str) -> None:
    """Per-step losses, grad norms and final parameters equal the 1-process run (accum=2 uses half micro-batches)."""
    r = two_rank_results[0][scenario]
    assert close(r["losses"], r["ref_losses"], LOSS_RTOL), r
    assert close(r["norms"], r["ref_norms"], LOSS_RTOL), r
    assert r["params"]["max_abs"] <= PARAM_ATOL, r["params"]


@pytest.mark.parametrize("scenario", PARITY)
def test_save_load_round_trip_continues_identically(two_rank_results, scenario: str) -> None:
    """Save at step 3, train 2 steps, load, train the same 2 steps: the same losses (<= 1e-6), which also match the reference."""
    r = two_rank_results[0][scenario]
    assert close(r["after_load"], r["after_save"], 1e-6), r
    assert close(r["after_load"], r["ref_after"], LOSS_RTOL), r


@pytest.mark.parametrize("scenario", HALF)
def test_half_precision_trains_and_resumes(two_rank_results, scenario: str) -> None:
    """bf16/fp16 run end to end (DeepSpeed casts the clips), stay near fp32 and resume exactly."""
    r = two_rank_results[0][scenario]
    assert close(r["losses"], r["ref_losses"], 5e-2), r
    assert r["losses"][-1] < r["losses"][0]
    assert close(r["after_load"], r["after_save"], 1e-6), r


@pytest.mark.parametrize("scenario", NOCLIP)
def test_grad_norm_reported_without_clipping(two_rank_results, scenario: str) -> None:
    """With clipping off the backends still return the pre-step grad norm (step 1 equals the reference's)."""
    r = two_rank_results[0][scenario]
    assert math.isclose(r["norms"][0], r["ref_norms"][0], rel_tol=LOSS_RTOL), r
    assert all(math.isfinite(n) for n in r["norms"]) and r["losses"][-1] < r["losses"][0]


@pytest.mark.parametrize("scenario", CKPT_EQUIV)
def test_activation_checkpointing_same_loss_and_grads(two_rank_results, scenario: str) -> None:
    """Checkpointed blocks recompute exactly: the same loss and the same full gradient of every parameter."""
    r = two_rank_results[0][scenario]
    assert r["num_grads"] > 20
    assert r["loss_ckpt"] == pytest.approx(r["loss"], rel=1e-6)
    assert r["grads"]["max_abs"] <= 1e-6, r["grads"]


def test_ddp_accumulation_cut_short_still_syncs(two_rank_results) -> None:
    """DDP picks no_sync at forward time from the micro-step count; ending a step early must still average grads."""
    assert two_rank_results[0]["short_accum=ddp"]["max_abs_diff_to_rank0"] == 0.0


@pytest.fixture(scope="session")
def fsdp_on_one_rank(two_rank_results) -> dict:
    """Resume the 2-rank FSDP2 checkpoint (step 3) in one plain process and train steps 4-5."""
    _, out = two_rank_results
    one = out / "one_rank"
    one.mkdir()
    key = f"resume_from={out / 'fsdp'},fsdp"
    python("worker.py", one, key)
    return json.loads((one / "results.json").read_text())[key]


def test_fsdp_checkpoint_from_two_ranks_resumes_on_one(two_rank_results, fsdp_on_one_rank) -> None:
    """DCP reshards on load: 1 process continues with the losses the 2 ranks had (reduction order only)."""
    r = fsdp_on_one_rank
    assert (r["saved_world"], r["global_step"]) == (2, 3)
    assert close(r["losses"], two_rank_results[0]["fsdp"]["after_save"], LOSS_RTOL), r


@pytest.mark.parametrize("scenario, via_cli", [("fsdp", True), ("zero3", True), ("zero2", False), ("ddp", False)])
def test_export_gives_plain_weights(two_rank_results, tmp_path, scenario: str, via_cli: bool) -> None:
    """Offline export of each backend's checkpoint loads strictly into a plain model and equals the live weights."""
    _, out = two_rank_results
    ckpt, weights = out / scenario / "checkpoints" / "latest", tmp_path / "weights.pth"
    if via_cli:
        run([sys.executable, "-m", "util.checkpoint", "export", str(ckpt), str(weights)])
        if scenario == "fsdp":
            info = run([sys.executable, "-m", "util.checkpoint", "info", str(ckpt)])
            assert "global_step: 3" in info and "world_size: 2" in info and "format: dcp" in info
    else:
        export_weights(ckpt, weights)
    sd = load_weights_file(weights)["model"]
    model = make_model()
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    live = load_weights_file(out / scenario / "full_state_step3.pt")
    assert sorted(live) == sorted(sd)
    assert all(torch.equal(sd[k], live[k]) for k in sd)
