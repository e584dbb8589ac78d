"""Models and mask samplers: shapes, the masking contract, the loss, and exactness of fast paths."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import create_model
from models.masking import MASK_SAMPLERS, get_mask_sampler, num_visible
from models.video_vit import (
    Attention,
    resize_joint_pos_embed,
    resize_spatial_pos_embed,
    resize_temporal_pos_embed,
)
from util.parallel import apply_checkpointing

TINY = dict(img_size=32, num_frames=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, depth=2)


def tiny_mae(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mae_vit_micro_patch8", **{**TINY, **kw})


@pytest.mark.parametrize("name", sorted(MASK_SAMPLERS))
@pytest.mark.parametrize("grid,ratio", [((8, 14, 14), 0.9), ((4, 4, 4), 0.75), ((4, 6, 6), 0.95), ((3, 5, 7), 0.5)])
def test_sampler_contract(name: str, grid: tuple[int, int, int], ratio: float) -> None:
    B, L = 6, math.prod(grid)
    K = num_visible(L, ratio)
    gen = torch.Generator().manual_seed(1)
    ids_keep, ids_restore, mask = get_mask_sampler(name)(B, grid, ratio, generator=gen)
    assert ids_keep.shape == (B, K) and ids_restore.shape == (B, L) and mask.shape == (B, L)
    # Exactly K visible per sample, no repeats, and the mask agrees with ids_keep.
    assert torch.equal((mask == 0).sum(1), torch.full((B,), K))
    for b in range(B):
        assert ids_keep[b].unique().numel() == K
        assert torch.all(mask[b, ids_keep[b]] == 0)
    # Masks differ between samples and are reproducible from the generator.
    assert any(not torch.equal(mask[0], mask[b]) for b in range(1, B))
    again = get_mask_sampler(name)(B, grid, ratio, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[2], mask)


@pytest.mark.parametrize("name", sorted(MASK_SAMPLERS))
def test_ids_restore_inverts_shuffle(name: str) -> None:
    grid, B = (4, 4, 4), 3
    noise = torch.rand(B, 64, generator=torch.Generator().manual_seed(3))
    ids_keep, ids_restore, mask = get_mask_sampler(name)(B, grid, 0.75, noise=noise)
    tokens = torch.arange(64).expand(B, 64)
    # Put kept tokens first, the others after (as the decoder does), then un-shuffle.
    hidden = torch.stack([torch.tensor([i for i in range(64) if i not in set(ids_keep[b].tolist())]) for b in range(B)])
    shuffled = torch.cat([ids_keep, hidden], dim=1)
    order = shuffled.argsort(1)
    assert torch.equal(torch.gather(shuffled, 1, order), tokens)
    # ids_restore maps the sampler's own shuffle back to token order.
    kept_first = torch.gather(mask, 1, ids_restore.argsort(1))
    assert torch.all(kept_first[:, :16] == 0) and torch.all(kept_first[:, 16:] == 1)


def test_tube_masks_identical_across_time_and_frame_masks_across_space() -> None:
    grid = (4, 6, 6)  # K = 72 at 50%: 18 whole tubes or 2 whole frames
    _, _, tube = get_mask_sampler("tube")(5, grid, 0.5, generator=torch.Generator().manual_seed(0))
    tube = tube.view(5, 4, 36)
    assert torch.all(tube == tube[:, :1])
    _, _, frame = get_mask_sampler("frame")(5, grid, 0.5, generator=torch.Generator().manual_seed(0))
    frame = frame.view(5, 4, 36)
    assert torch.all(frame == frame[:, :, :1])
    # When K is not a whole number of tubes, only one spatial position differs over time.
    _, _, partial = get_mask_sampler("tube")(5, (8, 14, 14), 0.9, generator=torch.Generator().manual_seed(0))
    partial = partial.view(5, 8, 196)
    assert int((partial != partial[:, :1]).any(1).sum(1).max()) <= 1


def test_cube_masks_keep_spacetime_blocks() -> None:
    grid = (8, 8, 8)
    _, _, mask = get_mask_sampler("cube")(4, grid, 0.75, generator=torch.Generator().manual_seed(0))
    vis = (mask == 0).view(4, *grid).float()
    # Visible tokens come in blocks: most visible tokens have a visible neighbour in time and space.
    neigh_t = (vis[:, 1:] * vis[:, :-1]).sum() * 2 / vis.sum()
    rand = (get_mask_sampler("random")(4, grid, 0.75, generator=torch.Generator().manual_seed(0))[2] == 0)
    rand = rand.view(4, *grid).float()
    assert neigh_t > 2 * (rand[:, 1:] * rand[:, :-1]).sum() * 2 / rand.sum()


def test_forward_shapes_and_mask_ratio() -> None:
    model = tiny_mae()
    clips = torch.randn(2, 3, 4, 32, 32)
    loss, pred, mask = model(clips, mask_ratio=0.75)
    L = 2 * 4 * 4
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (2, L, 1 * 8 * 8 * 3)  # pred_t_dim = 2 of 4 frames -> 1 frame per token
    assert torch.equal(mask.sum(1), torch.full((2,), float(L - num_visible(L, 0.75))))


def test_loss_ignores_visible_tokens() -> None:
    model = tiny_mae(norm_pix_loss=True).eval()
    clips = torch.randn(2, 3, 4, 32, 32)
    noise = torch.rand(2, 32, generator=torch.Generator().manual_seed(0))
    loss, pred, mask = model(clips, 0.75, noise=noise)
    # Rewrite the target pixels of visible tokens only; the loss must not move.
    target = model.patchify(model.target_frames(clips))
    changed = torch.where(mask[..., None].bool(), target, torch.randn_like(target) * 5)
    frames = model.unpatchify(changed)
    clips2 = clips.clone()
    clips2[:, :, :: model.num_frames // model.pred_t_dim] = frames
    loss2 = model.forward_loss(clips2, pred, mask)
    assert torch.allclose(loss, loss2, atol=1e-6)
    # ...while changing a hidden token's target does.
    clips3 = clips.clone()
    clips3 += 0.5 * torch.randn_like(clips3)
    assert not torch.allclose(loss, model.forward_loss(clips3, pred, mask))


def test_patchify_roundtrip() -> None:
    model = tiny_mae()
    frames = torch.randn(2, 3, 2, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(frames)), frames)


def test_sdpa_attention_equals_naive_softmax() -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    x = torch.randn(2, 10, 32)
    B, N, D = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
    naive = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, D))
    assert torch.allclose(attn(x), naive, atol=1e-5)


@pytest.mark.parametrize("name", ["mae_vit_micro_patch8", "vit_micro_patch8"])
def test_grad_checkpointing_same_loss_and_grads(name: str) -> None:
    kw = dict(img_size=32, num_frames=4, depth=2)
    if name.startswith("mae"):
        kw.update(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
    else:
        kw.update(num_classes=5, dropout=0.0)
    torch.manual_seed(0)
    model = create_model(name, **kw)
    clips = torch.randn(2, 3, 4, 32, 32)
    noise = torch.rand(2, 32)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(clips, 0.75, noise=noise)[0] if name.startswith("mae") else model(clips).square().mean()
        out.backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_a, grads_a = run()
    apply_checkpointing(model)
    loss_b, grads_b = run()
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_pos_embed_interpolation_shapes() -> None:
    spatial = torch.randn(1, 14 * 14, 16)
    assert resize_spatial_pos_embed(spatial, (7, 7)).shape == (1, 49, 16)
    temporal = torch.randn(1, 4, 16)
    assert resize_temporal_pos_embed(temporal, 8).shape == (1, 8, 16)
    joint = torch.randn(1, 1 + 4 * 7 * 7, 16)
    out = resize_joint_pos_embed(joint, (4, 7, 7), (8, 14, 14), num_prefix=1)
    assert out.shape == (1, 1 + 8 * 14 * 14, 16) and torch.equal(out[:, :1], joint[:, :1])
    # Identity size returns the same table.
    assert torch.equal(resize_spatial_pos_embed(spatial, (14, 14)), spatial)


def test_classifier_pools_every_patch_without_cls() -> None:
    torch.manual_seed(0)
    model = create_model("vit_micro_patch8", img_size=32, num_frames=4, depth=1, num_classes=3, cls_embed=False).eval()
    clips = torch.randn(2, 3, 4, 32, 32)
    assert model(clips).shape == (2, 3)
    # The pooled feature must depend on the first token too (no real token is dropped).
    captured = {}
    model.fc_norm.register_forward_hook(lambda m, i, o: captured.setdefault("in", i[0]))
    model(clips)
    tokens = model.patch_embed(clips)
    assert captured["in"].shape == (2, tokens.shape[-1])
    with_cls = create_model("vit_micro_patch8", img_size=32, num_frames=4, depth=1, num_classes=3, cls_embed=True)
    assert with_cls(clips).shape == (2, 3)


def test_layer_ids_and_no_weight_decay() -> None:
    model = tiny_mae()
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert ids["patch_embed.proj.weight"] == 0 and ids["blocks.0.attn.qkv.weight"] == 1
    assert ids["blocks.1.mlp.fc1.weight"] == 2 and ids["norm.weight"] == model.num_layers - 1
    nwd = model.no_weight_decay()
    assert {"cls_token", "mask_token", "pos_embed_spatial", "decoder_pos_embed_temporal"} <= nwd


@pytest.mark.parametrize(
    "name,expected",
    [("vit_base_patch16", 87e6), ("vit_large_patch16", 304e6), ("vit_huge_patch16", 632e6)],
)
def test_published_parameter_counts(name: str, expected: float) -> None:
    with torch.device("meta"):
        model = create_model(name, num_classes=400)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.01, count


def test_encoder_flops_drop_9x_at_90_percent_masking() -> None:
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16")
        clips = torch.empty(1, 3, 16, 224, 224)
        flops = {}
        for ratio in (0.0, 0.9):
            counter = FlopCounterMode(display=False)
            with counter:
                model.forward_encoder(clips, ratio)
            flops[ratio] = counter.get_total_flops()
    assert flops[0.0] / flops[0.9] >= 9.0, flops


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        create_model("mae_vit_gigantic")
    with pytest.raises(ValueError, match="mask_type"):
        tiny_mae(mask_type="checkerboard")
    with pytest.raises(ValueError, match="num_frames"):
        tiny_mae()(torch.randn(1, 3, 8, 32, 32))


@pytest.mark.parametrize("rule,frames", [("stride", [0, 2, 4, 6, 8, 10, 12, 14]),
                                         ("linspace", [0, 2, 4, 6, 8, 10, 12, 15])])
def test_target_frames_conventions_pick_the_frames_and_the_loss_uses_them(rule: str, frames: list[int]) -> None:
    """PySlowFast (released weights) regresses every second frame; mae_st's code linspace(0, T-1, 8)."""
    if rule == "linspace":  # the published formula, not the model's code
        assert torch.linspace(0, 15, 8).long().tolist() == frames
    model = tiny_mae(num_frames=16, pred_t_dim=8, target_frames=rule).eval()
    clips = torch.randn(2, 3, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.target_frames(clips), clips[:, :, frames])
    noise = torch.rand(2, 8 * 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss, pred, mask = model(clips, 0.75, noise)
    # Reference loss: each token's frame (one per token), 8x8 pixels x 3 channels, normalised per patch.
    target = clips[:, :, frames].reshape(2, 3, 8, 4, 8, 4, 8).permute(0, 2, 3, 5, 4, 6, 1).reshape(2, 128, 192)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match=r"target_frames must be one of \('stride', 'linspace'\)"):
        tiny_mae(target_frames="middle")


