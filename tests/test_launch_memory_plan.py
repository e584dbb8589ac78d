"""benchmarks/memory_plan.py: the activation formula matches autograd's saved tensors; ViT-H fits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import memory_plan  # noqa: E402


def test_block_formula_matches_saved_tensors_on_cpu() -> None:
    for kind, measured, formula in memory_plan.calibrate(batch=2, tokens=57, dim=64, heads=4):
        assert abs(measured / formula - 1) < 0.01, (kind, measured, formula)


def test_sharding_divides_states_and_checkpointing_cuts_activations() -> None:
    rows = {r["backend"]: r for r in memory_plan.plan("mae_vit_huge_patch16", 8, 0.9, "bf16", 64, memory_plan.BACKENDS)}
    assert rows["zero3"]["params"] < rows["zero2"]["params"] < rows["ddp"]["params"]
    assert rows["fsdp"]["optim"] == pytest.approx(rows["ddp"]["optim"] / 64)
    assert all(r["act_ckpt"] < r["act"] / 3 for r in rows.values())
    assert rows["fsdp"]["total_ckpt"] < 80  # the ViT-H recipe fits on 80 GB GPUs


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    memory_plan.main(["--model", "mae_vit_huge_patch16", "--world_size", "64"])
    out = capsys.readouterr().out
    assert "| fsdp |" in out and "| zero3 |" in out and "computed" in out
