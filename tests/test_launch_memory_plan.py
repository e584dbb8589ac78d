"""benchmarks/memory_plan.py: the activation formula matches autograd's saved tensors (every checkpointing mode);
ViT-H fits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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


def test_fit_takes_the_largest_power_of_two_batch_under_the_budget() -> None:
    """fit() returns a batch whose computed total fits, the next power of two does not, and the GPUs x accum
    make up 512 clips."""
    best = memory_plan.fit("mae_vit_large_patch16", 68, "ddp", 0.9, "bf16", False)
    assert best["computed_gib"] <= 68 and best["clips_per_gpu"] * best["gpus_x_accum"] == 512
    bigger = 2 * best["clips_per_gpu"]
    over = memory_plan.plan("mae_vit_large_patch16", bigger, 0.9, "bf16", 512 // bigger, ("ddp",))[0]
    assert over["total"] > 68
    with_ckpt = memory_plan.fit("mae_vit_large_patch16", 68, "ddp", 0.9, "bf16", True)
    assert with_ckpt["batch_size"] > best["batch_size"]  # checkpointing trades FLOPs for a larger batch
    assert memory_plan.fit("mae_vit_huge_patch16", 1, "ddp", 0.9, "bf16", False) is None


def test_one_process_ddp_has_no_gradient_bucket_copy() -> None:
    """One process trains the plain module (util.parallel.DDPBackend): grads once; with 2 ranks DDP's buckets double them."""
    one, two = (memory_plan.plan("mae_vit_base_patch16", 8, 0.9, "bf16", w, ("ddp",))[0] for w in (1, 2))
    assert one["grads"] == pytest.approx(one["params"]) and two["grads"] == pytest.approx(2 * two["params"])


def test_vit_g_rows_count_its_wider_mlp_and_the_recipe_fits_80gb_with_fsdp_and_checkpointing() -> None:
    """ViT-g's MLP is 48/11 x dim, not 4 x: the Block formula follows fc1's width; configs/pretrain/vit_g_hybrid.yaml
    (32 videos x 4 clips per GPU, 64 GPUs, FSDP + checkpointing, bf16) fits an 80 GB GPU by the computed total."""
    shape = memory_plan.model_shape("mae_vit_giant_patch14", 16, 224)
    assert (shape["dim"], shape["mlp"], shape["depth"], shape["dec_mlp"]) == (1408, 6144, 40, 2234)
    assert 1.0e9 < shape["params"] < 1.1e9
    wide = memory_plan.block_bytes(1, 100, 1408, 16, "fp32", 6144)
    assert wide - memory_plan.block_bytes(1, 100, 1408, 16, "fp32") == 100 * 2 * (6144 - 4 * 1408) * 4
    rows = {r["backend"]: r for r in memory_plan.plan("mae_vit_giant_patch14", 128, 0.9, "bf16", 64, ("ddp", "fsdp"))}
    assert rows["fsdp"]["total_ckpt"] < 80 < rows["ddp"]["total"]


def test_planner_kept_bytes_agree_with_autograd_within_10_percent() -> None:
    """For every mode and dtype layout (and ViT-g's MLP), the formula is within 10% of what the graph keeps;
    the modes order as they must (so a mode that was not applied fails)."""
    rows = memory_plan.calibrate_modes(batch=2, tokens=57, dim=64, heads=4, depth=4, every=2)
    assert len(rows) == 12
    for mode, kind, measured, formula in rows:
        assert abs(measured / formula - 1) < 0.10, (mode, kind, measured, formula)
    for kind in {k for _, k, _, _ in rows}:
        got = {m: measured for m, k, measured, _ in rows if k == kind}
        assert got["block"] < got["every_k"] < got["none"], (kind, got)
        assert got["block"] < got["selective"] < got["none"], (kind, got)