def test_layer_scale_off_keeps_keys_and_on_adds_trained_gains() -> None:
    plain = tiny_mae()
    assert not any("gamma" in k for k in plain.state_dict())  # old checkpoints keep their exact keys
    scaled = tiny_mae(init_values=1e-4, decoder_init_values=0.0)
    gammas = [k for k in scaled.state_dict() if "gamma" in k]
    assert sorted(gammas) == sorted(f"blocks.{i}.gamma_{j}" for i in range(2) for j in (1, 2))
    assert torch.equal(scaled.blocks[1].gamma_2, torch.full((128,), 1e-4))
    clips = torch.randn(2, 3, 4, 32, 32)
    scaled(clips, 0.75)[0].backward()
    assert scaled.blocks[0].gamma_1.grad is not None and scaled.blocks[0].gamma_1.grad.abs().sum() > 0
    # Near-zero gains make each encoder block almost the identity: what layer scale is for.
    block, x = scaled.blocks[0], torch.randn(2, 5, 128)
    assert (block(x) - x).abs().max() < 1e-2 * (plain.blocks[0](x) - x).abs().max()
    with pytest.raises(ValueError, match="init_values"):
        tiny_mae(init_values=-1.0)
    vit = create_model("vit_micro_patch8", img_size=32, num_frames=4, depth=1, num_classes=3, init_values=0.5)
    assert torch.equal(vit.blocks[0].gamma_1, torch.full((128,), 0.5))


