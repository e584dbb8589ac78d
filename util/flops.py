"""Analytic FLOP counts for masked-autoencoder ViTs, for benchmarks and MFU logging.

Counts matmul FLOPs only (2 per multiply-add: patch embedding, linears, attention QK^T and AV), the
same convention as `torch.utils.flop_counter`. Norms, softmax, GELU and the loss are left out: they
are a few percent of the work and are bandwidth-bound, not matmul-bound.

Why not just use the counter: on CPU, `F.scaled_dot_product_attention` runs a fused flash kernel
that `FlopCounterMode` does not see, which is about a third of the MAE decoder's work at 1568
tokens. On the meta device (or with the math SDPA backend) the counter sees attention and agrees
with these numbers (`tests/test_flops.py`).
"""

from __future__ import annotations

import time

import torch
from torch import nn

# Training-step FLOPs = forward + backward, and backward costs two forwards (grads w.r.t. inputs
# and w.r.t. weights). The patch embedding needs no input grad, so the exact factor is a hair less.
TRAIN_STEP_FACTOR = 3


def block_flops(tokens: int, dim: int, mlp_hidden: int) -> dict[str, int]:
    """Forward FLOPs of one pre-norm ViT block on `tokens` tokens: {"linear", "attention"}."""
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_hidden)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * dim  # QK^T and AV, summed over heads
    return {"linear": linear, "attention": attention}


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
    parts = {
        "patch_embed": 2 * embed_tokens * patch_dim * enc_dim,
        "encoder_linear": enc_depth * enc["linear"],
        "encoder_attention": enc_depth * enc["attention"],
        "decoder_embed": 2 * enc_tokens * enc_dim * dec_dim,
        "decoder_linear": dec_depth * dec["linear"],
        "decoder_attention": dec_depth * dec["attention"],
        "pred_head": 2 * pred_tokens * dec_dim * pred_dim,
    }
    parts["forward"] = sum(parts.values())
    parts["train_step"] = TRAIN_STEP_FACTOR * parts["forward"]
    return parts


def mae_flops_per_clip(model: nn.Module, mask_ratio: float) -> dict[str, int]:
    """Analytic FLOPs per clip of our `MaskedAutoencoderViT` at a mask ratio (see module doc).

    Counts the training-mode model: decoder masking shrinks the decoder's tokens, and AdaMAE's
    sampler adds one block over every patch (which then must all be embedded).
    """
    from models.masking import num_visible  # local: keep this module importable without models

    pe = model.patch_embed
    num_patches = pe.num_patches
    visible = num_visible(num_patches, mask_ratio)
    decoder_patches = num_patches
    if getattr(model, "decoder_mask_ratio", 0.0) > 0:
        hidden = num_patches - visible
        decoder_patches = visible + max(1, int(hidden * (1 - model.decoder_mask_ratio)))
    sampler = getattr(model, "adaptive_sampler", None)
    enc_blk, dec_blk = model.blocks[0], model.decoder_blocks[0]
    parts = masked_autoencoder_flops(
        num_patches=num_patches,
        num_visible=visible,
        # forward_encoder embeds only the visible tubelets, unless the sampler needs them all
        num_embed_tokens=num_patches if sampler is not None else visible,
        num_decoder_patches=decoder_patches,
        patch_dim=pe.proj.weight[0].numel(),
        enc_dim=enc_blk.attn.qkv.in_features,
        enc_depth=len(model.blocks),
        enc_mlp=enc_blk.mlp.fc1.out_features,
        dec_dim=dec_blk.attn.qkv.in_features,
        dec_depth=len(model.decoder_blocks),
        dec_mlp=dec_blk.mlp.fc1.out_features,
        pred_dim=model.decoder_pred.out_features,
        num_prefix=int(model.cls_embed),
    )
    if sampler is not None:
        extra = 0
        for blk in sampler.blocks:
            one = block_flops(num_patches, blk.attn.qkv.in_features, blk.mlp.fc1.out_features)
            extra += one["linear"] + one["attention"]
        extra += 2 * num_patches * sampler.head.in_features * sampler.head.out_features
        parts["sampler"] = extra
        parts["forward"] += extra
        parts["train_step"] = TRAIN_STEP_FACTOR * parts["forward"]
    return parts


def vit_flops_per_clip(model: nn.Module) -> dict[str, int]:
    """Analytic forward FLOPs per clip of the `VisionTransformer` classifier (all tokens, plus head)."""
    pe = model.patch_embed
    blk = model.blocks[0]
    tokens = pe.num_patches + int(getattr(model, "cls_embed", False))
    one = block_flops(tokens, blk.attn.qkv.in_features, blk.mlp.fc1.out_features)
    head = model.head
    parts = {
        "patch_embed": 2 * pe.num_patches * pe.proj.weight[0].numel() * pe.proj.out_channels,
        "encoder_linear": len(model.blocks) * one["linear"],
        "encoder_attention": len(model.blocks) * one["attention"],
        "head": 2 * head.in_features * head.out_features if isinstance(head, nn.Linear) else 0,
    }
    parts["forward"] = sum(parts.values())
    parts["train_step"] = TRAIN_STEP_FACTOR * parts["forward"]
    return parts


# Dense peak FLOP/s per accelerator from the vendors' datasheets (no sparsity), by precision. MFU is
# measured against these; on a CPU there is no datasheet, so the peak is measured (a large matmul).
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM; PCIe parts are ~25% lower
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
}


def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-N fp32 FLOP/s of an n x n x n `torch.mm` on `device`: its practical matmul peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for MFU on this device at this precision."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_FLOPS.items():
            if key in name:
                return table[precision], f"{name} datasheet {precision}"
        return matmul_peak_flops(device), f"{name} measured fp32 matmul (not in PEAK_FLOPS)"
    return matmul_peak_flops(device), "measured CPU fp32 matmul"
