"""AdaMAE adaptive sampler: the mask contract, Gumbel top-k sampling, where its gradient comes from,
and that the policy gradient moves probability towards hard-to-reconstruct tokens."""

from __future__ import annotations

import math

import pytest
import torch

from models import create_model
from models.adamae import AdaptiveTokenSampler, gumbel_top_k, policy_gradient_loss
from models.masking import num_visible, random_masking
from util.parallel import apply_checkpointing

TINY = dict(img_size=32, num_frames=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, depth=2)


def adaptive_mae(**kw) -> torch.nn.Module:
    """The detached variant (zero logits at start, detached input); the published one: test_adamae_published.py."""
    torch.manual_seed(0)
    return create_model("mae_vit_micro_patch8", mask_type="adaptive_detached", **{**TINY, **kw})


def random_head(model: torch.nn.Module, seed: int = 1) -> None:
    """Give the (zero-initialised) sampler head random weights, so the distribution is not uniform."""
    with torch.no_grad():
        model.adaptive_sampler.head.weight.copy_(torch.randn(model.adaptive_sampler.head.weight.shape,
                                                             generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9, 0.95])
def test_keeps_exactly_k_distinct_tokens(ratio: float) -> None:
    B, L = 5, 200
    logits = torch.randn(B, L, generator=torch.Generator().manual_seed(0)) * 3
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(1))
    ids_keep, ids_restore, mask = gumbel_top_k(logits, noise, ratio)
    K = num_visible(L, ratio)
    assert ids_keep.shape == (B, K) and ids_restore.shape == (B, L) and mask.shape == (B, L)
    assert torch.equal((mask == 0).sum(1), torch.full((B,), K))
    for b in range(B):
        assert ids_keep[b].unique().numel() == K
        assert torch.all(mask[b, ids_keep[b]] == 0)
    # Deterministic in the noise (a resume or another rank layout draws the same tokens).
    assert torch.equal(gumbel_top_k(logits, noise.clone(), ratio)[0], ids_keep)


def test_model_mask_contract_and_metrics_at_95_percent() -> None:
    model = adaptive_mae()
    random_head(model)
    clips, noise = torch.randn(3, 3, 4, 32, 32), torch.rand(3, 32)
    loss, pred, mask, aux = model(clips, 0.95, noise, return_aux=True)
    assert pred.shape == (3, 32, 8 * 8 * 3)
    assert torch.equal((mask == 0).sum(1), torch.full((3,), num_visible(32, 0.95)))
    m, probs = aux["metrics"], aux["sampler_probs"]
    assert set(m) >= {"sampler_entropy", "sampler_loss"} and all(not v.requires_grad for v in m.values())
    assert 0 < float(m["sampler_entropy"]) <= math.log(32) + 1e-5
    assert probs.shape == (3, 32) and torch.allclose(probs.sum(1), torch.ones(3))
    assert torch.isfinite(loss)


def test_untrained_sampler_is_random_masking_for_the_same_noise() -> None:
    """Zero-initialised logits: the Gumbel draw keeps exactly the tokens random masking keeps."""
    model = adaptive_mae()
    noise = torch.rand(4, 32, generator=torch.Generator().manual_seed(2))
    _, _, mask = model(torch.randn(4, 3, 4, 32, 32), 0.75, noise)
    assert torch.equal(mask, random_masking(4, (2, 4, 4), 0.75, noise=noise)[2])


def test_gumbel_top_1_follows_the_distribution() -> None:
    """With K = 1, the kept token is a draw from softmax(logits): frequencies match the probabilities."""
    L, draws = 6, 20000
    logits = torch.tensor([2.0, 1.0, 0.0, 0.0, -1.0, -3.0])
    noise = torch.rand(draws, L, generator=torch.Generator().manual_seed(0))
    ids_keep, _, _ = gumbel_top_k(logits.expand(draws, L), noise, 1 - 1.5 / L)  # K = int(1.5) = 1
    freq = torch.bincount(ids_keep[:, 0], minlength=L).float() / draws
    assert torch.allclose(freq, logits.softmax(0), atol=0.015), (freq, logits.softmax(0))


def sampler_grads(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in model.adaptive_sampler.parameters()]


def test_reconstruction_loss_does_not_reach_the_sampler() -> None:
    clips, noise = torch.randn(2, 3, 4, 32, 32), torch.rand(2, 32)
    model = adaptive_mae(sampler_loss_weight=0.0)  # loss = reconstruction only
    random_head(model)
    model(clips, 0.75, noise)[0].backward()
    assert all(g is None or not g.any() for g in sampler_grads(model))
    embed_grad_recon = model.patch_embed.proj.weight.grad.clone()

    model = adaptive_mae(sampler_loss_weight=1.0)  # same weights, plus the policy-gradient term
    random_head(model)
    model(clips, 0.75, noise)[0].backward()
    grads = sampler_grads(model)
    assert all(g is not None for g in grads)
    assert model.adaptive_sampler.head.weight.grad.abs().sum() > 0
    assert model.adaptive_sampler.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # The sampler reads detached embeddings: the policy gradient never moves the encoder's patch embedding.
    assert torch.allclose(model.patch_embed.proj.weight.grad, embed_grad_recon, atol=1e-7)


