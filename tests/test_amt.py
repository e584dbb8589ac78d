"""AMT (models/amt.py): exact counts, thrown tokens absent from encoder, decoder and loss, masks that are
a function of the sample, attention read through each clip's geometry, FLOPs that follow the throwing."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import create_model
from models.amt import amt_counts, amt_masking, clip_attention_weights, normalize_cls_attention
from models.video_vit import Attention


def tiny_amt(**kw) -> torch.nn.Module:
    """Micro MAE on 4 x 32 x 32 clips (grid 2 x 4 x 4 = 32 tokens) with AMT."""
    torch.manual_seed(0)
    return create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, depth=2, decoder_embed_dim=64,
                        decoder_depth=1, pred_t_dim=2, mask_type="amt", **{"throw_ratio": 0.3, **kw})


@pytest.mark.parametrize(("ratio", "throw"), [(0.75, 0.3), (0.9, 0.4), (0.5, 0.0)])
def test_masks_partition_every_token_with_exact_counts(ratio: float, throw: float) -> None:
    L = 1568
    g = torch.Generator().manual_seed(1)
    weights, noise = torch.rand(3, L, generator=g), torch.rand(3, L, generator=g)
    keep, restore, masked, thrown = amt_masking(weights, noise, ratio, throw)
    visible, n_masked, n_thrown = amt_counts(L, ratio, throw)
    assert (keep.shape[1], masked.shape[1], thrown.shape[1]) == (visible, n_masked, n_thrown)
    assert visible == int(L * (1 - ratio)) and n_thrown == int(L * throw)  # K as every sampler keeps
    for b in range(3):
        every = torch.cat([keep[b], masked[b], thrown[b]])
        assert torch.equal(every.sort().values, torch.arange(L))  # disjoint, and together all tokens
    assert torch.equal(restore.argsort(dim=1)[:, :visible], keep)


def test_too_much_throwing_is_refused() -> None:
    with pytest.raises(ValueError, match="none is left to reconstruct"):
        amt_counts(32, 0.75, 0.75)


def test_masks_depend_only_on_the_sample() -> None:
    """A sample gets the same masks alone, in another batch, or at another position; other noise, other masks."""
    g = torch.Generator().manual_seed(2)
    weights, noise = torch.rand(4, 32, generator=g), torch.rand(4, 32, generator=g)
    batch = amt_masking(weights, noise, 0.75, 0.3)
    alone = amt_masking(weights[2:3], noise[2:3], 0.75, 0.3)
    shuffled = amt_masking(weights[[3, 2, 0]], noise[[3, 2, 0]], 0.75, 0.3)
    for full, one, other in zip(batch, alone, shuffled, strict=True):
        assert torch.equal(full[2], one[0]) and torch.equal(full[2], other[1])
    redrawn = amt_masking(weights[2:3], torch.rand(1, 32, generator=g), 0.75, 0.3)
    assert not torch.equal(redrawn[2].sort().values, alone[2].sort().values)


def test_high_attention_is_masked_and_low_attention_thrown() -> None:
    """Half the tokens get 20x the attention of the rest: they dominate the masked set, the others the thrown one."""
    L, n = 64, 200
    weights = torch.full((n, L), 0.05)
    weights[:, : L // 2] = 1.0  # tokens 0..31 attended
    noise = torch.rand(n, L, generator=torch.Generator().manual_seed(3))
    _, _, masked, thrown = amt_masking(weights, noise, 0.75, 0.3)
    share_high_masked = (masked < L // 2).float().mean()
    share_low_thrown = (thrown >= L // 2).float().mean()
    assert share_high_masked > 0.8 and share_low_thrown > 0.8, (share_high_masked, share_low_thrown)
    uniform = amt_masking(torch.ones(n, L), noise, 0.75, 0.3)[2]
    assert 0.4 < (uniform < L // 2).float().mean() < 0.6  # uniform attention: random masking


def test_thrown_tokens_reach_neither_encoder_nor_decoder_nor_loss() -> None:
    model = tiny_amt()
    clips = torch.randn(2, 3, 4, 32, 32, requires_grad=True)
    noise = torch.rand(2, 32, generator=torch.Generator().manual_seed(4))
    weights = torch.rand(2, 32, generator=torch.Generator().manual_seed(5))
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("encoder", a[0].shape[1]))
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("decoder", a[0].shape[1]))
    loss, pred, mask, aux = model(clips, 0.75, noise, attention=weights, return_aux=True)
    loss.backward()
    visible, masked, thrown = amt_counts(32, 0.75, 0.3)
    assert seen == {"encoder": 1 + visible, "decoder": 1 + visible + masked}  # + the class token
    thrown_mask = aux["thrown"].bool()
    assert (thrown_mask.sum(1) == thrown).all() and (mask.sum(1) == masked).all()
    assert not (thrown_mask & mask.bool()).any()
    # Gradient of the loss per input tubelet: none for thrown ones, some for every visible and masked one.
    per_token = model.patch_embed.tubelets(clips.grad).abs().sum(-1)  # [B, L]
    assert (per_token[thrown_mask] == 0).all()
    assert (per_token[~thrown_mask] > 0).all()
    # And whatever the thrown tubelets hold, loss and predictions of the other tokens stay the same.
    changed = clips.detach().clone()
    t = model.patch_embed.tubelets(changed)  # a view: the thrown tubelets overwritten with noise below
    ids = thrown_mask.nonzero()
    view = changed.view(2, 3, 2, 2, 4, 8, 4, 8).permute(0, 2, 4, 6, 1, 3, 5, 7)
    for b, token in ids.tolist():
        view[b, token // 16, (token // 4) % 4, token % 4] = torch.randn_like(view[b, 0, 0, 0])
    assert not torch.equal(model.patch_embed.tubelets(changed), t)
    again, pred2, _ = model(changed, 0.75, noise, attention=weights)
    assert torch.equal(again, loss.detach()) and torch.equal(pred2[mask.bool()], pred.detach()[mask.bool()])


def test_cls_attention_is_the_softmax_of_the_class_query() -> None:
    """Against the published formula on an explicit attention matrix: softmax(q k^T / sqrt(d)), row 0."""
    torch.manual_seed(6)
    attn = Attention(32, num_heads=4)
    x = torch.randn(2, 9, 32)
    q, k, _ = attn.qkv(x).view(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    full = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)  # [B, heads, N, N]
    got = attn.cls_attention(x)
    torch.testing.assert_close(got, full[:, :, 0])
    weights = normalize_cls_attention(got)  # without the class token's own column, min-max per head, mean
    assert weights.shape == (2, 8) and weights.min() >= 0 and weights.max() <= 1
    per_head = (full[:, :, 0, 1:] - full[:, :, 0, 1:].amin(-1, keepdim=True))
    per_head = per_head / per_head.amax(-1, keepdim=True)
    torch.testing.assert_close(weights, per_head.mean(1))


def test_model_attention_map_comes_from_its_last_block_over_all_tokens() -> None:
    model = tiny_amt().eval()
    clips = torch.randn(2, 3, 4, 32, 32)
    captured = {}
    model.blocks[-1].register_forward_pre_hook(lambda m, a, kw: captured.update(x=a[0], kw=kw), with_kwargs=True)
    weights = model(clips, return_cls_attention=True)
    assert captured["kw"] == {"cls_attention": True} and captured["x"].shape[1] == 1 + 32
    want = normalize_cls_attention(model.blocks[-1].attn.cls_attention(model.blocks[-1].norm1(captured["x"])))
    torch.testing.assert_close(weights, want)


def geometry(start: float, duration: float, box=(0.0, 0.0, 1.0, 1.0), flip: bool = False) -> torch.Tensor:
    """One clip's geometry row (models.amt.GEOMETRY_FIELDS)."""
    return torch.tensor([[start, duration, *box, float(flip)]])


