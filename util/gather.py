"""Cross-rank gathering for losses over the global batch (contrastive learning), with gradients.

`RankGather` is what `models.videotext.contrastive_loss` takes as its `CrossRank`: `gather(x)` stacks
every rank's rows (equal row counts: the training sampler drops the incomplete last batch) and
returns where this rank's rows start; gradients flow back to the rank that produced each row.
Alone, both are the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered tensor and keeps this rank's rows.

    Each rank's loss depends on every rank's rows, so the gradient of a row is the sum over ranks of that
    loss's gradient (an all-reduce; reduce-scatter would do with less traffic, but gloo has none).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x [n, ...] stacked into [world * n, ...] in rank order, differentiable (x alone when alone)."""
    _, world = _world()
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x)


class RankGather:
    """The process group as the contrastive loss sees it (models.videotext.CrossRank)."""

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(every rank's rows of x, with gradients; the index of this rank's first row)."""
        rank, _ = _world()
        return all_gather_with_grad(x), rank * x.shape[0]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of x over ranks (detached; no host sync)."""
        _, world = _world()
        if world == 1:
            return x.detach()
        out = x.detach().clone()
        dist.all_reduce(out)
        return out / world
