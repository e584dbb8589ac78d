"""Reconstruction images: original / masked / reconstructed target frames of one fixed clip, plus,
for the adaptive (AdaMAE) sampler, a row with its per-token sampling probability as a heat map."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

MEAN, STD = 0.45, 0.225
MIN_SIDE = 96  # frames smaller than this are enlarged in the grid


def probability_heat_map(model: torch.nn.Module, probs: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Per-token probabilities [L] of clip 0 as a black-red-yellow-white map [T_pred, C, H, W] over its frames.

    Scaled by the clip's largest probability (a uniform sampler shows as flat mid-red), and blended
    with the frames' brightness so the hot spots can be matched to the content.
    """
    t, h, w = model.grid_size
    p = model.patch_size
    heat = probs.float().reshape(t, h, w)
    heat = heat / heat.max().clamp_min(1e-12)
    heat = heat.repeat_interleave(model.t_pred_patch_size, 0).repeat_interleave(p, 1).repeat_interleave(p, 2)
    ramp = torch.stack([(3 * heat).clamp(0, 1), (3 * heat - 1).clamp(0, 1), (3 * heat - 2).clamp(0, 1)], dim=1)
    gray = (frames * STD + MEAN).clamp(0, 1).mean(dim=1, keepdim=True)  # [T_pred, 1, H, W]
    return 0.75 * ramp + 0.25 * gray


def reconstruction_grid(model: torch.nn.Module, clips: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                        probs: torch.Tensor | None = None, thrown: torch.Tensor | None = None) -> torch.Tensor:
    """A [3, H, W] image in [0, 1]: rows of original, masked and reconstructed frames of clip 0, and
    with `probs` [B, L] (the adaptive sampler's) a fourth row: the sampling probability heat map.
    `thrown` [B, L] (AMT's thrown tokens): grey in the masked row like the masked ones, black in the
    reconstruction (nothing was predicted there).

    `model` is the plain (unwrapped) MAE: only its patchify/unpatchify helpers are used.
    """
    clips, pred, mask = clips[:1].float(), pred[:1].float(), mask[:1].float()
    target = model.patchify(model.target_frames(clips))
    if model.norm_pix_loss:
        # The model predicts per-patch normalised pixels: undo it with the true patch statistics.
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1.0e-6).sqrt()
        pred = pred * std + mean
    m = mask[..., None]
    t = thrown[:1].float()[..., None] if thrown is not None else torch.zeros_like(m)
    hidden = m + t
    masked = target * (1 - hidden) + hidden * ((0.5 - MEAN) / STD)  # hidden patches shown grey
    # visible patches pasted from the input, as MAE shows them; thrown ones black
    recon = target * (1 - hidden) + pred * m + t * ((0.0 - MEAN) / STD)
    rows = [model.unpatchify(x)[0] for x in (target, masked, recon)]  # each [C, T, H, W]
    frames = torch.cat([r.permute(1, 0, 2, 3) for r in rows])  # [3T, C, H, W]
    frames = (frames * STD + MEAN).clamp(0, 1)
    if probs is not None:
        frames = torch.cat([frames, probability_heat_map(model, probs[0], rows[0].permute(1, 0, 2, 3))])
    if frames.shape[-1] < MIN_SIDE:  # demo-sized clips (32 px): enlarge, pixel for pixel, so the PNG is readable
        frames = torch.nn.functional.interpolate(frames, scale_factor=math.ceil(MIN_SIDE / frames.shape[-1]),
                                                 mode="nearest")
    return make_grid(frames, nrow=rows[0].shape[1], padding=1, pad_value=1.0)


@torch.no_grad()
def save_reconstruction(
    module: torch.nn.Module,
    plain_model: torch.nn.Module,
    clips: torch.Tensor,
    noise: torch.Tensor | None,
    mask_ratio: float,
    path: str | Path | None,
    autocast,
) -> torch.Tensor:
    """Run the (possibly sharded) model on a fixed clip and write the grid PNG to `path`.

    Every rank must call this under FSDP/ZeRO-3 (the forward gathers parameters); pass path=None
    on ranks that should not write.
    """
    was_training = module.training
    module.eval()
    with autocast():
        _, pred, mask, aux = module(clips, mask_ratio, noise, return_aux=True)
    module.train(was_training)
    # The adaptive sampler's probabilities and AMT's thrown tokens, where the model's strategy has them.
    grid = reconstruction_grid(plain_model, clips, pred, mask, aux.get("sampler_probs"), aux.get("thrown"))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, str(path))
    return grid