def test_kept_bytes_is_autograd_saved_tensors_without_checkpointing() -> None:
    """Without checkpointing the graph holds exactly autograd's saved tensors: the two measurements agree."""
    from models.video_vit import Block

    torch.manual_seed(0)
    stack = memory_plan.BlockStack([Block(64, 4) for _ in range(2)])
    x = torch.randn(2, 57, 64, requires_grad=True)
    params = tuple(stack.parameters())
    assert memory_plan.kept_bytes(stack, x, exclude=params) == memory_plan.saved_bytes(stack, x, exclude=params) > 0


def test_plan_rows_per_mode() -> None:
    """The model-level figures: block is the old 'ckpt' column, none the old plain one; every_k and selective lie
    between them; a larger k keeps more."""
    rows = memory_plan.plan("mae_vit_large_patch16", 8, 0.9, "bf16", 8, ("ddp", "fsdp"))
    for r in rows:
        a = r["act_modes"]
        assert a["block"] == pytest.approx(r["act_ckpt"]) and a["none"] == pytest.approx(r["act"])
        assert a["block"] < a["every_k"] < a["none"] and a["block"] < a["selective"] < a["none"]
    k4 = memory_plan.plan("mae_vit_large_patch16", 8, 0.9, "bf16", 8, ("ddp",), every=4)[0]["act_modes"]["every_k"]
    assert k4 > rows[0]["act_modes"]["every_k"]


def test_fit_takes_a_checkpointing_mode() -> None:
    """fit() with a mode name uses that mode's total: selective sits between none and block for ViT-g."""
    def batch(mode: str | bool) -> int:
        return memory_plan.fit("mae_vit_giant_patch14", 68, "fsdp", 0.9, "bf16", mode)["batch_size"]
    assert batch(True) == batch("block") and batch(False) == batch("none")
    assert batch("none") <= batch("selective") <= batch("block") and batch("none") < batch("block")


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_hsdp_states_divide_by_the_shard_group(precision: str) -> None:
    """hsdp with N = the world size is the fsdp row; with N = 1 every GPU holds DDP's full parameters and optimizer
    state (plus FSDP2's two gathered blocks); with N = 8 of 64 the states are 8x the fsdp row's shard."""
    shape = memory_plan.model_shape("mae_vit_giant_patch14", 16, 224)
    fsdp = memory_plan.states(shape, "fsdp", precision, 64)
    assert memory_plan.states(shape, "hsdp", precision, 64, shard=64) == pytest.approx(fsdp)
    p, g, o = memory_plan.states(shape, "hsdp", precision, 64, shard=1)
    ddp_p, _, ddp_o = memory_plan.states(shape, "ddp", precision, 64)
    gathered = 2 * shape["block_params"] * (2 if precision == "bf16" else 4)
    assert (p, g, o) == pytest.approx((ddp_p + gathered, ddp_p + gathered, ddp_o))
    _, _, o8 = memory_plan.states(shape, "hsdp", precision, 64, shard=8)
    assert o8 == pytest.approx(8 * fsdp[2])
    with pytest.raises(ValueError, match="--hsdp_shard_size 3 must divide --world_size 64"):
        memory_plan.states(shape, "hsdp", precision, 64, shard=3)


def test_cli_hsdp_row_and_its_communication(capsys: pytest.CaptureFixture[str]) -> None:
    """--hsdp_shard_size adds the hsdp row and the per-step traffic: less crosses nodes than flat FSDP sends."""
    data = memory_plan.main(["--model", "mae_vit_huge_patch16", "--world_size", "64", "--hsdp_shard_size", "8"])
    out = capsys.readouterr().out
    rows = {r["backend"]: r for r in data["computed"]}
    assert "| hsdp |" in out and rows["hsdp"]["optim"] == pytest.approx(8 * rows["fsdp"]["optim"])
    flat, hsdp = data["communication"]
    assert (hsdp["shard_group"], hsdp["replicas"]) == (8, 8) and flat["replicas"] == 1 and flat["across_gib"] == 0
    assert hsdp["across_gib"] < flat["in_group_gib"] / 4 and "across the 8 replicas" in out
