"""Masked video-text pretraining: a dual encoder trained with a contrastive loss on masked video.

- FLIP (Li et al., 2023) and MAC (Shu et al., 2022): the video tower is the MAE-ST encoder and sees only
  the visible tokens (`mask_ratio`, FLIP's 50%; random masking as FLIP, tube masking as MAC's
  "spatial regions"); the pooled output and the caption's feature are projected to one space and
  trained with a symmetric InfoNCE loss at a learned temperature. No decoder, no reconstruction.
- SMAUG (Lin et al., 2023): the same encoder pass also feeds the MAE decoder, whose reconstruction
  loss of the hidden patches is added (`mae_decoder=True`, weight chosen by the caller). Optional
  token sparsification (`sparsify_keep < 1`): after block `sparsify_layer` only the visible tokens the
  class token attends to most go on, and the rest are fused into one token weighted by that attention
  (EViT's rule, our reading of SMAUG's "visual token sparsification"; SMAUG also selects frames with a
  text-guided network, which would make a video's embedding depend on the query text, so a dual
  encoder cannot use it for retrieval: not built).

The loss runs over the global batch: `contrastive_loss` takes a `CrossRank` (how to gather embeddings
from every rank, with gradients) from the caller, so this module stays free of torch.distributed.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models import create_model
from models.flops import block_flops, with_train_step
from models.mae import MaskedAutoencoderViT
from models.masking import num_visible
from models.text_transformer import TextTransformer
from models.video_vit import Attention

VIDEO_POOLS = ("mean", "cls")
# What an MAE holds besides its encoder (dropped when only the encoder is trained).
DECODER_PARTS = ("decoder_embed", "mask_token", "decoder_cls_token", "decoder_pos_embed", "decoder_pos_embed_spatial",
                 "decoder_pos_embed_temporal", "decoder_pos_embed_class", "decoder_blocks", "decoder_norm", "decoder_pred")


class CrossRank(Protocol):
    """How the loss sees the other ranks: gather rows (with gradients) and average a scalar."""

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(every rank's x stacked along dim 0, the row of this rank's first entry)."""

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of x over ranks."""


class SingleProcess:
    """CrossRank of one process: the local batch is the global batch."""

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x itself, starting at row 0."""
        return x, 0

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """x itself."""
        return x


def contrastive_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     cross: CrossRank | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE of paired unit embeddings [n, E] against the global batch; (loss, metrics).

    Each rank scores its n videos against every rank's texts and its n texts against every video (the
    local rows of the global N x N logits, as OpenCLIP's local loss), so memory is n x N, not N x N. The
    gathered embeddings carry gradients back to the rank that made them, so after the backends average
    gradients over ranks they equal the gradient of the global loss. The returned value is the
    global loss (the mean over ranks of the local ones: what one process computes on the whole batch);
    its gradient is this rank's share.
    """
    cross = cross or SingleProcess()
    all_text, offset = cross.gather(text)
    all_video, _ = cross.gather(video)
    labels = torch.arange(video.shape[0], device=video.device) + offset
    v2t = logit_scale * video @ all_text.T  # [n, N]
    t2v = logit_scale * text @ all_video.T
    loss = global_value((F.cross_entropy(v2t, labels) + F.cross_entropy(t2v, labels)) / 2, cross)
    with torch.no_grad():
        acc = (t2v.argmax(dim=1) == labels).float().mean()
        metrics = {"contrastive": loss.detach(), "t2v_acc": cross.mean(acc),
                   "temperature": 1.0 / logit_scale.detach().float().reshape(())}
    return loss, metrics


def global_value(local: torch.Tensor, cross: CrossRank) -> torch.Tensor:
    """`local`'s gradient with the mean over ranks as its value: a per-rank mean becomes the global-batch mean
    (equal batches on every rank), so every rank logs what one process would on the whole batch."""
    return local + (cross.mean(local.detach()) - local.detach())


def videotext_loss(out: dict[str, torch.Tensor], cross: CrossRank | None = None, mae_loss_weight: float = 0.0
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective of a forward's outputs: InfoNCE (FLIP/MAC), plus mae_loss_weight x the MAE loss (SMAUG)."""
    cross = cross or SingleProcess()
    loss, metrics = contrastive_loss(out["video"], out["text"], out["logit_scale"], cross)
    if "mae_loss" in out:
        mae = global_value(out["mae_loss"], cross)
        metrics["mae_loss"] = mae.detach()
        loss = loss + mae_loss_weight * mae
    return loss, metrics


class ClsAttention(Attention):
    """Attention that also leaves the class token's attention over the tokens (mean over heads) in `sink`."""

    def __init__(self, dim: int, num_heads: int, sink: dict, qkv_bias: bool = True) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        self.sink = sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over x [B, N, D]; sink["cls_attn"] = softmax(q_cls k^T / sqrt(d)) averaged over heads [B, N]."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        # One query row: a small extra product beside the fused kernel, which returns no weights.
        scores = (q[:, :, :1] @ k.transpose(-2, -1)) * self.head_dim**-0.5  # [B, H, 1, N]
        self.sink["cls_attn"] = scores.float().softmax(dim=-1).mean(dim=1)[:, 0].detach()
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, D)))


