"""Analytic FLOP counts of the project's ViTs, from their configuration (never from live parameters).

Counts matmul FLOPs only (2 per multiply-add: patch embedding, linears, attention QK^T and AV), the
same convention as `torch.utils.flop_counter`. Norms, softmax, GELU and the loss are left out: they
are a few percent of the work and are bandwidth-bound, not matmul-bound.

From the configuration because a sharded parameter (a ZeRO-3 or FSDP2 partition) may hold no
elements on a rank; and not `FlopCounterMode`, because on the CPU `F.scaled_dot_product_attention`
runs a fused flash kernel the counter does not see (about a third of the MAE decoder's work at 1568
tokens). On the meta device the counter sees attention and agrees with these numbers
(`tests/test_flops.py`).
"""

from __future__ import annotations

# Training-step FLOPs = forward + backward, and backward costs two forwards (grads w.r.t. inputs
# and w.r.t. weights). The patch embedding needs no input grad, so the exact factor is a hair less.
TRAIN_STEP_FACTOR = 3


def block_flops(tokens: int, dim: int, mlp_hidden: int) -> dict[str, int]:
    """Forward FLOPs of one pre-norm ViT block on `tokens` tokens: {"linear", "attention"}."""
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_hidden)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * dim  # QK^T and AV, summed over heads
    return {"linear": linear, "attention": attention}


def with_train_step(parts: dict[str, int]) -> dict[str, int]:
    """Add "forward" (sum of the parts) and "train_step" (3 x forward) to a dict of forward parts."""
    parts = dict(parts)
    parts["forward"] = sum(parts.values())
    parts["train_step"] = TRAIN_STEP_FACTOR * parts["forward"]
    return parts


def masked_autoencoder_flops(
    *,
    num_patches: int,
    num_visible: int,
    patch_dim: int,
    enc_dim: int,
    enc_depth: int,
    enc_mlp: int,
    dec_dim: int,
    dec_depth: int,
    dec_mlp: int,
    pred_dim: int,
    num_prefix: int = 0,
    num_pred_tokens: int | None = None,
    num_embed_tokens: int | None = None,
    num_decoder_patches: int | None = None,
) -> dict[str, int]:
    """Forward FLOPs per clip of an MAE, by part, plus "forward" and "train_step" totals.

    `num_prefix` class tokens ride along in encoder and decoder; the prediction head runs on
    `num_pred_tokens` tokens (default: every decoder token, as MAE-ST does; VideoMAE: masked only);
    the patch embedding on `num_embed_tokens` (default: all patches; ours embeds visible ones only);
    the decoder on `num_decoder_patches` patch tokens (default: all; fewer with decoder masking).
    """
    enc_tokens = num_visible + num_prefix
    dec_tokens = (num_patches if num_decoder_patches is None else num_decoder_patches) + num_prefix
    pred_tokens = dec_tokens if num_pred_tokens is None else num_pred_tokens
    embed_tokens = num_patches if num_embed_tokens is None else num_embed_tokens
    enc = block_flops(enc_tokens, enc_dim, enc_mlp)
    dec = block_flops(dec_tokens, dec_dim, dec_mlp)
    return with_train_step({
        "patch_embed": 2 * embed_tokens * patch_dim * enc_dim,
        "encoder_linear": enc_depth * enc["linear"],
        "encoder_attention": enc_depth * enc["attention"],
        "decoder_embed": 2 * enc_tokens * enc_dim * dec_dim,
        "decoder_linear": dec_depth * dec["linear"],
        "decoder_attention": dec_depth * dec["attention"],
        "pred_head": 2 * pred_tokens * dec_dim * pred_dim,
    })


def vit_flops(*, num_patches: int, patch_dim: int, dim: int, depth: int, mlp: int, num_prefix: int,
              num_classes: int) -> dict[str, int]:
    """Forward FLOPs per clip of a ViT classifier over all tokens, plus its linear head."""
    one = block_flops(num_patches + num_prefix, dim, mlp)
    return with_train_step({
        "patch_embed": 2 * num_patches * patch_dim * dim,
        "encoder_linear": depth * one["linear"],
        "encoder_attention": depth * one["attention"],
        "head": 2 * dim * num_classes,
    })
