"""Mixup / CutMix for video clips [B, C, T, H, W] with label smoothing and soft targets.

timm's Mixup works on images [B, C, H, W] and indexes the last two dims for the CutMix box, so we
hand it a view with the frames folded into the channels, [B, C*T, H, W]: the box is then the same on
every frame of a clip, and the in-place mixing writes through the view into the clip tensor.
"""

import torch
from timm.data.mixup import Mixup


class VideoMixup:
    """Mix a batch of clips and return (clips, soft targets [B, num_classes] whose rows sum to 1)."""

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, num_classes: int = 400,
                 mode: str = "batch"):
        self.num_classes = num_classes
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                           switch_prob=switch_prob, mode=mode, label_smoothing=label_smoothing,
                           num_classes=num_classes)

    def __call__(self, clips: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """clips [B, C, T, H, W] (B even), target [B] class ids -> mixed clips, soft targets."""
        if clips.ndim != 5:
            raise ValueError(f"expected clips [B, C, T, H, W], got shape {tuple(clips.shape)}")
        b, c, t, h, w = clips.shape
        clips = clips.contiguous()
        folded = clips.view(b, c * t, h, w)
        _, soft = self.mixup(folded, target)
        return clips, soft