def strip_decoder(mae: MaskedAutoencoderViT) -> MaskedAutoencoderViT:
    """Remove the MAE's decoder in place (an encoder-only tower: no unused parameters under DDP)."""
    for name in DECODER_PARTS:
        if hasattr(mae, name):
            delattr(mae, name)
    return mae


class VideoTextModel(nn.Module):
    """Video tower (an MAE-ST encoder, optionally with its decoder) + text tower + projections + temperature."""

    def __init__(self, video: MaskedAutoencoderViT, text: TextTransformer, embed_dim: int = 512,
                 video_pool: str = "mean", mae_decoder: bool = False, logit_scale_init: float = 1 / 0.07,
                 logit_scale_max: float = 100.0, sparsify_keep: float = 1.0, sparsify_layer: int = 0) -> None:
        super().__init__()
        if video_pool not in VIDEO_POOLS:
            raise ValueError(f"video pool must be one of {VIDEO_POOLS}, got {video_pool!r}")
        if video.mask_type in ("adaptive", "adaptive_detached", "amt"):
            raise ValueError("the video-text objectives mask with a fixed sampler (--mask_type random, tube, frame "
                             f"or cube), got {video.mask_type!r}: AdaMAE's sampler learns from reconstruction error "
                             "only and AMT's masking from the MAE's attention pass")
        if video_pool == "cls" and not video.cls_embed:
            raise ValueError("video_pool 'cls' needs the encoder's class token: build it with cls_embed=True")
        depth = len(video.blocks)
        if sparsify_keep < 1.0:
            if not video.cls_embed:
                raise ValueError("token sparsification ranks tokens by the class token's attention: cls_embed=True")
            if not 0 < sparsify_keep < 1 or not 1 <= sparsify_layer < depth:
                raise ValueError(f"sparsify_keep must be in (0, 1) and sparsify_layer in [1, {depth - 1}] (the block "
                                 f"after which tokens are dropped), got {sparsify_keep} and {sparsify_layer}")
        self.video = video if mae_decoder else strip_decoder(video)
        self.text = text
        self.mae_decoder, self.video_pool = mae_decoder, video_pool
        self.sparsify_keep, self.sparsify_layer = sparsify_keep, sparsify_layer
        self.embed_dim = embed_dim
        dim = video.patch_embed.proj.out_channels
        self.video_proj = nn.Linear(dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.video_proj.weight, std=dim**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text.width**-0.5)
        # A 1-element vector, not a scalar: FSDP2 shards every parameter along dim 0.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(logit_scale_init)))
        self.logit_scale_max = math.log(logit_scale_max)
        self._attn: dict = {}  # the class token's attention, left by the ranking block's ClsAttention
        if sparsify_keep < 1.0:
            block = video.blocks[sparsify_layer - 1]
            old = block.attn
            block.attn = ClsAttention(dim, old.num_heads, self._attn, qkv_bias=old.qkv.bias is not None)
            block.attn.load_state_dict(old.state_dict())  # same names and values: imports still match

    # ----------------------------------------------------------------- what util/ needs
    def shard_units(self) -> list[nn.Module]:
        """Units wrapped from outside (checkpointing, compile, FSDP2): video blocks, decoder blocks, text blocks."""
        units = list(self.video.blocks) + list(self.text.blocks)
        if self.mae_decoder:
            units += list(self.video.decoder_blocks)
        return units

    def no_weight_decay(self) -> set[str]:
        """Positional tables and tokens (as MAE and FLIP); the temperature is 1-D and never decayed."""
        return {"video." + n for n in self.video.no_weight_decay()} | {"text.pos_embed", "logit_scale"}

    def flops_per_clip(self, mask_ratio: float) -> dict[str, int]:
        """Analytic forward FLOPs per clip (with its caption) by part, plus "forward" and "train_step"."""
        v = self.video
        a = v.arch
        L = v.patch_embed.num_patches
        K = num_visible(L, mask_ratio) if mask_ratio > 0 else L
        prefix = int(v.cls_embed)
        parts = {"patch_embed": 2 * K * a["patch_dim"] * a["embed_dim"]}
        if self.sparsify_keep < 1.0:
            kept = self._num_kept(K)
            early, late = block_flops(K + prefix, a["embed_dim"], a["mlp"]), block_flops(kept + 1 + prefix,
                                                                                       a["embed_dim"], a["mlp"])
            parts["video_blocks"] = (self.sparsify_layer * sum(early.values())
                                     + (a["depth"] - self.sparsify_layer) * sum(late.values()))
        else:
            one = block_flops(K + prefix, a["embed_dim"], a["mlp"])
            parts["video_blocks"] = a["depth"] * sum(one.values())
            kept = K
        if self.mae_decoder and mask_ratio > 0:
            dec = block_flops(L + prefix, a["decoder_embed_dim"], a["decoder_mlp"])
            parts["decoder_embed"] = 2 * (kept + prefix) * a["embed_dim"] * a["decoder_embed_dim"]
            parts["decoder_blocks"] = a["decoder_depth"] * sum(dec.values())
            parts["pred_head"] = 2 * (L + prefix) * a["decoder_embed_dim"] * a["pred_dim"]
        parts["text_blocks"] = self.text.flops_per_caption()
        parts["projections"] = 2 * (a["embed_dim"] + self.text.width) * self.embed_dim
        return with_train_step(parts)

    def _num_kept(self, visible: int) -> int:
        return max(1, int(visible * self.sparsify_keep))

    # ----------------------------------------------------------------- forward
    def forward(self, clips: torch.Tensor, tokens: torch.Tensor, mask_ratio: float = 0.0,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Embed clips [B, C, T, H, W] and captions [B', N]; either may be empty (0 rows) for one tower only.

        Returns "logit_scale" (exp of the learned, clamped log-scale), "video" [B, E] and "text" [B', E]
        (unit, fp32) for the non-empty inputs, and with the MAE decoder and mask_ratio > 0 "mae_loss".
        Empty rather than None: DeepSpeed's wrapper casts the first argument.
        """
        out = {"logit_scale": self.logit_scale.clamp(0, self.logit_scale_max).exp()}
        if clips.shape[0]:
            latent, decoder_latent, mask, ids_restore = self._encode_video(clips, mask_ratio, noise)
            pooled = latent.mean(dim=1) if self.video_pool == "mean" else latent[:, 0]
            out["video"] = F.normalize(self.video_proj(pooled).float(), dim=-1)
            if self.mae_decoder and mask_ratio > 0:
                pred = self.video.forward_decoder(decoder_latent, ids_restore)
                errors = self.video.token_errors(clips, pred)
                out["mae_loss"] = (errors * mask).sum() / mask.sum()
        if tokens.shape[0]:
            out["text"] = F.normalize(self.text_proj(self.text(tokens)).float(), dim=-1)
        return out

    def _encode_video(self, clips: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder output, what the decoder gets, mask [B, L] 1 = hidden, ids_restore) for the visible tokens."""
        v = self.video
        if self.sparsify_keep >= 1.0:
            latent, m = v.forward_encoder(clips, mask_ratio, noise)
            return latent, latent, m.mask, m.ids_restore
        B = clips.shape[0]
        m = v.mask_strategy.sample(B, v.grid_size, mask_ratio, noise, device=clips.device)
        ids_keep, mask = m.ids_keep, m.mask
        x = v.patch_embed.embed(v.patch_embed.tubelets(clips, ids_keep))
        pos, cls_pos = v._pos_table(decoder=False)
        x = x + pos[0][ids_keep]
        cls = v.cls_token + (cls_pos if cls_pos is not None else 0)
        x = torch.cat([cls.expand(B, -1, -1), x], dim=1)
        for i, block in enumerate(v.blocks):
            x = block(x)
            if i + 1 == self.sparsify_layer:
                x, ids_keep = self._sparsify(x, ids_keep)
        latent = v.norm(x)
        # The decoder gets the class token and the kept tokens at their places; dropped visible tokens become
        # mask tokens like the hidden ones (the loss still covers only the hidden ones).
        L = mask.shape[1]
        kept = ids_keep.shape[1]
        order = torch.ones(B, L, device=clips.device).scatter(1, ids_keep, 0.0).argsort(dim=1, stable=True)
        return latent, latent[:, : 1 + kept], mask, order.argsort(dim=1)

    def _sparsify(self, x: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the class token and the most attended visible tokens (in token order), fuse the rest into one."""
        attn = self._attn.pop("cls_attn")[:, 1:]  # [B, K] class-token attention over the visible tokens
        K = attn.shape[1]
        kept = self._num_kept(K)
        top = attn.topk(kept, dim=1).indices
        top = top.gather(1, ids_keep.gather(1, top).argsort(dim=1))  # token order, so the decoder can place them
        drop = torch.ones_like(attn).scatter(1, top, 0.0)
        w = (attn * drop).unsqueeze(-1)
        tokens = x[:, 1:]
        fused = (tokens * w.to(tokens.dtype)).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-6).to(x.dtype)
        picked = tokens.gather(1, top.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], picked, fused], dim=1), ids_keep.gather(1, top)


def videotext_model(video_model: str, vocab_size: int, *, context_length: int = 32, text_width: int = 512,
                    text_depth: int = 12, text_heads: int = 8, text_causal: bool = True, text_pool: str = "eot",
                    embed_dim: int = 512, video_pool: str = "mean", temperature: float = 0.07,
                    mae_decoder: bool = False, sparsify_keep: float = 1.0, sparsify_layer: int = 0,
                    **video_kwargs) -> VideoTextModel:
    """The dual encoder: MAE `video_model` (by name, `video_kwargs` as for pretraining) + a text tower of this size."""
    video = create_model(video_model, **video_kwargs)
    text = TextTransformer(vocab_size, context_length, text_width, text_depth, text_heads, causal=text_causal,
                           pool=text_pool)
    return VideoTextModel(video, text, embed_dim, video_pool, mae_decoder, 1.0 / temperature,
                          sparsify_keep=sparsify_keep, sparsify_layer=sparsify_layer or max(1, len(video.blocks) // 3))
