"""AdaMAE's adaptive token sampler (Bandara et al., 2022): learn which tokens the encoder sees.

A small network (its own positional embedding, one transformer `Block`, a linear layer to one logit
per token) reads the patch embeddings of *all* tokens and gives a categorical distribution `p` over
them (softmax over the L tokens). The K visible tokens are drawn from `p` without replacement, for
the whole batch at once, by Gumbel top-k: keep the K largest `log p + g`, with Gumbel noise `g` made
from the per-sample uniform mask noise of the data side, so the draw stays a deterministic function
of the sample (independent of ranks and workers, exact on resume).

Training signal (REINFORCE, reconstruction error as the reward):
    sampler_loss = -mean over hidden tokens of log p(token) * detached reconstruction error
so hidden tokens that were hard to rebuild become more likely to be *visible* next time: the encoder
is shown the informative (moving, textured) regions and masks the redundant background, which is
what lets AdaMAE mask 95% of a clip.

Design choices:
- `--mask_type adaptive` is the published network: it reads the patch embeddings with their
  gradient (the 1e-4-weighted policy gradient also moves the patch embedding) and its targets are
  normalised per channel within each patch, as AdaMAE's training loop does.
  `--mask_type adaptive_detached` stops the gradient at the sampler's input (the encoder is trained by
  reconstruction only, the sampler by the policy gradient only), starts from zero logits and keeps
  MAE-ST's per-patch targets.
- The reconstruction loss cannot reach the sampler: the sampled indices are integers and the
  logits enter nothing but the policy-gradient term.
- The Gumbel noise is built from `1 - u`, so with equal logits the sampler keeps exactly the tokens
  random masking keeps for the same noise (the zero-initialised variant starts as random masking).
- The block is a plain `models.video_vit.Block` listed by the MAE's `shard_units()`, so FSDP2 / ZeRO /
  activation checkpointing / compile wrap it like every other block, from outside.
- The network is itself the mask strategy (`AdaptiveTokenSampler.sample -> Mask`, with the log-probs the
  policy gradient needs), so the MAE holds it as a submodule under the name checkpoints use
  (`adaptive_sampler.*`) and gets its loss term and metrics back from `extra_loss`.
"""

from __future__ import annotations

import torch
from torch import nn

from models.masking import Grid, Mask, MaskOutput, MaskStrategy, masks_from_scores
from models.video_vit import Block, run_blocks

# Clamp the uniform noise away from 0 and 1: -log(-log(u)) is infinite at both ends.
_EPS = 1.0e-6


