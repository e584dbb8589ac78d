"""The video-text loss over the global batch: 2 gloo ranks (DDP, FSDP2, ZeRO-1/3) against one plain process.

Each rank embeds its half of the global batch and gathers the other half's embeddings with gradients
(util.gather); one torchrun launch (tests/dist/videotext_worker.py) runs every scenario. Tolerances are
reduction order only (fp32): losses 1e-5 relative; the first step's gradients 2e-6 of the largest one (seen: 3e-7).
A missing gather (each rank contrasting only its own half) changes the loss at the first step; a gather
without gradients halves the gradients through the other rank's rows; both fail here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from dist_launch import torchrun  # noqa: E402

SCENARIOS = ["ddp", "fsdp", "zero1", "zero3", "ddp:smaug", "fsdp:smaug", "zero3:smaug"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every scenario once on 2 ranks."""
    out = tmp_path_factory.mktemp("videotext_two_ranks")
    torchrun(2, "videotext_worker.py", out, *SCENARIOS, timeout=900)
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_global_batch_loss_and_gradients_match_one_process(results: dict, scenario: str) -> None:
    r = results[scenario]
    assert results["world_size"] == 2
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(r["losses"], r["ref_losses"], strict=True)), r
    assert not r["missing"], r
    assert r["max_abs_grad_diff"] <= 2e-6 * r["max_abs_grad"], r
