"""Video ViT classifier for fine-tuning MAE-ST encoders (same patch embedding and blocks)."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.flops import vit_flops
from models.video_vit import (
    Block,
    LayerNorm6,
    PatchEmbed3D,
    add_pos_embed,
    init_weights,
    layer_id_for,
    pos_tables,
    run_blocks,
)


class VisionTransformer(nn.Module):
    """ViT over all spacetime tokens; mean-pooled patch tokens -> fc norm -> dropout -> linear head.

    `init_values > 0` turns on layer scale in every block (VideoMAE's `--init_values`; its
    checkpoints' `gamma_1`/`gamma_2` load by name); 0 (default) keeps the plain blocks.
    """

    def __init__(
        self,
        num_classes: int = 400,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        dropout: float = 0.5,
        attn_drop_rate: float = 0.0,
        norm_layer: type[nn.Module] = LayerNorm6,
        num_frames: int = 16,
        t_patch_size: int = 2,
        cls_embed: bool = False,
        sep_pos_embed: bool = True,
        global_pool: bool = True,
        init_values: float = 0.0,
    ) -> None:
        super().__init__()
        if not global_pool and not cls_embed:
            raise ValueError("global_pool=False pools the class token: set cls_embed=True")
        self.patch_embed = PatchEmbed3D(img_size, patch_size, in_chans, embed_dim, num_frames, t_patch_size)
        t, h, w = self.grid_size = self.patch_embed.grid_size
        self.cls_embed, self.sep_pos_embed, self.global_pool = cls_embed, sep_pos_embed, global_pool
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.mlp_hidden, self.patch_dim = int(embed_dim * mlp_ratio), in_chans * t_patch_size * patch_size**2
        if cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        add_pos_embed(self, "", self.grid_size, embed_dim, cls_embed, sep_pos_embed)
        # Stochastic depth grows linearly with depth, as in MAE fine-tuning.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i], attn_drop=attn_drop_rate,
                      norm_layer=norm_layer, init_values=init_values)
                for i in range(depth)
            ]
        )
        # Pooled features get their own norm (fc_norm); the class-token path uses the final norm.
        self.norm = nn.Identity() if global_pool else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if global_pool else nn.Identity()
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        for name, p in self.named_parameters():
            if "pos_embed" in name or name.endswith("cls_token"):
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights)
        # A near-zero head keeps the first fine-tuning steps from destroying pretrained features. mae_st
        # re-draws only the weight (std 2e-5) and keeps nn.Linear's own bias, U(+-1/sqrt(fan_in)): so here.
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        bound = 1 / math.sqrt(embed_dim)
        nn.init.uniform_(self.head.bias, -bound, bound)

    def shard_units(self) -> list[nn.Module]:
        """The units that parallelism wraps from outside (activation checkpointing, compile, FSDP2): the blocks."""
        return list(self.blocks)

    def flops_per_clip(self) -> dict[str, int]:
        """Analytic FLOPs per clip (forward parts, "forward", "train_step"), from the configuration."""
        return vit_flops(num_patches=self.patch_embed.num_patches, patch_dim=self.patch_dim, dim=self.embed_dim,
                         depth=len(self.blocks), mlp=self.mlp_hidden, num_prefix=int(self.cls_embed),
                         num_classes=self.num_classes)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay."""
        return {n for n, _ in self.named_parameters() if "pos_embed" in n or n.endswith("cls_token")}

    def layer_id(self, name: str) -> int:
        """Layer index of a parameter for layer-wise lr decay (head and norms are the last layer)."""
        return layer_id_for(name, len(self.blocks))

    @property
    def num_layers(self) -> int:
        """Number of layer ids (embeddings + blocks + head)."""
        return len(self.blocks) + 2

    def forward_blocks(self, clips: torch.Tensor) -> torch.Tensor:
        """The last block's tokens [B, (1 +) N, D] (the class token first when there is one), before any norm."""
        x = self.patch_embed(clips)
        B = x.shape[0]
        pos, cls_pos = pos_tables(self, "", self.cls_embed, self.sep_pos_embed)
        x = x + pos
        if self.cls_embed:
            x = torch.cat([(self.cls_token + cls_pos).expand(B, -1, -1), x], dim=1)
        return run_blocks(self.blocks, x)

    def forward_tokens(self, clips: torch.Tensor) -> torch.Tensor:
        """The last block's patch tokens [B, N, D] (no class token, no norm): what a frozen-feature probe reads."""
        x = self.forward_blocks(clips)
        return x[:, 1:] if self.cls_embed else x

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Pooled clip embedding [B, D]."""
        x = self.forward_blocks(clips)
        if self.global_pool:
            # Only drop the first token when it is a class token: all others are real patches.
            tokens = x[:, 1:] if self.cls_embed else x
            return self.fc_norm(tokens.mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes] for clips [B, C, T, H, W]."""
        return self.head(self.head_drop(self.forward_features(clips)))


def to_linear_probe(model: VisionTransformer) -> VisionTransformer:
    """Freeze everything, then put a fresh BatchNorm1d(D, affine=False, eps=1e-6) + linear head on top (MAE)."""
    for p in model.parameters():
        p.requires_grad = False
    head = nn.Linear(model.embed_dim, model.num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)  # MAE's linear-probe init
    nn.init.zeros_(head.bias)
    # The un-affine BatchNorm whitens features whose scale varies a lot between pretrained models.
    model.head = nn.Sequential(nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), head)
    return model


def _vit(size: tuple[int, int, int], patch_size: int, cls: type[VisionTransformer] = VisionTransformer,
         **kwargs) -> VisionTransformer:
    # Explicit kwargs win, so a factory can be shrunk (e.g. depth=2) for tests; `cls` builds a subclass
    # of the same size (models/detect.py's detector).
    dim, depth, heads = size
    cfg = dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch_size)
    cfg.update(kwargs)
    return cls(**cfg)


def vit_micro_patch8(**kwargs) -> VisionTransformer:
    """128-d, 4-block classifier on 8x8 patches: the CPU demo and tests."""
    return _vit((128, 4, 4), 8, **kwargs)


def vit_tiny_patch16(**kwargs) -> VisionTransformer:
    """ViT-Ti/16 video classifier."""
    return _vit((192, 12, 3), 16, **kwargs)


def vit_small_patch16(**kwargs) -> VisionTransformer:
    """ViT-S/16 video classifier."""
    return _vit((384, 12, 6), 16, **kwargs)


def vit_base_patch16(**kwargs) -> VisionTransformer:
    """ViT-B/16 video classifier."""
    return _vit((768, 12, 12), 16, **kwargs)


def vit_large_patch16(**kwargs) -> VisionTransformer:
    """ViT-L/16 video classifier."""
    return _vit((1024, 24, 16), 16, **kwargs)


def vit_huge_patch16(**kwargs) -> VisionTransformer:
    """ViT-H/16 video classifier (the released MAE-ST ViT-H)."""
    return _vit((1280, 32, 16), 16, **kwargs)


def vit_huge_patch14(**kwargs) -> VisionTransformer:
    """ViT-H/14 video classifier."""
    return _vit((1280, 32, 16), 14, **kwargs)


def vit_giant_patch14(**kwargs) -> VisionTransformer:
    """ViT-g/14 video classifier (1408-d, 40 blocks, 16 heads, MLP ratio 48/11): VideoMAE v2's `vit_giant_patch14_224`."""
    return _vit((1408, 40, 16), 14, **{"mlp_ratio": 48 / 11, **kwargs})