def test_clip_weights_read_the_video_map_through_time_crop_and_flip() -> None:
    """Canonical view of 8 frames over 1.4 s; training clips of 4 frames 0.2 s apart, tubelets of 2 frames."""
    t_c, h, w = 4, 4, 4
    table = torch.arange(t_c * h * w, dtype=torch.float32).view(1, t_c, h, w) / 100
    read = lambda g: clip_attention_weights(table, g, (2, h, w), 2, 0.2, 8).view(2, h, w)  # noqa: E731
    # A clip on the canonical frames 0..3, whole frame: its 2 tubelets are canonical slots 0 and 1.
    torch.testing.assert_close(read(geometry(0.0, 1.4)), table[0, :2])
    torch.testing.assert_close(read(geometry(0.8, 1.4)), table[0, 2:])  # frames 4..7: slots 2, 3
    torch.testing.assert_close(read(geometry(0.0, 1.4, flip=True)), table[0, :2].flip(-1))
    # The right half of the frame over the whole clip: token centres at x = 0.5625 ... 0.9375 of the frame,
    # i.e. canonical columns 1.75, 2.25, 2.75, 3.25 (interpolated; the last clamped to column 3). The
    # table is linear in the column index (value = (16 t + 4 h + column) / 100), so so is what is read.
    right = read(geometry(0.0, 1.4, box=(0.0, 0.5, 1.0, 0.5)))
    columns = torch.tensor([1.75, 2.25, 2.75, 3.0])
    torch.testing.assert_close(right, table[0, :2, :, :1] + columns / 100)
    # Beyond the video's end the last slot is kept (border clamp).
    torch.testing.assert_close(read(geometry(5.0, 1.4)), table[0, 3:].expand(2, h, w))