def gumbel_from_uniform(noise: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniform noise in [0, 1): g = -log(-log(1 - u)) (monotone decreasing in u)."""
    u = (1.0 - noise.float()).clamp(_EPS, 1.0 - _EPS)
    return -torch.log(-torch.log(u))


def gumbel_top_k(logits: torch.Tensor, noise: torch.Tensor, ratio: float) -> MaskOutput:
    """Sample K = int(L * (1 - ratio)) distinct tokens per row from softmax(logits) (Gumbel top-k).

    Returns the mask-sampler triple (ids_keep [B, K], ids_restore [B, L], mask [B, L], 1 = hidden).
    """
    # masks_from_scores keeps the K *lowest* scores: negate the perturbed log-probabilities.
    score = -(torch.log_softmax(logits.float(), dim=-1) + gumbel_from_uniform(noise))
    return masks_from_scores(score.detach(), ratio)


def policy_gradient_loss(log_probs: torch.Tensor, token_error: torch.Tensor, weight_mask: torch.Tensor) -> torch.Tensor:
    """-mean(log p * detached error) over the tokens where weight_mask is 1 (hidden tokens with a loss)."""
    reward = token_error.detach().float() * weight_mask
    return -(log_probs * reward).sum() / weight_mask.sum().clamp_min(1.0)


class AdaptiveTokenSampler(nn.Module, MaskStrategy):
    """Token-sampling network and mask strategy: patch embeddings [B, L, D] -> per-token logits [B, L] -> Mask.

    The defaults build wgcban/adamae's `get_token_probs` (models/pretrain/vit.py): its own position
    table (zeros), one block of 8 heads without qkv bias, dropout 0.1 on the attention projection and
    MLP, torch's LayerNorm (eps 1e-5), a linear layer to one logit, no final norm; it reads the patch
    embeddings with their gradient, so the policy gradient also trains the patch embedding. The
    `adaptive_detached` variant (`detached_variant`) differs in each of those: see docs/adamae.md.
    `loss_weight` scales the policy-gradient term added to the reconstruction loss.
    """

    needs_tokens = True

    def __init__(
        self,
        embed_dim: int,
        num_tokens: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        norm_layer: type[nn.Module] | None = None,
        qkv_bias: bool = False,
        dropout: float = 0.1,
        final_norm: bool = False,
        detach_input: bool = False,
        zero_logits: bool = False,
        target_norm: str = "channel",
        loss_weight: float = 1.0e-4,
        name: str = "adaptive",
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.LayerNorm
        self.detach_input, self.zero_logits, self.loss_weight, self.name = detach_input, zero_logits, loss_weight, name
        # AdaMAE's training loop normalises each patch's targets per colour channel (VideoMAE's rule).
        self.target_norm = target_norm
        # Its own table (not the encoder's). Name contains "pos_embed" so the MAE's init and
        # no-weight-decay list find it.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=dropout,
                                           norm_layer=norm_layer)])
        self.norm = norm_layer(embed_dim) if final_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, L] of the sampling distribution over the L tokens of `tokens` [B, L, D]."""
        x = run_blocks(self.blocks, tokens + self.pos_embed)
        return self.head(self.norm(x)).squeeze(-1).float()

    def sample(self, batch: int, grid: Grid, ratio: float, noise: torch.Tensor | None = None, *,
               tokens: torch.Tensor | None = None, attention: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> Mask:
        """Draw the visible tokens from the embedded `tokens` [B, L, D]; the Mask carries log p [B, L] with grad."""
        if tokens is None:
            raise ValueError("the adaptive sampler reads every token's embedding: pass tokens=[B, L, D]")
        B, L = tokens.shape[:2]
        if noise is None:
            noise = torch.rand(B, L, device=tokens.device)
        elif noise.shape != (B, L):
            raise ValueError(f"mask noise must have shape [batch, tokens] = {(B, L)}, got {tuple(noise.shape)}")
        logits = self(tokens.detach() if self.detach_input else tokens)
        log_probs = torch.log_softmax(logits, dim=-1)
        return Mask(*gumbel_top_k(logits.detach(), noise, ratio), log_probs=log_probs)

    def extra_loss(self, mask: Mask, token_errors: torch.Tensor, loss_mask: torch.Tensor
                   ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """loss_weight x the policy-gradient loss over the tokens with a loss, and its logging scalars."""
        sampler_loss = policy_gradient_loss(mask.log_probs, token_errors, loss_mask)
        return self.loss_weight * sampler_loss, {"sampler_loss": sampler_loss.detach(), **sampler_stats(mask.log_probs)}

    def finish_init(self) -> None:
        """After the MAE's init: the published sampler's zero position table, or the variant's zero logits."""
        if self.zero_logits:
            # Zero logits at start: uniform sampling, i.e. exactly random masking for the same noise.
            nn.init.zeros_(self.head.weight)
        else:  # wgcban/adamae: a zero position table, xavier logit layer (as the MAE's init applied)
            nn.init.zeros_(self.pos_embed)

    def shard_units(self) -> list[nn.Module]:
        """The sampler's block, wrapped from outside like the encoder's."""
        return list(self.blocks)


def detached_variant(embed_dim: int, num_tokens: int, num_heads: int, mlp_ratio: float,
                     norm_layer: type[nn.Module], loss_weight: float = 1.0e-4) -> AdaptiveTokenSampler:
    """`--mask_type adaptive_detached`: the encoder's heads and norm, qkv bias, no dropout, a final norm,
    a detached input (the policy gradient trains the sampler only), zero logits at start, MAE-ST's per-patch targets."""
    return AdaptiveTokenSampler(embed_dim, num_tokens, num_heads, mlp_ratio, norm_layer, qkv_bias=True, dropout=0.0,
                                final_norm=True, detach_input=True, zero_logits=True, target_norm="patch",
                                loss_weight=loss_weight, name="adaptive_detached")


def sampler_stats(log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached logging scalars of the sampling distribution: mean entropy (nats) and max probability."""
    lp = log_probs.detach().float()
    p = lp.exp()
    return {"sampler_entropy": -(p * lp).sum(-1).mean(), "sampler_max_prob": p.max(-1).values.mean()}
