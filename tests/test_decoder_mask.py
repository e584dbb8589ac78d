"""Decoder masking (the rotating_hidden running cell; v2's run_cell: test_decoder_mask_v2.py): loss only on hidden and decoder-kept tokens, nothing
changes at ratio 0, and eval mode still rebuilds every hidden token."""

from __future__ import annotations

import torch

from models import create_model
from models.masking import decoder_targets, random_masking, running_cell_rank
from util.parallel import apply_checkpointing

TINY = dict(img_size=32, num_frames=8, t_patch_size=2, pred_t_dim=4, decoder_embed_dim=64, decoder_depth=1,
            decoder_num_heads=4, depth=2)
L = 4 * 4 * 4  # 4 time slices x 4 x 4 patches


def mae(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mae_vit_micro_patch8", **{**TINY, **kw}).train()


def test_running_cell_keeps_half_of_every_cell_and_moves_with_time() -> None:
    rank = running_cell_rank((4, 4, 6)).view(4, 2, 2, 3, 2).permute(0, 1, 3, 2, 4).reshape(4, 6, 4)
    # Every 2x2 cell holds ranks 0..3 once, in every time slice.
    assert torch.equal(rank.sort(-1).values, torch.arange(4).expand(4, 6, 4))
    kept = rank < 2
    assert not torch.equal(kept[0], kept[1])  # the kept half moves with time ...
    assert torch.equal(kept.sum(0), torch.full((6, 4), 2))  # ... and covers each position equally often


def test_targets_are_hidden_distinct_and_dense() -> None:
    noise = torch.rand(5, L, generator=torch.Generator().manual_seed(0))
    _, _, mask = random_masking(5, (4, 4, 4), 0.75, noise=noise)
    ids = decoder_targets(mask, (4, 4, 4), 0.5, noise, num_hidden=48)
    assert ids.shape == (5, 24)
    for b in range(5):
        assert ids[b].unique().numel() == 24 and torch.all(mask[b, ids[b]] == 1)
    # The number of hidden tokens read from the mask gives the same targets.
    assert torch.equal(decoder_targets(mask, (4, 4, 4), 0.5, noise), ids)


def test_ratio_zero_changes_nothing() -> None:
    clips, noise = torch.randn(2, 3, 8, 32, 32), torch.rand(2, L)
    a, b = mae(), mae(decoder_mask_ratio=0.0)
    la, pa, ma = a(clips, 0.75, noise)
    lb, pb, mb = b(clips, 0.75, noise)
    assert torch.equal(la, lb) and torch.equal(pa, pb) and torch.equal(ma, mb)
    assert set(a.state_dict()) == set(b.state_dict())


def test_loss_only_where_hidden_and_decoded() -> None:
    model = mae(decoder_mask_ratio=0.5, decoder_mask_type="rotating_hidden")  # VideoMAE v2's: test_decoder_mask_v2.py
    clips, noise = torch.randn(2, 3, 8, 32, 32), torch.rand(2, L)
    _, _, enc_mask = random_masking(2, (4, 4, 4), 0.75, noise=noise)
    loss, pred, mask = model(clips, 0.75, noise)
    assert torch.equal(mask.sum(1), torch.full((2,), 24.0))
    assert torch.all(mask <= enc_mask)  # loss tokens are hidden from the encoder
    assert torch.all(pred[mask == 0] == 0)  # predictions only where the loss is taken
    assert torch.allclose(loss, model.forward_loss(clips, pred, mask))

    # A hidden token the decoder dropped does not enter the loss; a decoded one does.
    def loss_after_changing(token: int) -> torch.Tensor:
        t, rest = divmod(token, 16)
        h, w = divmod(rest, 4)
        changed = clips.clone()
        changed[0, :, 2 * t:2 * t + 2, 8 * h:8 * h + 8, 8 * w:8 * w + 8] += torch.randn(3, 2, 8, 8)
        return model(changed, 0.75, noise)[0]

    dropped = int(((enc_mask[0] == 1) & (mask[0] == 0)).nonzero()[0])
    decoded = int((mask[0] == 1).nonzero()[0])
    assert torch.allclose(loss_after_changing(dropped), loss)
    assert not torch.allclose(loss_after_changing(decoded), loss)


def test_eval_mode_rebuilds_every_hidden_token() -> None:
    full, masked = mae(), mae(decoder_mask_ratio=0.5)
    clips, noise = torch.randn(2, 3, 8, 32, 32), torch.rand(2, L)
    with torch.no_grad():
        ref = full.eval()(clips, 0.75, noise)
        got = masked.eval()(clips, 0.75, noise)
    assert all(torch.equal(x, y) for x, y in zip(ref, got, strict=True))


def test_adaptive_with_decoder_masking_trains_and_grad_checkpointing_matches() -> None:
    clips, noise = torch.randn(2, 3, 8, 32, 32), torch.rand(2, L)
    losses = []
    for ckpt in (False, True):
        model = mae(decoder_mask_ratio=0.5, mask_type="adaptive", cls_embed=False)
        if ckpt:
            apply_checkpointing(model)
        loss, _, mask = model(clips, 0.9, noise)
        loss.backward()
        assert model.decoder_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1])
