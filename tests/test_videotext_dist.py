"""The video-text loss over the global batch: 2 gloo ranks (DDP, FSDP2, ZeRO-1/3) against one plain process.

Each rank embeds its half of the global batch and gathers the other half's embeddings with gradients
(util.gather); one torchrun launch (tests/dist/videotext_worker.py) runs several scenarios. Tolerances are
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

# The default suite runs one torchrun launch with plain DDP and FSDP2 + SMAUG (sharded gradients, the MAE
# loss and token sparsification); the other backends and combinations are a second launch, marked slow.
QUICK = ["ddp", "fsdp:smaug"]
FULL = ["fsdp", "zero1", "zero3", "ddp:smaug", "zero3:smaug"]


def launch(out: Path, scenarios: list[str]) -> dict:
    """Every scenario once on 2 ranks, in one launch."""
    torchrun(2, "videotext_worker.py", out, *scenarios, timeout=900)
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """The default suite's scenarios."""
    return launch(tmp_path_factory.mktemp("videotext_two_ranks"), QUICK)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict:
    """The slow suite's scenarios."""
    return launch(tmp_path_factory.mktemp("videotext_two_ranks_full"), FULL)


def check(results: dict, scenario: str) -> None:
    """Global losses equal the one-process ones on every step; first-step gradients equal to float order."""
    r = results[scenario]
    assert results["world_size"] == 2
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(r["losses"], r["ref_losses"], strict=True)), r
    assert not r["missing"], r
    assert r["max_abs_grad_diff"] <= 2e-6 * r["max_abs_grad"], r


@pytest.mark.parametrize("scenario", QUICK)
def test_global_batch_loss_and_gradients_match_one_process(quick: dict, scenario: str) -> None:
    check(quick, scenario)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", FULL)
def test_global_batch_loss_and_gradients_match_one_process_every_backend(full: dict, scenario: str) -> None:
    check(full, scenario)