def test_flops_follow_the_thrown_tokens_and_match_the_counter() -> None:
    with torch.device("meta"):
        amt = create_model("mae_vit_base_patch16", mask_type="amt", throw_ratio=0.4)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            amt(torch.empty(1, 3, 16, 224, 224), 0.9, torch.rand(1, 1568), attention=torch.rand(1, 1568))
        random = create_model("mae_vit_base_patch16")
    analytic = amt.flops_per_clip(0.9)
    assert counter.get_total_flops() == analytic["forward"]
    # Same encoder input as random masking at 0.9; the decoder skips 40% of the tokens.
    base = random.flops_per_clip(0.9)
    assert analytic["encoder_linear"] == base["encoder_linear"]
    assert analytic["train_step"] < 0.75 * base["train_step"]


def test_amt_table_is_a_uint8_buffer_ddp_skips_and_weights_import_without_it() -> None:
    from models.convert import load_pretrained

    model = tiny_amt(amt_num_videos=5)
    assert model.amt_attention.shape == (5, 2, 4, 4) and model.amt_attention.dtype == torch.uint8
    assert model._ddp_params_and_buffers_to_ignore == ["amt_attention"]
    vit = create_model("vit_micro_patch8", img_size=32, num_frames=4, depth=2, num_classes=3, cls_embed=True)
    report = load_pretrained(vit, model.state_dict(), source="amt run")
    assert "amt_attention" in report.dropped and not report.unexpected


def test_reconstruction_image_shows_thrown_tokens_as_black() -> None:
    from util.visualize import MIN_SIDE, reconstruction_grid

    model = tiny_amt().eval()
    clips = torch.rand(1, 3, 4, 32, 32) * 2 - 1  # shown as 0.225 ... 0.675: no pixel is black by itself
    with torch.no_grad():
        _, pred, mask, aux = model(clips, 0.75, torch.rand(1, 32, generator=torch.Generator().manual_seed(7)),
                                   return_aux=True)
    plain = reconstruction_grid(model, clips, pred, mask)
    marked = reconstruction_grid(model, clips, pred, mask, thrown=aux["thrown"])
    thrown = int(aux["thrown"].sum())
    # Each thrown token covers t_pred_patch_size frames of 8 x 8 pixels in 3 channels of the reconstruction row;
    # the grid enlarges frames under MIN_SIDE pixel for pixel, so each side of a patch is `scale` times longer.
    scale = math.ceil(MIN_SIDE / 32)
    black = int((marked == 0).sum() - (plain == 0).sum())
    assert thrown == 9 and black == thrown * model.t_pred_patch_size * (8 * scale) ** 2 * 3
