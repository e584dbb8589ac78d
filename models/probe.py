"""Frozen-feature probes: V-JEPA's attentive probe (cross-attention pooling with learned queries + linear).

A `ProbeGrid` holds one frozen encoder and P probes that differ only in their optimiser settings
(lr scale, weight decay): the encoder runs once per batch (eval mode, no grad) and every probe reads
the same patch tokens. All probes start from the same initial weights, so probe i of a grid trains
exactly as it would alone. The optimiser groups come from `param_hparams` (util/optim.py asks for it).

Shapes and initialisation follow V-JEPA's published attentive classifier (facebookresearch/jepa
src/models/attentive_pooler.py): query tokens [1, Q, D] drawn with std 0.02, linear layers
trunc-normal(0.02) with zero bias, LayerNorm (1, 0), the output projections of each residual branch
divided by sqrt(2 * layer), a pre-norm cross-attention block (keys and values normalised) with an MLP.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from models.video_vit import Block
from models.vit import VisionTransformer

INIT_STD = 0.02  # V-JEPA's AttentivePooler init_std


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, Q, D] over tokens [B, N, D] (PyTorch SDPA)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The attended values [B, Q, D]."""
        B, Q, D = q.shape
        N = x.shape[1]
        q = self.q(q).view(B, Q, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in self.kv(x).view(B, N, 2, self.num_heads, self.head_dim).unbind(2))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, Q, D))


class CrossAttentionBlock(nn.Module):
    """q + xattn(q, norm1(x)), then q + mlp(norm2(q)): the pooler's one cross-attention block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.xattn = CrossAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Queries [B, Q, D] updated from tokens [B, N, D]."""
        q = q + self.xattn(q, self.norm1(x))
        return q + self.mlp(self.norm2(q))


class AttentiveProbe(nn.Module):
    """Optional self-attention blocks over the tokens, cross-attention pooling into Q learned queries, linear head.

    With several queries their pooled outputs are averaged before the linear layer (V-JEPA's classifier
    uses one query and squeezes it).
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int, num_queries: int = 1, num_blocks: int = 0,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, norm_layer=nn.LayerNorm)
                                     for _ in range(num_blocks)])
        self.pool = CrossAttentionBlock(dim, num_heads, mlp_ratio)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query_tokens, std=INIT_STD)
        self.apply(_init)
        # Residual branches' output projections scaled by 1/sqrt(2 * layer) (V-JEPA's _rescale_blocks).
        for layer, (proj, fc2) in enumerate([(b.attn.proj, b.mlp.fc2) for b in self.blocks]
                                            + [(self.pool.xattn.proj, self.pool.mlp.fc2)], start=1):
            for lin in (proj, fc2):
                lin.weight.data.div_(math.sqrt(2.0 * layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes] from encoder tokens [B, N, D]."""
        for blk in self.blocks:
            tokens = blk(tokens)
        q = self.pool(self.query_tokens.expand(tokens.shape[0], -1, -1), tokens)
        return self.linear(q.mean(dim=1))


def _init(m: nn.Module) -> None:
    """trunc-normal(0.02) linear weights with zero bias, LayerNorm (1, 0)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=INIT_STD)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ProbeGrid(nn.Module):
    """A frozen encoder (eval mode, no grad) and P identically initialised probes with their own (lr scale, wd).

    `forward` returns logits [B, P, C]; with `selected` set to a probe's index, only that probe's [B, C].
    """

    def __init__(self, encoder: VisionTransformer, probe: nn.Module, hparams: list[tuple[float, float]]) -> None:
        super().__init__()
        if not hparams:
            raise ValueError("a probe grid needs at least one (lr scale, weight decay) pair")
        for p in encoder.parameters():
            p.requires_grad = False
        self.encoder = encoder.eval()
        self.probes = nn.ModuleList([probe] + [copy.deepcopy(probe) for _ in hparams[1:]])
        self.hparams = [(float(s), float(wd)) for s, wd in hparams]
        self.selected: int | None = None

    def train(self, mode: bool = True) -> ProbeGrid:
        """Probes follow `mode`; the frozen encoder stays in eval mode (no dropout, no drop path)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def shard_units(self) -> list[nn.Module]:
        """The encoder's blocks (what parallelism wraps from outside)."""
        return self.encoder.shard_units()

    def param_hparams(self, name: str) -> tuple[int, float, float] | None:
        """(probe index, lr scale, weight decay) of a probe's parameter `name`; None for the encoder's."""
        if not name.startswith("probes."):
            return None
        i = int(name.split(".")[1])
        return (i, *self.hparams[i])

    def flops_per_clip(self) -> dict[str, int]:
        """The frozen encoder's forward FLOPs per clip (the probes' share is small and not counted)."""
        forward = self.encoder.flops_per_clip()["forward"]
        return {"forward": forward, "train_step": forward}

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's patch tokens [B, N, D], computed without autograd."""
        with torch.no_grad():
            return self.encoder.forward_tokens(clips)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Logits [B, P, C] of every probe (or [B, C] of the `selected` one) for clips [B, C, T, H, W]."""
        tokens = self.features(clips)
        if self.selected is not None:
            return self.probes[self.selected](tokens)
        return torch.stack([probe(tokens) for probe in self.probes], dim=1)
