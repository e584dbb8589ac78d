"""MAE-ST: a video masked autoencoder (Feichtenhofer et al., 2022).

The encoder sees only the visible tokens (10% at the default 90% masking), which is what makes
pretraining cheap; a light decoder (512-d, 4 blocks) gets the encoder output plus mask tokens and
regresses the (per-patch normalised) pixels of the hidden tokens.

Targets: the decoder predicts `pred_t_dim` frames (default 8 of 16), so a 2-frame token regresses
one frame. MAE-ST predicts 8 frames for 16-frame clips too; it halves the pixel head and the target
work with no measured loss in accuracy. Which frames is a convention (`target_frames`):
- "stride" (default): every (T / pred_t_dim)-th frame, [0, 2, ..., 14] for 16 -> 8, the first frame
  of each token. PySlowFast (`MASK.TIME_STRIDE_LOSS`), which trained the released MAE-ST weights.
- "linspace": `linspace(0, T - 1, pred_t_dim)` rounded down, [0, 2, ..., 12, 15] for 16 -> 8, as the
  mae_st repository's own pretraining code does (its last target is the clip's last frame).

Construction: `MaskedAutoencoderViT(patch, encoder, decoder, target, mask_strategy)` takes four small
config dataclasses (`PatchConfig`, `EncoderConfig`, `DecoderConfig`, `TargetConfig`) and a mask strategy
object (models/masking.py `MaskStrategy`); `build_mask_strategy(mask_type, ...)` builds one by its
`--mask_type` name. The factories (`mae_vit_*`, `create_model("mae_vit_large_patch16", **kwargs)`) and
`MaskedAutoencoderViT.from_kwargs` take the flat keyword arguments of flags and converted checkpoints.

Forward: `forward_encoder` returns the latent and the `Mask` the strategy drew; `forward` hands that
Mask on to the decoder and the loss, so no state of one forward is kept on the model (two forwards
of different batches can interleave, and wrappers see no hidden attributes). `model(clips, ratio,
noise)` returns (loss, pred, mask); `return_aux=True` adds a dict: "metrics" (detached scalars to
log, e.g. AdaMAE's sampler loss and entropy), and where the strategy has them "sampler_probs" [B, L]
(AdaMAE's per-token probabilities) and "thrown" [B, L] (AMT's thrown tokens).

Options (flat keyword names as `from_kwargs` takes them; see models/adamae.py, models/amt.py and
models/masking.py for the why):
- `mask_type="amt"`: AMT's attention-driven masking and throwing (models/amt.py): `throw_ratio` of
  the tokens are thrown (in neither encoder, decoder nor loss); `forward(..., attention=w)` takes the
  per-token attention weights [B, L] of the batch (uniform when None), `forward(clips,
  return_cls_attention=True)` returns the last block's normalised [CLS] attention over all tokens
  [B, L], and `amt_num_videos > 0` registers the per-video table `amt_attention` [N, t, h, w]
  (uint8, 255 = 1.0) that the training task refreshes. Like decoder masking, the returned `mask` is
  1 exactly where the loss is taken (the masked tokens).
- `mask_type="adaptive"`: AdaMAE's learned token sampler as published (`adaptive_detached`: the
  earlier variant, docs/adamae.md); the loss becomes
  recon + sampler_loss_weight * policy-gradient loss, and the aux metrics hold the sampler's
  entropy and loss.
- `init_values > 0`: layer scale (per-channel gains on each residual branch, VideoMAE/CaiT style) in
  the encoder blocks; `decoder_init_values` (default: the same) in the decoder blocks.
- `decoder_cls="encoder"`: the decoder's class token is `decoder_embed` of the encoder's class-token
  output, as PySlowFast's MAE decoder does, instead of a learned `decoder_cls_token` (MAE-ST code).
- `decoder_sep_pos_embed`: the decoder's position table form (default: as `sep_pos_embed`);
  PySlowFast's MAE decoder has one joint table (`MASK.DECODER_SEP_POS_EMBED: False`).
- `decoder_mask_ratio > 0` (training mode only): VideoMAE v2 decoder masking; the decoder gets the
  visible tokens plus mask tokens at the running-cell positions (`decoder_mask_type="run_cell"`, as
  v2: every kept cell position, visible or not) or at a running-cell subset of the hidden ones only
  (`"rotating_hidden"`, the earlier variant). Then `pred` is [B, L, P] with zeros for tokens the
  decoder did not predict, and the returned `mask` is 1 exactly where the loss is taken (hidden from
  the encoder and decoded). In eval mode the decoder rebuilds
  every hidden token, so validation losses and reconstruction images are those of the full model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from models.amt import AttentionMasking, amt_counts, normalize_cls_attention
from models.flops import block_flops, masked_autoencoder_flops, with_train_step
from models.mae_config import (
    DECODER_CLS,
    TARGET_FRAMES,
    DecoderConfig,
    EncoderConfig,
    PatchConfig,
    TargetConfig,
    build_mask_strategy,
)
from models.masking import (
    DECODER_MASK_TYPES,
    Mask,
    MaskStrategy,
    SamplerMasking,
    decoder_targets,
    num_visible,
    run_cell_hidden_per_cell,
    run_cell_targets,
)
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


class MaskedAutoencoderViT(nn.Module):
    """Video MAE with a ViT encoder over visible tokens and a light ViT decoder."""

    def __init__(
        self,
        patch: PatchConfig | None = None,
        encoder: EncoderConfig | None = None,
        decoder: DecoderConfig | None = None,
        target: TargetConfig | None = None,
        mask_strategy: MaskStrategy | None = None,
        trunc_init: bool = False,
    ) -> None:
        super().__init__()
        patch, enc = patch or PatchConfig(), encoder or EncoderConfig()
        dec, target = decoder or DecoderConfig(), target or TargetConfig()
        mask_strategy = mask_strategy or SamplerMasking("random")
        num_frames, patch_size, in_chans, cls_embed = patch.num_frames, patch.patch_size, patch.in_chans, enc.cls_embed
        pred_t_dim = num_frames // 2 if target.pred_t_dim is None else target.pred_t_dim
        if target.frames not in TARGET_FRAMES:
            raise ValueError(f"target_frames must be one of {TARGET_FRAMES}, got {target.frames!r}")
        if dec.cls not in DECODER_CLS:
            raise ValueError(f"decoder_cls must be one of {DECODER_CLS}, got {dec.cls!r}")
        if dec.cls == "encoder" and not cls_embed:
            raise ValueError("decoder_cls='encoder' takes the decoder's class token from the encoder's: set cls_embed=True")
        decoder_init_values = enc.init_values if dec.init_values is None else dec.init_values
        decoder_sep_pos_embed = enc.sep_pos_embed if dec.sep_pos_embed is None else dec.sep_pos_embed
        self.patch_embed = PatchEmbed3D(patch.img_size, patch_size, in_chans, enc.embed_dim, num_frames,
                                        patch.t_patch_size)
        t, h, w = self.grid_size = self.patch_embed.grid_size
        num_patches = t * h * w
        if num_frames % pred_t_dim or pred_t_dim % t:
            raise ValueError(
                f"pred_t_dim {pred_t_dim} must divide num_frames {num_frames} and be a multiple of the "
                f"{t} temporal token positions (num_frames / t_patch_size)"
            )
        self.in_chans, self.patch_size, self.num_frames = in_chans, patch_size, num_frames
        self.pred_t_dim, self.target_frames_rule = pred_t_dim, target.frames
        # Frame indices the decoder regresses, fixed by the convention (see the module docstring).
        if target.frames == "stride":
            ids = list(range(0, num_frames, num_frames // pred_t_dim))
        else:
            ids = torch.linspace(0, num_frames - 1, pred_t_dim).long().tolist()
        self.target_frame_ids: tuple[int, ...] = tuple(ids)
        self.t_pred_patch_size = pred_t_dim // t
        self.norm_pix_loss, self.cls_embed, self.sep_pos_embed = target.norm_pix_loss, cls_embed, enc.sep_pos_embed
        self.decoder_cls, self.decoder_sep_pos_embed = dec.cls, decoder_sep_pos_embed
        self.decoder_num_heads = dec.num_heads
        self.init_values, self.decoder_init_values = enc.init_values, decoder_init_values
        mask_strategy.check(num_patches, cls_embed, dec.mask_ratio)
        self.mask_type = mask_strategy.name
        self.decoder_mask_ratio = dec.mask_ratio
        if not 0.0 <= dec.mask_ratio < 1.0:
            raise ValueError(f"decoder_mask_ratio must be in [0, 1), got {dec.mask_ratio}")
        if dec.mask_type not in DECODER_MASK_TYPES:
            raise ValueError(f"decoder_mask_type must be one of {DECODER_MASK_TYPES}, got {dec.mask_type!r}")
        if dec.mask_ratio > 0 and dec.mask_type == "run_cell":
            run_cell_hidden_per_cell(dec.mask_ratio)  # range check now, not at the first step
        self.decoder_mask_type = dec.mask_type
        embed_dim, mlp_ratio, norm_layer = enc.embed_dim, enc.mlp_ratio, enc.norm_layer
        mlp = int(embed_dim * mlp_ratio)
        # Sizes by name, for FLOP counts that must not read (possibly sharded, empty) parameters.
        self.arch = dict(embed_dim=embed_dim, depth=enc.depth, mlp=mlp, decoder_embed_dim=dec.embed_dim,
                         decoder_depth=dec.depth, decoder_mlp=int(dec.embed_dim * mlp_ratio),
                         patch_dim=in_chans * patch.t_patch_size * patch_size**2,
                         pred_dim=self.t_pred_patch_size * patch_size**2 * in_chans)

        # Encoder
        if cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        add_pos_embed(self, "", self.grid_size, embed_dim, cls_embed, enc.sep_pos_embed)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, enc.num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                   init_values=enc.init_values)
             for _ in range(enc.depth)]
        )
        self.norm = norm_layer(embed_dim)
        if isinstance(mask_strategy, nn.Module):
            # A strategy with weights (AdaMAE's network) is a submodule under the name its checkpoints use,
            # registered here so the parameter order (and so the seeded init) stays that of older versions.
            self.adaptive_sampler = mask_strategy
        else:
            self._mask_strategy = mask_strategy
        # How targets are normalised follows the strategy's recipe (AdaMAE's loop: per channel of each patch).
        self.target_norm = mask_strategy.target_norm
        if isinstance(mask_strategy, AttentionMasking) and mask_strategy.num_videos > 0:
            # One byte per token and video (K400, ViT 16x224: 240k x 1568 = 376 MB), identical on every
            # rank, saved with the model. 255 = 1.0: uniform until the first refresh (random masking
            # and throwing). DDP would broadcast every buffer at every forward: it is told to skip it.
            self.register_buffer("amt_attention",
                                 torch.full((mask_strategy.num_videos, t, h, w), 255, dtype=torch.uint8))
            self._ddp_params_and_buffers_to_ignore = ["amt_attention"]

        # Decoder
        self.decoder_embed = nn.Linear(embed_dim, dec.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.embed_dim))
        if cls_embed and dec.cls == "learned":
            self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, dec.embed_dim))
        add_pos_embed(self, "decoder_", self.grid_size, dec.embed_dim, cls_embed, decoder_sep_pos_embed)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(dec.embed_dim, dec.num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                      init_values=decoder_init_values)
                for _ in range(dec.depth)
            ]
        )
        self.decoder_norm = norm_layer(dec.embed_dim)
        self.decoder_pred = nn.Linear(dec.embed_dim, self.t_pred_patch_size * patch_size**2 * in_chans)
        self._init_weights(trunc_init)

    @classmethod
    def from_kwargs(
        cls,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 4,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[..., nn.Module] = LayerNorm6,
        norm_pix_loss: bool = True,
        num_frames: int = 16,
        t_patch_size: int = 2,
        pred_t_dim: int | None = None,
        cls_embed: bool = True,
        sep_pos_embed: bool = True,
        trunc_init: bool = False,
        mask_type: str = "random",
        sampler_loss_weight: float = 1.0e-4,
        decoder_mask_ratio: float = 0.0,
        decoder_mask_type: str = "run_cell",
        init_values: float = 0.0,
        decoder_init_values: float | None = None,
        decoder_cls: str = "learned",
        decoder_sep_pos_embed: bool | None = None,
        target_frames: str = "stride",
        throw_ratio: float = 0.0,
        amt_num_videos: int = 0,
    ) -> MaskedAutoencoderViT:
        """Build from the flat keyword arguments that flags, factories and checkpoint options use."""
        patch = PatchConfig(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_frames=num_frames,
                            t_patch_size=t_patch_size)
        t, h, w = patch.grid_size
        strategy = build_mask_strategy(
            mask_type, embed_dim=embed_dim, num_tokens=t * h * w, num_heads=num_heads, mlp_ratio=mlp_ratio,
            norm_layer=norm_layer, sampler_loss_weight=sampler_loss_weight, throw_ratio=throw_ratio,
            amt_num_videos=amt_num_videos)
        return cls(
            patch,
            EncoderConfig(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                          norm_layer=norm_layer, cls_embed=cls_embed, sep_pos_embed=sep_pos_embed,
                          init_values=init_values),
            DecoderConfig(embed_dim=decoder_embed_dim, depth=decoder_depth, num_heads=decoder_num_heads,
                          init_values=decoder_init_values, cls=decoder_cls, sep_pos_embed=decoder_sep_pos_embed,
                          mask_ratio=decoder_mask_ratio, mask_type=decoder_mask_type),
            TargetConfig(pred_t_dim=pred_t_dim, frames=target_frames, norm_pix_loss=norm_pix_loss),
            strategy,
            trunc_init,
        )

    @property
    def mask_strategy(self) -> MaskStrategy:
        """The strategy the model was built with (a submodule when it has weights)."""
        strategy = self._modules.get("adaptive_sampler")
        return strategy if strategy is not None else self._mask_strategy

    def _init_weights(self, trunc_init: bool) -> None:
        for name, p in self.named_parameters():
            if "pos_embed" in name:
                nn.init.trunc_normal_(p, std=0.02)
            elif name.endswith(("cls_token", "mask_token")):
                (nn.init.trunc_normal_ if trunc_init else nn.init.normal_)(p, std=0.02)
        self.apply(partial(init_weights, trunc_init=trunc_init))
        self.mask_strategy.finish_init()

    # ----------------------------------------------------------------- helpers
    def shard_units(self) -> list[nn.Module]:
        """The units that parallelism wraps from outside (activation checkpointing, compile, FSDP2): every block."""
        return list(self.blocks) + list(self.decoder_blocks) + self.mask_strategy.shard_units()

    def flops_per_clip(self, mask_ratio: float) -> dict[str, int]:
        """Analytic FLOPs per clip of a training step at `mask_ratio`, from the configuration.

        Counts the training-mode model: decoder masking shrinks the decoder's tokens, and AdaMAE's
        sampler adds one block over every patch (which then must all be embedded).
        """
        a = self.arch
        num_patches = self.patch_embed.num_patches
        visible = num_visible(num_patches, mask_ratio)
        decoder_patches = num_patches
        if self.decoder_mask_ratio > 0 and self.decoder_mask_type == "run_cell":  # mask tokens at every kept slot
            decoder_patches = visible + num_patches * (4 - run_cell_hidden_per_cell(self.decoder_mask_ratio)) // 4
        elif self.decoder_mask_ratio > 0:
            decoder_patches = visible + max(1, int((num_patches - visible) * (1 - self.decoder_mask_ratio)))
        strategy = self.mask_strategy
        adaptive = strategy.needs_tokens
        pred_tokens = None
        if isinstance(strategy, AttentionMasking):
            # Thrown tokens cost nothing: the decoder sees the visible and the masked ones, the head only the masked.
            visible, masked, _ = amt_counts(num_patches, mask_ratio, strategy.throw_ratio)
            decoder_patches, pred_tokens = visible + masked, masked
        parts = masked_autoencoder_flops(
            num_patches=num_patches, num_visible=visible, num_decoder_patches=decoder_patches,
            # forward_encoder embeds only the visible tubelets, unless the sampler needs them all
            num_embed_tokens=num_patches if adaptive else visible,
            patch_dim=a["patch_dim"], enc_dim=a["embed_dim"], enc_depth=a["depth"], enc_mlp=a["mlp"],
            dec_dim=a["decoder_embed_dim"], dec_depth=a["decoder_depth"], dec_mlp=a["decoder_mlp"],
            pred_dim=a["pred_dim"], num_prefix=int(self.cls_embed), num_pred_tokens=pred_tokens,
        )
        if adaptive:
            one = block_flops(num_patches, a["embed_dim"], a["mlp"])
            parts.pop("forward"), parts.pop("train_step")
            parts["sampler"] = one["linear"] + one["attention"] + 2 * num_patches * a["embed_dim"]
            parts = with_train_step(parts)
        return parts

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (tokens and positional embeddings)."""
        return {n for n, _ in self.named_parameters() if "pos_embed" in n or n.endswith(("cls_token", "mask_token"))}

    def layer_id(self, name: str) -> int:
        """Layer index of a parameter for layer-wise lr decay (decoder counts as the last layer)."""
        return layer_id_for(name, len(self.blocks))

    @property
    def num_layers(self) -> int:
        """Number of layer ids (embeddings + blocks + rest)."""
        return len(self.blocks) + 2

    def target_frames(self, clips: torch.Tensor) -> torch.Tensor:
        """Frames the decoder regresses, [B, C, pred_t_dim, H, W], by the `target_frames` convention."""
        if self.target_frames_rule == "stride":
            return clips[:, :, :: self.num_frames // self.pred_t_dim]  # a view: no copy
        # Slices by Python ints: an index tensor made from the list would be a host->device copy per step.
        return torch.cat([clips[:, :, i : i + 1] for i in self.target_frame_ids], dim=2)

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, C, T_pred, H, W] -> [B, L, u * p * p * C] in token order (u frames per token)."""
        B, C, T, H, W = frames.shape
        p, u = self.patch_size, self.t_pred_patch_size
        t, h, w = T // u, H // p, W // p
        x = frames.reshape(B, C, t, u, h, p, w, p)
        x = torch.einsum("bctuhpwq->bthwupqc", x)
        return x.reshape(B, t * h * w, u * p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, u * p * p * C] -> [B, C, T_pred, H, W] (inverse of patchify)."""
        B = x.shape[0]
        p, u, C = self.patch_size, self.t_pred_patch_size, self.in_chans
        t, h, w = self.grid_size
        x = x.reshape(B, t, h, w, u, p, p, C)
        x = torch.einsum("bthwupqc->bctuhpwq", x)
        return x.reshape(B, C, t * u, h * p, w * p)

    def _pos_table(self, decoder: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(patch position table [1, L, D], class position [1, 1, D] or None) of encoder or decoder."""
        if decoder:
            return pos_tables(self, "decoder_", self.cls_embed, self.decoder_sep_pos_embed)
        return pos_tables(self, "", self.cls_embed, self.sep_pos_embed)

    def _decoder_cls(self, embedded_cls: torch.Tensor) -> torch.Tensor:
        """The decoder's class token [B, 1, Dd]: learned, or the embedded encoder class token (PySlowFast)."""
        if self.decoder_cls == "encoder":
            return embedded_cls
        return self.decoder_cls_token.expand(embedded_cls.shape[0], -1, -1)

    # ----------------------------------------------------------------- forward
    def forward_encoder(
        self, clips: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Mask]:
        """Embed, keep the visible tokens, encode: (latent [B, (1+)K, D], the Mask the strategy drew)."""
        B = clips.shape[0]
        strategy = self.mask_strategy
        if strategy.needs_tokens:
            # The sampler reads every token's embedding; the encoder then takes its visible ones.
            tokens = self.patch_embed(clips)
            m = strategy.sample(B, self.grid_size, mask_ratio, noise, tokens=tokens, device=clips.device)
            x = torch.gather(tokens, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        else:
            m = strategy.sample(B, self.grid_size, mask_ratio, noise, attention=attention, device=clips.device)
            # Embedding is per token, so embed only the visible tubelets: 10x less work at 90% masking.
            x = self.patch_embed.embed(self.patch_embed.tubelets(clips, m.ids_keep))
        pos, cls_pos = self._pos_table(decoder=False)
        x = x + pos[0][m.ids_keep]
        if self.cls_embed:
            cls = self.cls_token + (cls_pos if cls_pos is not None else 0)
            x = torch.cat([cls.expand(B, -1, -1), x], dim=1)
        x = run_blocks(self.blocks, x)
        return self.norm(x), m

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Fill in mask tokens, un-shuffle, decode: predictions for every token [B, L, u*p*p*C]."""
        x = self.decoder_embed(latent)
        B, L = ids_restore.shape
        D = x.shape[-1]
        if self.cls_embed:
            cls, x = x[:, :1], x[:, 1:]
        mask_tokens = self.mask_token.expand(B, L - x.shape[1], -1)
        x = torch.cat([x, mask_tokens], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
        pos, cls_pos = self._pos_table(decoder=True)
        x = x + pos
        if self.cls_embed:
            x = torch.cat([self._decoder_cls(cls) + cls_pos, x], dim=1)
        x = run_blocks(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:] if self.cls_embed else x

    def forward_decoder_subset(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, ids_target: torch.Tensor
    ) -> torch.Tensor:
        """Decode the visible tokens plus mask tokens at `ids_target` [B, M] only: pred [B, L, P], zeros elsewhere."""
        x = self.decoder_embed(latent)
        B, L = ids_restore.shape
        if self.cls_embed:
            cls, x = x[:, :1], x[:, 1:]
        K, M = x.shape[1], ids_target.shape[1]
        ids_keep = ids_restore.argsort(dim=1)[:, :K]  # the encoder's token order
        pos, cls_pos = self._pos_table(decoder=True)
        # Attention is order-free given the positions: [visible..., targets...] needs no un-shuffle.
        x = torch.cat([x, self.mask_token.expand(B, M, -1)], dim=1) + pos[0][torch.cat([ids_keep, ids_target], 1)]
        if self.cls_embed:
            x = torch.cat([self._decoder_cls(cls) + cls_pos, x], dim=1)
        x = run_blocks(self.decoder_blocks, x)
        out = self.decoder_pred(self.decoder_norm(x[:, -M:]))  # no head work for dropped or visible tokens
        pred = out.new_zeros(B, L, out.shape[-1])
        return pred.scatter(1, ids_target.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out)

    def token_errors(self, clips: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Per-token mean squared error [B, L] against the (per-patch normalised) target pixels."""
        target = self.patchify(self.target_frames(clips)).float()
        if self.norm_pix_loss and self.target_norm == "channel":
            # AdaMAE / VideoMAE: each channel of a patch over its pixels, (x - mean) / (unbiased std + 1e-6).
            per = target.unflatten(-1, (-1, self.in_chans))
            per = (per - per.mean(dim=-2, keepdim=True)) / (per.var(dim=-2, keepdim=True).sqrt() + 1.0e-6)
            target = per.flatten(-2)
        elif self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return ((pred.float() - target) ** 2).mean(dim=-1)

    def forward_loss(self, clips: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over hidden tokens only (normalised per patch when norm_pix_loss)."""
        return (self.token_errors(clips, pred) * mask).sum() / mask.sum()

    def cls_attention_map(self, clips: torch.Tensor) -> torch.Tensor:
        """AMT's attention: the last block's [CLS] attention over every token of unmasked clips, normalised [B, L]."""
        x = self.patch_embed(clips)
        pos, cls_pos = self._pos_table(decoder=False)
        x = x + pos
        if self.cls_embed:
            x = torch.cat([(self.cls_token + cls_pos).expand(x.shape[0], -1, -1), x], dim=1)
        x = run_blocks(self.blocks[:-1], x)
        return normalize_cls_attention(self.blocks[-1](x, cls_attention=True), int(self.cls_embed))

    def decode(self, latent: torch.Tensor, m: Mask, noise: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode what the mask and the decoder masking ask for: (pred [B, L, P], loss mask [B, L], 1 = in the loss)."""
        mask, ids_restore = m.mask, m.ids_restore
        if m.ids_masked is not None:  # the strategy names the tokens to rebuild (AMT: its masked ones, not the thrown)
            pred = self.forward_decoder_subset(latent, ids_restore, m.ids_masked)
            return pred, torch.zeros_like(mask).scatter(1, m.ids_masked, 1.0)
        if self.decoder_mask_ratio > 0 and self.training and self.decoder_mask_type == "run_cell":
            # VideoMAE v2: mask tokens at every running-cell position, visible ones included; the loss
            # counts the positions both decoded and hidden from the encoder.
            ids_target = run_cell_targets(mask.shape[0], self.grid_size, self.decoder_mask_ratio, noise, mask.device)
            pred = self.forward_decoder_subset(latent, ids_restore, ids_target)
            return pred, mask * torch.zeros_like(mask).scatter(1, ids_target, 1.0)
        if self.decoder_mask_ratio > 0 and self.training:
            num_hidden = ids_restore.shape[1] - latent.shape[1] + int(self.cls_embed)
            ids_target = decoder_targets(mask, self.grid_size, self.decoder_mask_ratio, noise, num_hidden)
            pred = self.forward_decoder_subset(latent, ids_restore, ids_target)
            return pred, torch.zeros_like(mask).scatter(1, ids_target, 1.0)
        return self.forward_decoder(latent, ids_restore), mask

    def forward(
        self, clips: torch.Tensor, mask_ratio: float = 0.9, noise: torch.Tensor | None = None,
        attention: torch.Tensor | None = None, return_cls_attention: bool = False, return_aux: bool = False,
    ) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """Masked reconstruction of clips [B, C, T, H, W]: (loss, pred [B, L, u*p*p*C], mask [B, L]).

        `attention` [B, L]: AMT's per-token weights. `return_cls_attention`: only AMT's attention map
        [B, L] (`cls_attention_map`), through `forward` so that sharded wrappers gather the parameters.
        `return_aux`: (loss, pred, mask, aux) with aux "metrics" (detached scalars to log) and, where the
        strategy has them, "sampler_probs" and "thrown" [B, L] (see the module docstring).
        """
        if return_cls_attention:
            return self.cls_attention_map(clips)
        latent, m = self.forward_encoder(clips, mask_ratio, noise, attention)
        pred, mask = self.decode(latent, m, noise)
        errors = self.token_errors(clips, pred)
        loss = (errors * mask).sum() / mask.sum()
        extra, metrics = self.mask_strategy.extra_loss(m, errors, mask)
        if extra is not None:
            loss = loss + extra
        # `pred` is often a view (the class token sliced off, or autocast's linear over 3-D input): a wrapper
        # that hooks outputs for backward (FSDP2) loses its hook if a caller then edits a view in place. A copy
        # of the predictions costs far less than the step; the values are the same.
        if pred._base is not None:
            pred = pred.clone()
        if not return_aux:
            return loss, pred, mask
        aux: dict = {"metrics": metrics}
        if m.log_probs is not None:
            aux["sampler_probs"] = m.log_probs.detach().exp()
        if m.thrown is not None:
            aux["thrown"] = m.thrown
        return loss, pred, mask, aux


# Encoder sizes: (embed_dim, depth, num_heads). Decoder defaults follow MAE-ST: 512-d, 4 blocks, 16 heads.
ENCODER_SIZES = {
    "micro": (128, 4, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "giant": (1408, 40, 16),  # VideoMAE v2 / "Scaling Vision Transformers" ViT-g: with MLP ratio 48/11
}
# ViT-g's MLP is 6144 wide (1408 x 48 / 11); VideoMAE v2 gives its decoder blocks the same ratio.
GIANT_MLP_RATIO = 48 / 11


def _mae(size: str, patch_size: int, **kwargs) -> MaskedAutoencoderViT:
    dim, depth, heads = ENCODER_SIZES[size]
    cfg = dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch_size)
    cfg.update(kwargs)
    return MaskedAutoencoderViT.from_kwargs(**cfg)


def mae_vit_micro_patch8(**kwargs) -> MaskedAutoencoderViT:
    """128-d, 4-block encoder on 8x8 patches with a 128-d, 2-block decoder: the CPU demo and tests."""
    kwargs = {"decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4, **kwargs}
    return _mae("micro", 8, **kwargs)


def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-Ti/16 encoder (192-d, 12 blocks)."""
    return _mae("tiny", 16, **kwargs)


def mae_vit_small_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-S/16 encoder (384-d, 12 blocks)."""
    return _mae("small", 16, **kwargs)


def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-B/16 encoder (768-d, 12 blocks)."""
    return _mae("base", 16, **kwargs)


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-L/16 encoder (1024-d, 24 blocks)."""
    return _mae("large", 16, **kwargs)


def mae_vit_huge_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-H/16 encoder (1280-d, 32 blocks): the released MAE-ST video ViT-H uses patch 16."""
    return _mae("huge", 16, **kwargs)


def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-H/14 encoder (1280-d, 32 blocks), the image-MAE patch size."""
    return _mae("huge", 14, **kwargs)


def mae_vit_giant_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-g/14 encoder (1408-d, 40 blocks, MLP 48/11) with VideoMAE v2's decoder (512-d, 4 blocks, 8 heads).

    VideoMAE v2's `pretrain_videomae_giant_patch14_224`; its exact layout (fixed joint sin-cos table, no
    class token, both frames of a tubelet regressed) is `cls_embed=False, sep_pos_embed=False, pred_t_dim=16`.
    """
    kwargs = {"mlp_ratio": GIANT_MLP_RATIO, "decoder_num_heads": 8, **kwargs}
    return _mae("giant", 14, **kwargs)
