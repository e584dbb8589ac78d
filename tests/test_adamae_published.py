"""`--mask_type adaptive` against wgcban/adamae (models/pretrain/vit.py `get_token_probs`, msc/engine_for_pretraining.py).

The expected network and targets are written out here from that code, not taken from ours.
"""

from __future__ import annotations

import torch
from torch import nn

from models import create_model

TINY = dict(img_size=32, num_frames=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, depth=2)
D, L = 128, 32  # micro encoder width; 2 x 4 x 4 tokens


def published(**kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model("mae_vit_micro_patch8", mask_type="adaptive", **{**TINY, **kw})


def test_sampler_network_is_adamaes() -> None:
    # Block(dim, num_heads=8, qkv_bias=False, drop=0.1, attn_drop=0, drop_path=0, nn.LayerNorm, init_values=0),
    # then nn.Linear(dim, 1) and Flatten; its own position table pos_embed_probs [1, L, D]; no norm after.
    s = published().adaptive_sampler
    shapes = {n: tuple(p.shape) for n, p in s.named_parameters()}
    assert shapes == {
        "pos_embed": (1, L, D),
        "blocks.0.norm1.weight": (D,), "blocks.0.norm1.bias": (D,),
        "blocks.0.attn.qkv.weight": (3 * D, D),  # no q/k/v bias
        "blocks.0.attn.proj.weight": (D, D), "blocks.0.attn.proj.bias": (D,),
        "blocks.0.norm2.weight": (D,), "blocks.0.norm2.bias": (D,),
        "blocks.0.mlp.fc1.weight": (4 * D, D), "blocks.0.mlp.fc1.bias": (4 * D,),
        "blocks.0.mlp.fc2.weight": (D, 4 * D), "blocks.0.mlp.fc2.bias": (D,),
        "head.weight": (1, D), "head.bias": (1,),
    }
    block = s.blocks[0]
    assert block.attn.num_heads == 8 and block.attn.qkv.bias is None
    assert block.norm1.eps == 1e-5 and block.norm2.eps == 1e-5  # torch's LayerNorm default
    drops = sorted(m.p for m in block.modules() if isinstance(m, nn.Dropout))
    assert drops == [0.1, 0.1, 0.1]  # attention projection, after the MLP's activation, after fc2
    assert isinstance(s.norm, nn.Identity)
    # Init: zeros position table (no re-init), xavier-uniform logit layer with zero bias.
    assert not s.pos_embed.any() and not s.head.bias.any()
    bound = (6 / (D + 1)) ** 0.5
    assert 0 < s.head.weight.abs().max() <= bound


def test_dropout_is_active_in_training_only() -> None:
    s, tokens = published().adaptive_sampler, torch.randn(2, L, D)
    s.train()
    assert not torch.equal(s(tokens), s(tokens))
    s.eval()
    assert torch.equal(s(tokens), s(tokens))


def test_policy_gradient_reaches_the_patch_embedding() -> None:
    # get_mask(x) takes the patch embeddings as they are (the `.detach()` is commented out there).
    clips, noise = torch.randn(2, 3, 4, 32, 32), torch.rand(2, L)
    grads = []
    for weight in (0.0, 1.0):
        model = published(sampler_loss_weight=weight).eval()  # eval: the same logits in both runs
        model(clips, 0.75, noise)[0].backward()
        grads.append(model.patch_embed.proj.weight.grad.clone())
    assert (grads[1] - grads[0]).abs().max() > 1e-6


def test_targets_are_normalised_per_channel_within_each_patch() -> None:
    # engine_for_pretraining.py: 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c', then per channel over
    # the patch's pixels (x - mean) / (unbiased std + 1e-6), then '(p c)'. Here u = 1 target frame per token
    # (pred_t_dim 2 of 4 frames, stride), p = 8.
    model = published(pred_t_dim=2)
    torch.manual_seed(1)
    clips = torch.rand(1, 3, 4, 32, 32) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1, 1)
    frames = clips[:, :, ::2]  # stride target frames
    expected = []
    for t in range(2):
        for h in range(4):
            for w in range(4):
                patch = frames[0, :, t, h * 8:(h + 1) * 8, w * 8:(w + 1) * 8].reshape(3, 64).T  # [pixels, c]
                patch = (patch - patch.mean(0)) / (patch.std(0, unbiased=True) + 1e-6)
                expected.append(patch.reshape(-1))
    expected = torch.stack(expected)[None]
    pred = torch.randn(1, L, 64 * 3)
    torch.testing.assert_close(model.token_errors(clips, pred), ((pred - expected) ** 2).mean(-1))


def test_detached_variant_keeps_its_own_network_and_per_patch_targets() -> None:
    torch.manual_seed(0)
    variant = create_model("mae_vit_micro_patch8", mask_type="adaptive_detached", **TINY)
    s = variant.adaptive_sampler
    assert s.blocks[0].attn.qkv.bias is not None and s.blocks[0].norm1.eps == 1e-6
    assert s.detach_input and isinstance(s.norm, nn.LayerNorm) and not s.head.weight.any()
    assert variant.target_norm == "patch" and published().target_norm == "channel"
