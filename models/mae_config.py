"""The MAE's configuration: patching, encoder, decoder and target sections, and mask strategies by name.

`MaskedAutoencoderViT` (models/mae.py) takes these dataclasses and a mask strategy object; the
factories and `MaskedAutoencoderViT.from_kwargs` build them from the flat keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from models.adamae import AdaptiveTokenSampler, detached_variant
from models.amt import AttentionMasking
from models.masking import MASK_TYPES, MaskStrategy, SamplerMasking
from models.video_vit import LayerNorm6

# Conventions a released checkpoint was trained with (see the module docstring).
TARGET_FRAMES = ("stride", "linspace")
DECODER_CLS = ("learned", "encoder")


@dataclass(frozen=True)
class PatchConfig:
    """How clips are cut into tokens: clip size and (t_patch_size x patch_size x patch_size) tubelets."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_frames: int = 16
    t_patch_size: int = 2

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        side = self.img_size // self.patch_size
        return self.num_frames // self.t_patch_size, side, side


@dataclass(frozen=True)
class EncoderConfig:
    """The ViT encoder; `mlp_ratio` and `norm_layer` are the decoder's too."""

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_layer: Callable[..., nn.Module] = LayerNorm6
    cls_embed: bool = True
    sep_pos_embed: bool = True
    init_values: float = 0.0  # layer scale when > 0


@dataclass(frozen=True)
class DecoderConfig:
    """The light decoder (MAE-ST: 512-d, 4 blocks) and VideoMAE v2 decoder masking."""

    embed_dim: int = 512
    depth: int = 4
    num_heads: int = 16
    init_values: float | None = None  # None: the encoder's
    cls: str = "learned"  # or "encoder" (PySlowFast), see DECODER_CLS
    sep_pos_embed: bool | None = None  # None: the encoder's table form
    mask_ratio: float = 0.0
    mask_type: str = "run_cell"  # see DECODER_MASK_TYPES


@dataclass(frozen=True)
class TargetConfig:
    """What the decoder regresses: which frames (`pred_t_dim` of them, by the `frames` rule), normalised or not."""

    pred_t_dim: int | None = None  # None: num_frames // 2
    frames: str = "stride"  # see TARGET_FRAMES
    norm_pix_loss: bool = True


def build_mask_strategy(
    mask_type: str = "random", *, embed_dim: int = 1024, num_tokens: int = 1568, num_heads: int = 16,
    mlp_ratio: float = 4.0, norm_layer: Callable[..., nn.Module] = LayerNorm6, sampler_loss_weight: float = 1.0e-4,
    throw_ratio: float = 0.0, amt_num_videos: int = 0,
) -> MaskStrategy:
    """The mask strategy of a `--mask_type` name; AdaMAE's network is sized by the encoder's arguments."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask_type {mask_type!r}; choose one of {list(MASK_TYPES)}")
    if throw_ratio and mask_type != "amt":
        raise ValueError(f"throw_ratio is AMT's (mask_type='amt'), not {mask_type!r}'s")
    if mask_type == "adaptive":  # wgcban/adamae's network (its own heads, norm, dropout, no qkv bias)
        return AdaptiveTokenSampler(embed_dim, num_tokens, loss_weight=sampler_loss_weight)
    if mask_type == "adaptive_detached":
        return detached_variant(embed_dim, num_tokens, num_heads, mlp_ratio, norm_layer, sampler_loss_weight)
    if mask_type == "amt":
        return AttentionMasking(throw_ratio, amt_num_videos)
    return SamplerMasking(mask_type)  # random, tube, frame or cube