def test_decoder_class_token_from_the_encoder() -> None:
    """PySlowFast's decoder class token is decoder_embed(encoder class output): no learned token, same either path."""
    model = tiny_mae(decoder_cls="encoder", decoder_sep_pos_embed=False).eval()
    assert "decoder_cls_token" not in model.state_dict() and "decoder_pos_embed" in model.state_dict()
    assert "pos_embed_spatial" in model.state_dict()  # the encoder keeps its own table form
    clips, noise = torch.randn(2, 3, 4, 32, 32), torch.rand(2, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent, drawn = model.forward_encoder(clips, 0.75, noise)
        mask, ids_restore = drawn.mask, drawn.ids_restore
        full = model.forward_decoder(latent, ids_restore)
        hidden = mask.nonzero()[:, 1].view(2, -1)
        subset = model.forward_decoder_subset(latent, ids_restore, hidden)  # the decoder-masking path
        torch.testing.assert_close(subset.gather(1, hidden[..., None].expand(-1, -1, 192)),
                                   full.gather(1, hidden[..., None].expand(-1, -1, 192)))
        # The class token really comes from the encoder: changing its output changes the predictions.
        shifted = latent.clone()
        shifted[:, 0] += 1.0
        assert not torch.allclose(model.forward_decoder(shifted, ids_restore), full)
    with pytest.raises(ValueError, match="cls_embed=True"):
        tiny_mae(decoder_cls="encoder", cls_embed=False)
    with pytest.raises(ValueError, match="decoder_cls must be one of"):
        tiny_mae(decoder_cls="mean")


def test_flops_unchanged_by_release_options() -> None:
    """Layer scale, an encoder-derived decoder class token and a joint decoder table add no matmuls."""
    kw = dict(init_values=0.1, decoder_cls="encoder", decoder_sep_pos_embed=False, decoder_num_heads=8)
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16", **kw)
        plain = create_model("mae_vit_base_patch16")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, 3, 16, 224, 224), 0.9, torch.rand(1, 1568))
    assert counter.get_total_flops() == model.flops_per_clip(0.9)["forward"]  # one clip
    assert model.flops_per_clip(0.9) == plain.flops_per_clip(0.9)
