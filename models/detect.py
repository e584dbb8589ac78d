"""ViT action detector for AVA: the video ViT encoder with PySlowFast's ViT/MViT RoI head.

PySlowFast's MViT with `DETECTION.ENABLE` (slowfast/models/video_model_builder.py, `MViT.forward`, which
MAE-ST's detection results use) runs every token through the blocks, applies the final norm, drops the
class token and reshapes the tokens to [B, C, T', H', W']; its `head_helper.ResNetRoIHead` then
- averages over all T' time steps (AvgPool3d of kernel [T', 1, 1]),
- RoIAligns each box on that keyframe map (ROI_XFORM_RESOLUTION 7 x 7, spatial scale 1 / 16 =
  1 / SPATIAL_SCALE_FACTOR, i.e. one over the patch size, sampling_ratio 0, aligned=True),
- max-pools the 7 x 7 (MaxPool2d(7)), applies dropout (MODEL.DROPOUT_RATE, 0.5 in the AVA configs) and a
  linear layer to the 80 classes, then the sigmoid (HEAD_ACT: sigmoid).
`ViTDetector` computes the same on our encoder. `forward` returns logits; the sigmoid is applied by the
caller at evaluation and inside the loss (BCE with logits, the same values as PySlowFast's BCELoss on the
sigmoid, computed stably). Pretrained weights load as for classification (models/convert.py): the
pretraining encoder's final `norm` fills `norm`, the head starts fresh.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

from models import create_model
from models.video_vit import LayerNorm6
from models.vit import VisionTransformer

ROI_RESOLUTION = 7  # PySlowFast DETECTION.ROI_XFORM_RESOLUTION default


class RoIHead(nn.Module):
    """RoIAlign on a [B, C, H', W'] map, spatial max pool, dropout, linear (PySlowFast ResNetRoIHead, one pathway)."""

    def __init__(self, dim: int, num_classes: int, patch_size: int, resolution: int = ROI_RESOLUTION,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.resolution, self.spatial_scale = resolution, 1.0 / patch_size
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = nn.Linear(dim, num_classes)
        # MViT's _init_weights: linear weights trunc-normal std 0.02, biases 0 (HEAD_INIT_SCALE 1.0)
        nn.init.trunc_normal_(self.projection.weight, std=0.02)
        nn.init.zeros_(self.projection.bias)

    def forward(self, fmap: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Logits [N, classes] of boxes [N, 5] (batch index, x1, y1, x2, y2 in input pixels)."""
        x = roi_align(fmap, boxes.to(fmap.dtype), output_size=self.resolution, spatial_scale=self.spatial_scale,
                      sampling_ratio=0, aligned=True)  # [N, C, R, R]
        x = x.amax(dim=(2, 3))  # MaxPool2d(R, stride=1) on an R x R map: one value per channel
        return self.projection(self.dropout(x))


class ViTDetector(VisionTransformer):
    """Video ViT (all tokens visible) -> final norm -> [B, D, T', H', W'] -> mean over T' -> RoI head."""

    def __init__(self, num_classes: int = 80, dropout: float = 0.5, roi_resolution: int = ROI_RESOLUTION,
                 **kwargs) -> None:
        kwargs.pop("global_pool", None)  # the detector pools boxes, not the clip
        super().__init__(num_classes=num_classes, dropout=0.0, global_pool=True, **kwargs)
        self.norm = kwargs.get("norm_layer", LayerNorm6)(self.embed_dim)  # MViT applies its final norm
        self.fc_norm = nn.Identity()
        del self.head_drop
        self.head = RoIHead(self.embed_dim, num_classes, self.patch_embed.patch_size, roi_resolution, dropout)

    def feature_map(self, clips: torch.Tensor) -> torch.Tensor:
        """The keyframe map [B, D, H', W']: normed tokens as [B, D, T', H', W'] averaged over T'."""
        x = self.norm(self.forward_tokens(clips))  # [B, T'H'W', D], time outermost (PatchEmbed3D)
        t, h, w = self.grid_size
        return x.transpose(1, 2).reshape(x.shape[0], self.embed_dim, t, h, w).mean(dim=2)

    def forward(self, clips: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Action logits [N, classes] for clips [B, C, T, H, W] and boxes [N, 5] (batch index first)."""
        return self.head(self.feature_map(clips), boxes)


def create_detector(name: str, **kwargs) -> ViTDetector:
    """The detector with the encoder of the registered ViT `name` (e.g. vit_large_patch16)."""
    return create_model(name, cls=ViTDetector, **kwargs)
