"""The analytic FLOP count (models/flops.py, from the configuration) agrees with torch.utils.flop_counter where it sees attention."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import create_model


@pytest.mark.parametrize("mask_ratio", [0.0, 0.9])
def test_mae_forward_flops_match_counter_on_meta(mask_ratio: float) -> None:
    """On the meta device SDPA is counted, so counter and analytic forward FLOPs agree exactly."""
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16", num_frames=16, img_size=224)
        clips = torch.empty(2, 3, 16, 224, 224)
        noise = torch.rand(2, model.patch_embed.num_patches)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(clips, mask_ratio, noise=noise)
    analytic = model.flops_per_clip(mask_ratio)
    assert counter.get_total_flops() == 2 * analytic["forward"]
    assert analytic["train_step"] == 3 * analytic["forward"]


def test_mae_train_step_flops_close_to_counter_with_math_sdpa() -> None:
    """On CPU with the math SDPA backend, forward + backward is ~3x forward (no input grad at the embed)."""
    model = create_model("mae_vit_micro_patch8", num_frames=4, img_size=32)
    clips = torch.randn(2, 3, 4, 32, 32)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), FlopCounterMode(display=False) as c:
        model(clips, 0.75)[0].backward()
    analytic = model.flops_per_clip(0.75)
    step = 2 * analytic["train_step"]
    # The counter skips the patch embedding's input gradient (clips need none): one embed forward.
    assert c.get_total_flops() == step - 2 * analytic["patch_embed"]


def test_vit_forward_flops_match_counter_on_meta() -> None:
    """The classifier's analytic count matches the counter too."""
    with torch.device("meta"):
        model = create_model("vit_base_patch16", num_frames=16, img_size=224)
        clips = torch.empty(1, 3, 16, 224, 224)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(clips)
    assert counter.get_total_flops() == model.flops_per_clip()["forward"]


@pytest.mark.parametrize("kw", [{"decoder_mask_ratio": 0.5}, {"mask_type": "adaptive"}],
                         ids=["decoder-masking", "adaptive"])
def test_analytic_count_follows_decoder_masking_and_adaptive_sampler(kw: dict) -> None:
    """MFU stays honest for AdaMAE and decoder masking: the count matches the counter within 1%."""
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16", **kw).train()
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.empty(1, 3, 16, 224, 224), 0.9, torch.rand(1, 1568))
    analytic = model.flops_per_clip(0.9)["forward"]
    assert abs(analytic - counter.get_total_flops()) <= 0.01 * analytic


def test_flops_come_from_the_configuration_not_the_parameters() -> None:
    """A rank of a ZeRO-3/FSDP2 run may hold an empty partition: the count must not read parameters."""
    model = create_model("mae_vit_micro_patch8", num_frames=4, img_size=32)
    want = model.flops_per_clip(0.75)
    with torch.no_grad():
        for p in model.parameters():
            p.data = torch.empty(0)  # what a rank holding no elements of a partition sees
    assert model.flops_per_clip(0.75) == want
