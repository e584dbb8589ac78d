"""Video ViT building blocks: 3-D patch embedding, fused-qkv SDPA attention, pre-norm block and
separable (spatial + temporal) positional embeddings with interpolation.

Shared by the masked autoencoder (`models/mae.py`) and the classifier (`models/vit.py`). Tokens are
always flattened in (t, h, w) order: token `l = t * H'W' + h * W' + w`.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

# MAE's norm: LayerNorm with eps 1e-6 (a module-level constant so it can be an argument default).
LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


class PatchEmbed3D(nn.Module):
    """Cut a clip [B, C, T, H, W] into (t_patch x p x p) tubelets and embed them: [B, L, D]."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        num_frames: int = 16,
        t_patch_size: int = 2,
    ) -> None:
        super().__init__()
        if img_size % patch_size or num_frames % t_patch_size:
            raise ValueError(
                f"img_size {img_size} must be divisible by patch_size {patch_size} and num_frames "
                f"{num_frames} by t_patch_size {t_patch_size}"
            )
        self.img_size, self.patch_size = img_size, patch_size
        self.num_frames, self.t_patch_size = num_frames, t_patch_size
        self.grid_size = (num_frames // t_patch_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = math.prod(self.grid_size)
        kernel = (t_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[2:]) != (self.num_frames, self.img_size, self.img_size):
            raise ValueError(
                f"expected clips of {self.num_frames}x{self.img_size}x{self.img_size} (T x H x W), "
                f"got {tuple(x.shape[2:])}; set num_frames/img_size to match the data"
            )

    def tubelets(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Flattened tubelets [B, L or K, C*t*p*p] of clips [B, C, T, H, W], only tokens `ids` [B, K] if given.

        Flattened in (c, t, p, p) order, the order of the Conv3d weight, so `embed` is the conv.
        """
        self._check(x)
        B, C = x.shape[:2]
        (t, h, w), u, p = self.grid_size, self.t_patch_size, self.patch_size
        # A strided view [B, T', H', W', C, u, p, p]: no copy until the tubelets are picked.
        view = x.view(B, C, t, u, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        if ids is None:
            return view.reshape(B, t * h * w, C * u * p * p)
        # Advanced indexing reads only the K kept tubelets (10% of the clip at 90% masking).
        rows = torch.arange(B, device=x.device).unsqueeze(1)
        return view[rows, ids // (h * w), (ids // w) % h, ids % w].reshape(B, ids.shape[1], C * u * p * p)

    def embed(self, tubelets: torch.Tensor) -> torch.Tensor:
        """Project flattened tubelets [..., C*t*p*p] to tokens [..., D] with the conv's weight."""
        # A Conv3d with kernel == stride is a linear over tubelets; one GEMM beats the CPU conv path.
        w = self.proj.weight
        return F.linear(tubelets, w.view(w.shape[0], -1), self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed clips [B, C, T, H, W] into tokens [B, T'H'W', D]."""
        return self.embed(self.tubelets(x))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch SDPA (flash on GPU)."""

    def __init__(
        self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over all tokens of x [B, N, D]."""
        B, N, D = x.shape
        # Unbind the qkv axis in place (views): backward then stacks the three grads straight
        # into the qkv layout, one copy instead of a stack plus a permuted copy.
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the first ([CLS]) query over all N tokens of x [B, N, D]: [B, heads, N]."""
        B, N, _ = x.shape
        # Only the class token's row is needed: q for one token, k for all (SDPA does not return weights).
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k = qkv[:, :1, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # [B, h, 1, d], [B, h, N, d]
        scores = (q.float() @ k.float().transpose(-2, -1)) * self.head_dim**-0.5
        return scores.softmax(dim=-1).squeeze(2)


class Block(nn.Module):
    """Pre-norm transformer block; the unit that parallelism (FSDP, checkpointing, compile) wraps.

    `init_values > 0` adds layer scale (CaiT; VideoMAE's and PySlowFast's `init_values` /
    `LAYER_SCALE_INIT_VALUE`): learned per-channel gains `gamma_1`, `gamma_2` on the two residual
    branches, under those releases' names so their weights load by name. 0 (the default) registers
    no gammas, so the state-dict keys of models without layer scale are unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        init_values: float = 0.0,
    ) -> None:
        super().__init__()
        if init_values < 0:
            raise ValueError(f"init_values (layer scale) must be >= 0 (0 = off), got {init_values}")
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.gamma_1: nn.Parameter | None = None
        self.gamma_2: nn.Parameter | None = None
        if init_values > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor, cls_attention: bool = False) -> torch.Tensor:
        """Residual attention then residual MLP (each branch scaled by its gamma under layer scale).

        With `cls_attention` it returns instead the [CLS] query's attention weights [B, heads, N] (as
        DINO visualises them; AMT reads the last block's). A flag of `forward`, not a method, so that
        FSDP2 / ZeRO-3 hooks gather the block's parameters and wrappers (checkpointing, compile) pass it.
        """
        if cls_attention:
            return self.attn.cls_attention(self.norm1(x))
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Run blocks in order (activation checkpointing, if any, is wrapped around them from outside)."""
    for blk in blocks:
        x = blk(x)
    return x


def separable_pos_table(spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
    """Sum spatial [1, H'W', D] and temporal [1, T', D] tables into [1, T'H'W', D], (t, h, w) order."""
    t, hw = temporal.shape[1], spatial.shape[1]
    return spatial.repeat(1, t, 1) + torch.repeat_interleave(temporal, hw, dim=1)


def add_pos_embed(module: nn.Module, prefix: str, grid: tuple[int, int, int], dim: int, cls_embed: bool,
                  sep_pos_embed: bool) -> None:
    """Register learned position tables under MAE-ST's names: `{prefix}pos_embed_{spatial,temporal,class}`
    (separable) or one joint `{prefix}pos_embed` [1, (1+) T'H'W', D], so official weights load by name."""
    t, h, w = grid
    if sep_pos_embed:
        setattr(module, prefix + "pos_embed_spatial", nn.Parameter(torch.zeros(1, h * w, dim)))
        setattr(module, prefix + "pos_embed_temporal", nn.Parameter(torch.zeros(1, t, dim)))
        if cls_embed:
            setattr(module, prefix + "pos_embed_class", nn.Parameter(torch.zeros(1, 1, dim)))
    else:
        setattr(module, prefix + "pos_embed", nn.Parameter(torch.zeros(1, t * h * w + int(cls_embed), dim)))


def pos_tables(module: nn.Module, prefix: str, cls_embed: bool, sep_pos_embed: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(patch position table [1, L, D], class-token position [1, 1, D] or None) registered by add_pos_embed."""
    if sep_pos_embed:
        table = separable_pos_table(getattr(module, prefix + "pos_embed_spatial"),
                                    getattr(module, prefix + "pos_embed_temporal"))
        return table, getattr(module, prefix + "pos_embed_class") if cls_embed else None
    full = getattr(module, prefix + "pos_embed")
    return (full[:, 1:], full[:, :1]) if cls_embed else (full, None)


def resize_spatial_pos_embed(pe: torch.Tensor, new_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a square spatial table [1, H*W, D] to [1, H'*W', D]."""
    n, d = pe.shape[1], pe.shape[2]
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"spatial position table of {n} tokens is not a square grid")
    if (side, side) == tuple(new_hw):
        return pe
    grid = pe.reshape(1, side, side, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], d).to(pe.dtype)


def resize_temporal_pos_embed(pe: torch.Tensor, new_t: int) -> torch.Tensor:
    """Linearly resize a temporal table [1, T, D] to [1, T', D]."""
    if pe.shape[1] == new_t:
        return pe
    out = F.interpolate(pe.transpose(1, 2).float(), size=new_t, mode="linear", align_corners=False)
    return out.transpose(1, 2).to(pe.dtype)


def resize_joint_pos_embed(
    pe: torch.Tensor, old_grid: tuple[int, int, int], new_grid: tuple[int, int, int], num_prefix: int = 0
) -> torch.Tensor:
    """Trilinearly resize a joint table [1, prefix + T*H*W, D] to a new (T', H', W') grid."""
    prefix, body = pe[:, :num_prefix], pe[:, num_prefix:]
    if tuple(old_grid) == tuple(new_grid):
        return pe
    d = pe.shape[-1]
    body = body.reshape(1, *old_grid, d).permute(0, 4, 1, 2, 3).float()
    body = F.interpolate(body, size=tuple(new_grid), mode="trilinear", align_corners=False)
    body = body.permute(0, 2, 3, 4, 1).reshape(1, math.prod(new_grid), d).to(pe.dtype)
    return torch.cat([prefix, body], dim=1)


def init_weights(module: nn.Module, trunc_init: bool = False) -> None:
    """MAE initialisation: xavier-uniform (or trunc-normal 0.02) linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        if trunc_init:
            nn.init.trunc_normal_(module.weight, std=0.02)
        else:
            nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, PatchEmbed3D):
        # Treat the conv like a linear over the flattened tubelet, as MAE does.
        w = module.proj.weight
        if trunc_init:
            nn.init.trunc_normal_(w, std=0.02)
        else:
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(module.proj.bias)


def layer_id_for(name: str, num_blocks: int, block_prefix: str = "blocks.") -> int:
    """Layer index for layer-wise lr decay: embeddings 0, encoder block i -> i + 1, the rest last."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token")):
        return 0
    if name.startswith(block_prefix):
        return int(name[len(block_prefix):].split(".")[0]) + 1
    return num_blocks + 1
