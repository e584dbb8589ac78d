"""Pieces of the objectives that talk across ranks or reach into sharded parameters.

- `CrossRankBatchNorm1d`: BatchNorm over the global batch (the projector/predictor MLPs of rho-BYOL
  and rho-MoCo), differentiable through `torch.distributed.nn` collectives, on any device and
  backend. `nn.SyncBatchNorm` refuses CPU tensors, so it cannot run under gloo, where the tests run.
- `ema_update`: the momentum encoder's update, shard-local: each rank updates the part of every
  target parameter it holds (a DDP replica, an FSDP2 DTensor shard, a ZeRO-3 partition), from the
  same part of the online parameter, which has the same shape and so the same sharding.
- `all_gather_cat`: tensors of every rank, in rank order (the MoCo queue is identical everywhere; AMT's
  attention table too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_device(t: torch.Tensor) -> torch.device:
    """gloo gathers CPU tensors, NCCL device tensors."""
    return t.device if dist.get_backend() == "nccl" else torch.device("cpu")


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the batch over all ranks (two-pass, exact).

    Same parameters and buffers as nn.BatchNorm1d (state dicts are interchangeable). The reductions
    are `torch.distributed.nn.functional.all_reduce`, whose backward all-reduces the gradient, so the
    gradient is that of BatchNorm over the global batch; alone it is plain BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise x [N, C] with the global batch's mean and (biased) variance while training."""
        if not self.training or _world() == 1:
            if x.dtype == self.running_mean.dtype if self.running_mean is not None else True:
                return super().forward(x)
            # FSDP2's bf16 policy casts the weights and the input but not the fp32 running statistics, and
            # batch_norm refuses mixed dtypes: normalise in fp32, as the cross-rank path below does.
            momentum = self.momentum or 0.0
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            weight, bias = (self.weight.float(), self.bias.float()) if self.affine else (None, None)
            return nn.functional.batch_norm(x.float(), self.running_mean, self.running_var, weight, bias,
                                            self.training, momentum, self.eps).to(x.dtype)
        from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        stats = all_reduce(torch.cat([xf.sum(0), xf.new_full((1,), x.shape[0])]))
        count = stats[-1]
        mean = stats[:-1] / count
        # Second pass over the centred values: E[(x - mean)^2] has no cancellation, unlike E[x^2] - mean^2.
        var = all_reduce(((xf - mean) ** 2).sum(0)) / count
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
                self.num_batches_tracked += 1
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm1d in `module` (in place) by a CrossRankBatchNorm1d with its state; returns it."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            synced = CrossRankBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats, device=child.running_mean.device
                                          if child.running_mean is not None else None)
            synced.load_state_dict(child.state_dict())
            for mine, theirs in zip(synced.parameters(), child.parameters(), strict=True):
                mine.requires_grad_(theirs.requires_grad)  # a frozen (momentum) copy stays frozen
            setattr(module, name, synced)
        else:
            convert_batchnorm(child)
    return module


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape on all), concatenated along dim 0 in rank order; alone: `t`."""
    if _world() == 1:
        return t
    local = t.detach().to(_gather_device(t)).contiguous()
    parts = [torch.empty_like(local) for _ in range(_world())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def local_parts(p: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of parameter `p` this rank holds: a ZeRO-3 partition (and the full tensor when ZeRO-3 keeps
    it gathered: "persistent" small parameters), an FSDP2 shard, or all of it (DDP, ZeRO-1/2)."""
    if getattr(p, "ds_tensor", None) is not None:  # DeepSpeed ZeRO-3
        # A released parameter's data is an empty placeholder; a persistent one stays gathered between
        # forwards, and DeepSpeed re-gathers it only after the next optimiser step: both must move now.
        return [p.ds_tensor] + ([p.data] if p.data.numel() == p.ds_numel else [])
    if hasattr(p, "to_local"):  # FSDP2 DTensor: this rank's shard (a view of its storage)
        return [p.to_local()]
    return [p.data]


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * online for each (online, target), on the local parts."""
    sources, targets = [], []
    for online, target in pairs:
        src, dst = local_parts(online), local_parts(target)
        if len(src) < len(dst) or any(a.shape != b.shape for a, b in zip(src, dst, strict=False)):
            raise ValueError(f"online and momentum parameters are sharded differently: {[tuple(t.shape) for t in src]}"
                             f" vs {[tuple(t.shape) for t in dst]}")
        for a, b in zip(src, dst, strict=False):
            if b.numel():
                sources.append(a.to(b.dtype))
                targets.append(b)
    if targets:
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule, as the rho study anneals it: base at the start, 1 at the end (progress in [0, 1])."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0
