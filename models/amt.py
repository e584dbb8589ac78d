"""AMT, attention-driven masking and throwing (Liu, Gui, Luo, 2022), for spacetime tokens.

AMT reads the self-attention of the [CLS] token in the encoder's last block over every patch (as DINO
visualises it), computed by the model being trained on whole, unmasked inputs, and turns it into a
per-sample order of the tokens: a weighted random permutation with the attention as weights (what
`torch.multinomial(weights, L)` draws in the released code). Along that order:
- the first M tokens (mostly high attention: the object, the motion) are *masked*: hidden from the
  encoder and reconstructed by the decoder;
- the last T tokens (mostly low attention: redundant background) are *thrown*: in neither the
  encoder, nor the decoder, nor the loss, which is where the speed comes from;
- the K tokens between are *visible* to the encoder.
The permutation is drawn by Gumbel top-k from the per-sample uniform noise of the data side
(log w + Gumbel(u), sorted), so a sample's masks depend only on (its noise, its attention): not on
ranks, workers or batch composition, and a resume redraws them exactly.

Counts (dense batches): K = int(L * (1 - mask_ratio)) as for every mask sampler, T = int(L * throw_ratio)
taken out of the hidden ones, M = L - K - T >= 1. `mask_ratio` keeps its meaning across mask types
(the share hidden from the encoder); the paper's own masking ratio is M / L.

Video: the attention lives per training video in a table over a *canonical view* (the whole video:
num_frames frames spread over its full duration, the full frame resized to the square input), so a
training clip cut at any time, crop and flip reads its tokens' attention from the table through its
geometry (`clip_attention_weights`), as the released image code crops and flips its stored map with
the image. Where the table is refreshed and how it is gathered across ranks: `util/cross_rank.py`.

`AttentionMasking` is the mask strategy the MAE is built with (`--mask_type amt`): its `Mask` names the
masked tokens (`ids_masked`, the only ones decoded and in the loss) and the thrown ones (`thrown`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.adamae import gumbel_from_uniform
from models.masking import Grid, Mask, MaskStrategy, num_visible

# Geometry of a training clip, as the dataset reports it (datasets/video_dataset.py, `geometry`):
# start (s), video duration (s, first to last frame), crop top, left, height, width (fractions of the
# decoded frame) and horizontal flip (0/1).
GEOMETRY_FIELDS = ("start", "duration", "top", "left", "height", "width", "flip")
# Zero attention is allowed (min-max normalisation gives one such token per head): a floor keeps its log finite.
_FLOOR = 1.0e-6


def amt_counts(num_tokens: int, mask_ratio: float, throw_ratio: float) -> tuple[int, int, int]:
    """(visible K, masked M, thrown T) per sample; raises unless at least one token is masked."""
    if not 0.0 <= throw_ratio < 1.0:
        raise ValueError(f"throw_ratio must be in [0, 1), got {throw_ratio}")
    visible = num_visible(num_tokens, mask_ratio)
    thrown = int(num_tokens * throw_ratio)
    masked = num_tokens - visible - thrown
    if masked < 1:
        raise ValueError(f"mask_ratio {mask_ratio} hides {num_tokens - visible} of {num_tokens} tokens and "
                         f"throw_ratio {throw_ratio} throws {thrown} of them: none is left to reconstruct; "
                         f"lower --throw_ratio below --mask_ratio")
    return visible, masked, thrown


def amt_masking(weights: torch.Tensor, noise: torch.Tensor, mask_ratio: float, throw_ratio: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each sample's tokens by attention `weights` [B, L] (>= 0) and uniform `noise` [B, L].

    Returns (ids_keep [B, K], ids_restore [B, L], ids_masked [B, M], ids_thrown [B, T]); `ids_restore`
    un-shuffles the order [visible, masked, thrown], so `ids_restore.argsort(1)[:, :K] == ids_keep`.
    """
    if weights.shape != noise.shape:
        raise ValueError(f"attention weights {tuple(weights.shape)} and noise {tuple(noise.shape)} must match")
    visible, masked, _ = amt_counts(weights.shape[1], mask_ratio, throw_ratio)
    keys = torch.log(weights.float().clamp_min(_FLOOR)) + gumbel_from_uniform(noise)
    order = keys.argsort(dim=1, descending=True, stable=True)  # a draw of the weighted permutation
    ids_masked, ids_keep, ids_thrown = order[:, :masked], order[:, masked:masked + visible], order[:, masked + visible:]
    ids_restore = torch.cat([ids_keep, ids_masked, ids_thrown], dim=1).argsort(dim=1)
    return ids_keep, ids_restore, ids_masked, ids_thrown


