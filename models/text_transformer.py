"""A caption encoder trained from scratch: a CLIP-style text Transformer.

Token embedding + learned positions, pre-norm blocks (the video ViT's `Block`, with causal attention
when `causal`), a final LayerNorm, and one vector per caption:
- pool "eot" (CLIP): the output at the [EOT] id. With causal attention it has read the whole caption
  and nothing after it, so the padding needs no mask.
- pool "first" (FLIP's text encoder): the output at the first position, with bidirectional attention
  (causal=False); FLIP's own encoder attends over the padding too, and so does this one.
- pool "mean": the mean over the caption's ids ([SOT] .. [EOT]), padding excluded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.flops import block_flops
from models.video_vit import Attention, Block, LayerNorm6, run_blocks

POOLS = ("eot", "first", "mean")


class CausalAttention(Attention):
    """Self-attention in which a token sees only itself and the tokens before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over tokens 0..i for each token i of x [B, N, D]."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                           is_causal=True)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, D)))


class TextTransformer(nn.Module):
    """Ids [B, N] (with [SOT], [EOT] and padding, datasets.text_tokenizer) -> caption features [B, width]."""

    def __init__(self, vocab_size: int, context_length: int = 32, width: int = 512, depth: int = 12,
                 num_heads: int = 8, mlp_ratio: float = 4.0, causal: bool = True, pool: str = "eot",
                 eot_id: int = 2, pad_id: int = 0) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"text pool must be one of {POOLS}, got {pool!r}")
        if pool == "first" and causal:
            raise ValueError("pool 'first' with causal attention would see only [SOT]: use causal=False (FLIP) "
                             "or pool 'eot' (CLIP)")
        self.context_length, self.width, self.causal, self.pool = context_length, width, causal, pool
        self.eot_id, self.pad_id = eot_id, pad_id
        self.arch = dict(width=width, depth=depth, mlp=int(width * mlp_ratio))
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = Block(width, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm6)
            if causal:  # same parameter names as the video blocks'
                block.attn = CausalAttention(width, num_heads, qkv_bias=True)
            self.blocks.append(block)
        self.norm = LayerNorm6(width)
        self._init_weights()

    def _init_weights(self) -> None:
        # CLIP's text tower: normal(0.02) token table, normal(0.01) positions; linears as the ViT (xavier).
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Caption features [B, width] of id rows [B, N] (N <= context_length)."""
        if ids.shape[1] > self.context_length:
            raise ValueError(f"captions of {ids.shape[1]} ids exceed the text tower's context_length "
                             f"{self.context_length}; tokenize with that context length")
        x = self.token_embedding(ids) + self.pos_embed[:, : ids.shape[1]]
        x = self.norm(run_blocks(self.blocks, x))
        if self.pool == "first":
            return x[:, 0]
        if self.pool == "eot":
            # First [EOT] per row (a row cut at context_length still ends in one: see the tokenizer).
            where = (ids == self.eot_id).int().argmax(dim=1)
            return x[torch.arange(x.shape[0], device=x.device), where]
        keep = (ids != self.pad_id).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1)

    def flops_per_caption(self) -> int:
        """Forward FLOPs of one caption of context_length ids (matmuls only; the embedding is a lookup)."""
        a = self.arch
        one = block_flops(self.context_length, a["width"], a["mlp"])
        return a["depth"] * (one["linear"] + one["attention"])
