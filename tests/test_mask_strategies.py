"""Mask strategies as objects handed to the MAE: the Mask contract of every `--mask_type`, no state of a
forward left on the model, and the constructor's config dataclasses against the flat factory arguments."""

from __future__ import annotations

import inspect

import pytest
import torch

from models import create_model
from models.mae import (
    DecoderConfig,
    EncoderConfig,
    MaskedAutoencoderViT,
    PatchConfig,
    TargetConfig,
    build_mask_strategy,
)
from models.masking import MASK_TYPES, Mask, num_visible

TINY = dict(img_size=32, num_frames=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, depth=2)
GRID, L, D = (2, 4, 4), 32, 128  # the micro model's token grid at 32 px, 4 frames; its width
EXTRA = {"amt": {"throw_ratio": 0.25}}  # what a strategy needs besides its name


def tiny(mask_type: str = "random", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mae_vit_micro_patch8", mask_type=mask_type, **{**TINY, **EXTRA.get(mask_type, {}), **kw})


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_every_strategy_keeps_exactly_k_tokens(mask_type: str, ratio: float) -> None:
    if mask_type == "amt" and ratio == 0.5:
        ratio = 0.6  # 0.25 of the tokens thrown must leave some hidden ones to mask
    strategy = build_mask_strategy(mask_type, embed_dim=D, num_tokens=L, num_heads=4, **EXTRA.get(mask_type, {}))
    assert strategy.name == mask_type
    if isinstance(strategy, torch.nn.Module):
        strategy.eval()  # the published sampler's dropout would change its logits between two draws
    B, K = 3, num_visible(L, ratio)
    g = torch.Generator().manual_seed(1)
    noise, tokens, attention = torch.rand(B, L, generator=g), torch.randn(B, L, D, generator=g), torch.rand(B, L, generator=g)
    m = strategy.sample(B, GRID, ratio, noise, tokens=tokens, attention=attention)
    assert isinstance(m, Mask)
    assert m.ids_keep.shape == (B, K) and m.ids_restore.shape == (B, L) and m.mask.shape == (B, L)
    assert torch.equal((m.mask == 0).sum(1), torch.full((B,), K))
    for b in range(B):
        assert m.ids_keep[b].unique().numel() == K and (m.mask[b, m.ids_keep[b]] == 0).all()
    assert torch.equal(m.ids_restore.argsort(1)[:, :K], m.ids_keep)  # the decoder's un-shuffle matches
    again = strategy.sample(B, GRID, ratio, noise.clone(), tokens=tokens, attention=attention)
    assert torch.equal(again.ids_keep, m.ids_keep)  # a function of the per-sample noise
    assert (m.log_probs is not None) == mask_type.startswith("adaptive")
    assert (m.thrown is not None) == (m.ids_masked is not None) == (mask_type == "amt")


@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_forwards_leave_no_state_on_the_model(mask_type: str) -> None:
    model = tiny(mask_type, **({"amt_num_videos": 2} if mask_type == "amt" else {})).train()

    def snapshot() -> list[dict]:
        # Every module's attributes by identity: a forward that parked a tensor or a dict would show here.
        return [{k: id(v) for k, v in vars(mod).items() if k not in ("_forward_pre_hooks", "_forward_hooks")}
                for mod in model.modules()]

    before = snapshot()
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        clips, noise = torch.randn(2, 3, 4, 32, 32, generator=g), torch.rand(2, L, generator=g)
        loss, _, _, aux = model(clips, 0.75, noise, return_aux=True)
        loss.backward()
        model(clips, 0.75, noise)
    assert snapshot() == before
    assert set(aux) - {"metrics"} == {"adaptive": {"sampler_probs"}, "adaptive_detached": {"sampler_probs"},
                                      "amt": {"thrown"}}.get(mask_type, set())
    assert bool(aux["metrics"]) == mask_type.startswith("adaptive")
    assert all(not v.requires_grad for v in aux["metrics"].values())


def test_constructor_takes_configs_and_equals_the_factory() -> None:
    assert len(inspect.signature(MaskedAutoencoderViT.__init__).parameters) <= 8
    torch.manual_seed(0)  # as tiny(): the strategy's network first, then the model (same draws, same order)
    strategy = build_mask_strategy("adaptive_detached", embed_dim=128, num_tokens=L, num_heads=4)
    model = MaskedAutoencoderViT(PatchConfig(img_size=32, patch_size=8, num_frames=4),
                                 EncoderConfig(embed_dim=128, depth=2, num_heads=4, init_values=0.1),
                                 DecoderConfig(embed_dim=64, depth=1, num_heads=4), TargetConfig(pred_t_dim=2), strategy)
    torch.manual_seed(0)
    flat = tiny("adaptive_detached", pred_t_dim=2, init_values=0.1)
    assert model.mask_strategy is model.adaptive_sampler is strategy
    assert flat.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in flat.state_dict().items())


def test_strategy_names_and_options_are_checked() -> None:
    with pytest.raises(ValueError, match="choose one of .*'adaptive'.*'amt'"):
        build_mask_strategy("checkerboard")
    with pytest.raises(ValueError, match="throw_ratio is AMT's"):
        tiny("tube", throw_ratio=0.3)
    with pytest.raises(ValueError, match="cls_embed=True"):
        tiny("amt", cls_embed=False)
    with pytest.raises(ValueError, match="decoder_mask_ratio=0"):
        tiny("amt", decoder_mask_ratio=0.5)
    with pytest.raises(ValueError, match="tokens"):
        build_mask_strategy("adaptive", embed_dim=D, num_tokens=L).sample(2, GRID, 0.75)  # it needs the embeddings
