"""rho-BYOL and rho-MoCo (Feichtenhofer, Fan, Xiong, Girshick, He, 2021) with a video ViT encoder.

The positives are rho clips of one video cut at different times (the data side decodes a video once
and cuts them: `repeat_aug` = rho, consecutive in the batch). Every clip is a query for the other
rho - 1 clips' targets, as in the study's SlowFast code (`CONTRASTIVE.SEQUENTIAL`):
- rho-BYOL: loss = mean over videos and ordered pairs (i != j) of 2 - 2 cos(q_i, z'_j), q_i the
  online predictor's output for clip i, z'_j the momentum projection of clip j (no gradient).
- rho-MoCo: for each pair (i, j != i) the logits [q_i . k_j, q_i . queue] / tau (unit vectors) and
  cross-entropy with the positive first, averaged; the queue holds earlier momentum keys (all rho
  clips of every video enqueued, `MOCO_MULTI_VIEW_QUEUE`), negatives only from the queue (MoCo v2).

Parts: the online encoder (its parameters at the top level, under the names of our MAE encoder and
classifier, so `models.convert.load_pretrained` imports it for fine-tuning and linear probing), the
projector (and for BYOL the predictor) MLPs with BatchNorm, and their momentum copies
(`momentum_encoder`, `momentum_projector`: parameters without gradient, sharded like the online ones,
updated by the training task after every optimiser step: `momentum_pairs`). The queue and its
pointer are buffers, so checkpoints hold them. Cross-rank pieces (BatchNorm over the global batch,
gathering keys, updating sharded parameters) are applied from outside (`util/cross_rank.py`).

The clip feature is the classifier's: the final norm of the mean patch token (VisionTransformer with
`global_pool`, whose `fc_norm` this norm becomes on import), so a linear probe sees exactly it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models.flops import TRAIN_STEP_FACTOR, vit_flops
from models.video_vit import (
    Block,
    LayerNorm6,
    PatchEmbed3D,
    add_pos_embed,
    init_weights,
    pos_tables,
    run_blocks,
)

OBJECTIVES = ("byol", "moco")


class ClipEncoder(nn.Module):
    """Video ViT over every token of a clip -> feature [B, D] = norm(mean of the patch tokens)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, num_frames: int = 16,
                 t_patch_size: int = 2, cls_embed: bool = True, sep_pos_embed: bool = True,
                 init_values: float = 0.0) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed3D(img_size, patch_size, in_chans, embed_dim, num_frames, t_patch_size)
        self.cls_embed, self.sep_pos_embed, self.embed_dim = cls_embed, sep_pos_embed, embed_dim
        if cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        add_pos_embed(self, "", self.patch_embed.grid_size, embed_dim, cls_embed, sep_pos_embed)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm6,
                                           init_values=init_values) for _ in range(depth)])
        self.norm = LayerNorm6(embed_dim)
        self.arch = dict(dim=embed_dim, depth=depth, mlp=int(embed_dim * mlp_ratio),
                         patch_dim=in_chans * t_patch_size * patch_size**2)
        for name, p in self.named_parameters():
            if "pos_embed" in name or name.endswith("cls_token"):
                nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_weights)

    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """Clip features [B, D] of clips [B, C, T, H, W]."""
        x = self.patch_embed(clips)
        pos, cls_pos = pos_tables(self, "", self.cls_embed, self.sep_pos_embed)
        x = x + pos
        if self.cls_embed:
            x = torch.cat([(self.cls_token + cls_pos).expand(x.shape[0], -1, -1), x], dim=1)
        x = run_blocks(self.blocks, x)
        return self.norm((x[:, 1:] if self.cls_embed else x).mean(dim=1))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Clip features [B, D]."""
        return self.encode(clips)

    def encoder_flops(self) -> int:
        """Forward FLOPs per clip of the encoder, from the configuration."""
        a = self.arch
        return vit_flops(num_patches=self.patch_embed.num_patches, patch_dim=a["patch_dim"], dim=a["dim"],
                         depth=a["depth"], mlp=a["mlp"], num_prefix=int(self.cls_embed), num_classes=0)["forward"]


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """Entries (i, j != i) of square matrices x [..., n, n] -> [..., n * (n - 1)], by views (no data-dependent indexing)."""
    n = x.shape[-1]
    return x.flatten(-2)[..., 1:].unflatten(-1, (n - 1, n + 1))[..., :-1].flatten(-2)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, out_bias: bool = True) -> nn.Sequential:
    """[Linear -> BatchNorm1d -> ReLU] x (layers - 1) -> Linear: BYOL's projector and predictor, MoCo v2's head with BN.

    No bias where a BatchNorm follows: its gradient is zero (the batch mean removes it again), and AdamW
    would step it on rounding noise alone (`out_bias=False` for a head that feeds such a layer).
    """
    parts: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        parts += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    parts.append(nn.Linear(dim, out_dim, bias=out_bias))
    return nn.Sequential(*parts)


def mlp_flops(head: nn.Sequential) -> int:
    """Forward FLOPs per sample of an MLP's linears, from their shapes' configuration (in/out features)."""
    return sum(2 * m.in_features * m.out_features for m in head if isinstance(m, nn.Linear))


class RhoModel(ClipEncoder):
    """rho-BYOL / rho-MoCo: `forward(clips [B * rho, ...])` -> (loss, {metric: scalar}, keys to enqueue or None)."""

    def __init__(self, objective: str = "byol", rho: int = 2, proj_dim: int = 256, proj_hidden_dim: int = 4096,
                 proj_layers: int = 2, pred_hidden_dim: int = 4096, temperature: float = 0.1,
                 queue_size: int = 65536, **encoder) -> None:
        super().__init__(**encoder)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if rho < 2:
            raise ValueError(f"rho must be >= 2 (the positives are the other clips of the video), got {rho}")
        self.objective, self.rho, self.temperature = objective, rho, temperature
        self.queue_size, self.proj_dim = queue_size, proj_dim
        # BYOL's online projection feeds only the predictor, whose first layer is followed by a BatchNorm.
        self.projector = mlp(self.embed_dim, proj_hidden_dim, proj_dim, proj_layers, out_bias=objective == "moco")
        if objective == "byol":
            self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim, 2)
        # Likewise the final norm's bias: a constant shift the projector's BatchNorm removes. Frozen at 0 (the
        # classifier imports it as fc_norm.bias), instead of a random walk on rounding noise.
        self.norm.bias.requires_grad = False
        for head in (self.projector, getattr(self, "predictor", None)):
            if head is not None:
                head.apply(init_weights)  # xavier linears, like the encoder's
        self.momentum_encoder = ClipEncoder(**encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad = False
        self.copy_to_momentum()
        if objective == "moco":
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            # Identical on every rank by construction: DDP need not broadcast it at every forward.
            self._ddp_params_and_buffers_to_ignore = ["queue", "queue_ptr"]

    # ----------------------------------------------------------------- for the training task
    def momentum_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(online, momentum) parameter pairs, in the same order on every rank."""
        online = [p for n, p in self.named_parameters() if not n.startswith(("momentum_", "predictor."))]
        target = [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]
        if len(online) != len(target) or any(a.shape != b.shape for a, b in zip(online, target, strict=True)):
            raise RuntimeError("the momentum copies do not mirror the online encoder and projector")
        return list(zip(online, target, strict=True))

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        """Momentum copies := online weights (a fresh run, or after loading initial weights)."""
        for online, target in self.momentum_pairs():
            target.copy_(online)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys [N, d] (of every rank, in rank order) into the queue ring after the pointer."""
        size = self.queue.shape[0]
        keys = keys[-size:]  # a batch longer than the queue keeps its newest keys
        slots = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue.index_copy_(0, slots, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def shard_units(self) -> list[nn.Module]:
        """Blocks of the online and the momentum encoder (wrapped from outside: checkpointing, compile, FSDP2)."""
        return list(self.blocks) + list(self.momentum_encoder.blocks)

    def no_weight_decay(self) -> set[str]:
        """Positional embeddings and the class token."""
        return {n for n, _ in self.named_parameters() if "pos_embed" in n or n.endswith("cls_token")}

    def flops_per_clip(self) -> dict[str, int]:
        """FLOPs per clip: online encoder and heads forward + backward, momentum encoder and projector forward."""
        heads = mlp_flops(self.projector) + (mlp_flops(self.predictor) if self.objective == "byol" else 0)
        parts = {"online": self.encoder_flops() + heads, "momentum": self.encoder_flops() + mlp_flops(self.projector),
                 # MoCo: each query against the queue (its backward reaches the query only: the queue has no gradient)
                 "negatives": 2 * self.queue_size * self.proj_dim if self.objective == "moco" else 0}
        parts["forward"] = sum(parts.values())
        parts["train_step"] = TRAIN_STEP_FACTOR * parts["online"] + parts["momentum"] + 2 * parts["negatives"]
        return parts

    # ----------------------------------------------------------------- forward
    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """Loss of clips [B * rho, C, T, H, W] (rho consecutive clips per video), metrics, momentum keys or None."""
        n = clips.shape[0]
        if n % self.rho:
            raise ValueError(f"{n} clips are not whole groups of rho = {self.rho} clips per video")
        b = n // self.rho
        z = self.projector(self.encode(clips))
        with torch.no_grad():
            keys = F.normalize(self.momentum_projector(self.momentum_encoder(clips)).float(), dim=-1)
        keys = keys.view(b, self.rho, -1)
        if self.objective == "byol":
            q = F.normalize(self.predictor(z).float(), dim=-1).view(b, self.rho, -1)
            cos = off_diagonal(torch.einsum("bid,bjd->bij", q, keys))  # pairs (i, j != i): [b, rho * (rho - 1)]
            return (2 - 2 * cos).mean(), {"pos_cos": cos.detach().mean()}, None
        q = F.normalize(z.float(), dim=-1).view(b, self.rho, -1)
        pos = torch.einsum("bid,bjd->bij", q, keys) / self.temperature  # [b, rho, rho]
        neg = torch.logsumexp(q @ self.queue.detach().float().t() / self.temperature, dim=-1)  # [b, rho]
        # -log softmax of the positive among [positive, queue]: -pos + log(exp(pos) + sum exp(neg)).
        loss = off_diagonal(torch.logaddexp(pos, neg[:, :, None]) - pos).mean()
        return loss, {"pos_cos": off_diagonal(pos.detach() * self.temperature).mean()}, keys.reshape(n, -1)


# (embed_dim, depth, num_heads, patch_size), as the MAE and classifier factories of the same names.
ENCODER_SIZES = {"micro": (128, 4, 4, 8), "small": (384, 12, 6, 16), "base": (768, 12, 12, 16),
                 "large": (1024, 24, 16, 16)}


def _rho(size: str, **kwargs) -> RhoModel:
    dim, depth, heads, patch = ENCODER_SIZES[size]
    cfg = dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch)
    cfg.update(kwargs)
    return RhoModel(**cfg)


def rho_vit_micro_patch8(**kwargs) -> RhoModel:
    """128-d, 4-block encoder on 8x8 patches (CPU demos and tests); fine-tune with vit_micro_patch8."""
    return _rho("micro", **kwargs)


def rho_vit_small_patch16(**kwargs) -> RhoModel:
    """ViT-S/16 encoder; fine-tune with vit_small_patch16."""
    return _rho("small", **kwargs)


def rho_vit_base_patch16(**kwargs) -> RhoModel:
    """ViT-B/16 encoder; fine-tune with vit_base_patch16."""
    return _rho("base", **kwargs)


def rho_vit_large_patch16(**kwargs) -> RhoModel:
    """ViT-L/16 encoder; fine-tune with vit_large_patch16."""
    return _rho("large", **kwargs)