def test_policy_gradient_raises_probability_of_high_error_tokens() -> None:
    """A fixed error map (high on 4 tokens): a few Adam steps move probability mass onto those tokens."""
    torch.manual_seed(0)
    L, D, B, ratio = 32, 32, 8, 0.75
    sampler = AdaptiveTokenSampler(D, L, num_heads=4)
    tokens = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1))
    hot = torch.tensor([3, 10, 17, 29])
    error = torch.full((B, L), 0.1)
    error[:, hot] = 1.0
    opt = torch.optim.Adam(sampler.parameters(), lr=1e-2)

    def mass_on_hot() -> float:
        with torch.no_grad():
            return float(sampler(tokens).softmax(-1)[:, hot].sum(-1).mean())

    before = mass_on_hot()
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        drawn = sampler.sample(B, (2, 4, 4), ratio, torch.rand(B, L, generator=gen), tokens=tokens)
        loss = policy_gradient_loss(drawn.log_probs, error, drawn.mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mass_on_hot()
    assert after > before + 0.1, (before, after)


def test_grad_checkpointing_same_loss_and_sampler_grads() -> None:
    clips, noise = torch.randn(2, 3, 4, 32, 32), torch.rand(2, 32)
    out = []
    for ckpt in (False, True):
        model = adaptive_mae(sampler_loss_weight=1.0)
        random_head(model)
        if ckpt:
            apply_checkpointing(model)
        loss = model(clips, 0.9, noise)[0]
        loss.backward()
        out.append((loss.detach(), model.adaptive_sampler.blocks[0].mlp.fc1.weight.grad.clone()))
    assert torch.allclose(out[0][0], out[1][0]) and torch.allclose(out[0][1], out[1][1], atol=1e-6)


def test_state_dict_keys_of_other_mask_types_unchanged() -> None:
    """The sampler adds its own keys only to adaptive models; random models keep their keys."""
    plain = set(create_model("mae_vit_micro_patch8", **TINY).state_dict())
    ada = set(adaptive_mae().state_dict())
    assert plain < ada and all(k.startswith("adaptive_sampler.") for k in ada - plain)
    assert "adaptive_sampler.pos_embed" in adaptive_mae().no_weight_decay()


def test_where_it_looks_counts_visible_tokens_on_the_box() -> None:
    """The measurement of benchmarks/masking_ablation.py part 2: tokens touching a box, and the visible share on it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import masking_ablation as mab

    torch.manual_seed(0)
    model = create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, t_patch_size=2, pred_t_dim=4)  # 2x4x4
    # frames 0-11 (stride 2: a clip from frame s uses s, s+2, s+4, s+6): a box that moves one patch right at frame 6
    # boxes[video][frame][object] = [x0, y0, x1, y1] (boxes.json's layout)
    boxes = [[[[8, 0, 16, 8]] if f < 6 else [[16, 0, 17, 8]] for f in range(12)]]
    on = mab.token_box_overlap(boxes, torch.tensor([0]), model, stride=2).view(2, 4, 4)
    expected = torch.zeros(2, 4, 4, dtype=torch.bool)
    expected[0, 0, 1] = True  # tubelet 0: frames 0 and 2
    expected[1, 0, 1] = expected[1, 0, 2] = True  # tubelet 1: frames 4 (old place) and 6 (new place)
    assert torch.equal(on, expected)
    # A box ending on a patch edge does not touch the next patch (exclusive end).
    corner = [[[[0, 0, 8, 8]]] * 12]
    assert mab.token_box_overlap(corner, torch.tensor([0]), model, 2).view(2, 4, 4).sum() == 2
    # Nothing hidden: the visible share is the share of tokens on a still box, 1 of 16 per tubelet.
    still = [[[[8, 0, 16, 8]]] * 12]
    videos = torch.randint(0, 255, (3, 12, 32, 32, 3), dtype=torch.uint8)
    assert mab.visible_on_object(model, videos, still * 3, ratio=0.0, stride=2, draws=2) == 1 / 16
    # Random masking at 75%: about the same share (each token equally likely to stay), never all or none.
    share = mab.visible_on_object(model, videos, still * 3, ratio=0.75, stride=2, draws=50)
    assert 0.3 / 16 < share < 3 / 16


@pytest.mark.slow
def test_adaptive_sampler_looks_at_the_moving_object(tmp_path) -> None:
    """Issue 7 acceptance, through the training script: one moving object on a static (plain) background,
    main_pretrain.py runs of 150 steps at 90% masking (benchmarks/masking_ablation.py part 2): the trained
    sampler puts visible tokens on the object >= 2x as often as random masking does."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import masking_ablation as mab

    m = mab.where_it_looks(tmp_path, steps=150, ratio=0.9, batch=8, background="plain")
    print(f"visible tokens on the object: random {m['random']:.1%}, adaptive {m['adaptive']:.1%} "
          f"({m['ratio_adaptive_over_random']:.2f}x)")
    # random masking keeps each token alike: its share is the object's share of all tokens
    assert m["random"] == pytest.approx(m["object_token_share"], rel=0.25)
    assert m["adaptive"] >= 2 * m["random"]