class AttentionMasking(MaskStrategy):
    """AMT as a mask strategy: mask the attended tokens, throw `throw_ratio` of all tokens (the least attended).

    `num_videos > 0`: the MAE keeps the per-video attention table (`amt_attention`, one row per training video).
    """

    name = "amt"

    def __init__(self, throw_ratio: float = 0.0, num_videos: int = 0) -> None:
        self.throw_ratio, self.num_videos = throw_ratio, num_videos

    def sample(self, batch: int, grid: Grid, ratio: float, noise: torch.Tensor | None = None, *,
               tokens: torch.Tensor | None = None, attention: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> Mask:
        """Split by `attention` [B, L] (uniform when None: random masking and throwing) and the per-sample `noise`."""
        L = grid[0] * grid[1] * grid[2]
        noise = torch.rand(batch, L, device=device) if noise is None else noise
        weights = torch.ones(batch, L, device=device) if attention is None else attention
        ids_keep, ids_restore, ids_masked, ids_thrown = amt_masking(weights, noise, ratio, self.throw_ratio)
        thrown = torch.zeros(batch, L, device=device).scatter(1, ids_thrown, 1.0)
        mask = torch.ones(batch, L, device=device).scatter(1, ids_keep, 0.0)  # hidden from the encoder
        return Mask(ids_keep, ids_restore, mask, ids_masked=ids_masked, thrown=thrown)

    def check(self, num_tokens: int, cls_embed: bool, decoder_mask_ratio: float) -> None:
        """AMT reads the [CLS] attention and decodes only its masked tokens; its counts must leave one to mask."""
        if not cls_embed:
            raise ValueError("mask_type='amt' reads the [CLS] token's attention: set cls_embed=True")
        if decoder_mask_ratio > 0:
            raise ValueError("mask_type='amt' already decodes only its masked tokens: use decoder_mask_ratio=0")
        amt_counts(num_tokens, 0.5, self.throw_ratio)

    def __repr__(self) -> str:
        return f"AttentionMasking(throw_ratio={self.throw_ratio}, num_videos={self.num_videos})"


def normalize_cls_attention(attn: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """[CLS] attention [B, heads, prefix + L] -> weights [B, L] in [0, 1]: min-max per head, mean over heads.

    The released AMT code does the same, so every head counts alike whatever its temperature.
    """
    a = attn[:, :, num_prefix:].float()
    a = a - a.amin(dim=-1, keepdim=True)
    a = a / a.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return a.mean(dim=1)


def clip_attention_weights(table: torch.Tensor, geometry: torch.Tensor, grid: tuple[int, int, int],
                           t_patch_size: int, frame_step_s: float, canonical_frames: int) -> torch.Tensor:
    """Attention of a training clip's tokens [B, L], read from its video's canonical map through its geometry.

    `table` [B, t', h', w'] holds each video's map over its canonical view (`canonical_frames` frames at
    linspace(0, duration, n), the whole frame); `geometry` [B, 7] is the clip's (GEOMETRY_FIELDS);
    frames of a training clip are `frame_step_s` apart; `grid` is the clip's token grid (t, h, w).
    Each token centre is mapped into the canonical view and the map is read there (trilinear,
    clamped at the borders: a token outside the view takes the nearest edge).
    """
    B = table.shape[0]
    t, h, w = grid
    tc = table.shape[1]
    dev = table.device
    g = geometry.to(device=dev, dtype=torch.float32)
    start, duration, top, left, height, width, flip = g.unbind(dim=1)
    # Time: token centre (in frames of the clip) -> seconds -> frames of the canonical clip -> its token slot.
    centre = torch.arange(t, device=dev, dtype=torch.float32) * t_patch_size + (t_patch_size - 1) / 2
    seconds = start[:, None] + centre[None] * frame_step_s  # [B, t]
    canon_step = (duration / max(canonical_frames - 1, 1)).clamp_min(1e-6)
    slot = (seconds / canon_step[:, None] - (t_patch_size - 1) / 2) / t_patch_size
    gz = (2 * slot + 1) / tc - 1  # grid_sample, align_corners=False: slot k's centre is (2k + 1) / n - 1
    # Space: token centre as a fraction of the crop (mirrored when flipped) -> fraction of the frame.
    fy = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
    fx = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
    fx = torch.where(flip[:, None] > 0.5, 1 - fx[None], fx[None])  # [B, w]
    gy = 2 * (top[:, None] + fy[None] * height[:, None]) - 1  # [B, h]
    gx = 2 * (left[:, None] + fx * width[:, None]) - 1  # [B, w]
    coords = torch.stack(torch.broadcast_tensors(gx[:, None, None, :], gy[:, None, :, None], gz[:, :, None, None]),
                         dim=-1)  # [B, t, h, w, 3] as (x, y, z)
    out = F.grid_sample(table.float().unsqueeze(1), coords, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.reshape(B, t * h * w)
