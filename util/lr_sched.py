"""Learning-rate schedule: per-iteration linear warm-up, then half-cycle cosine to `min_lr` (MAE).

Written out rather than taken from timm's schedulers because the position is a float epoch
(`epoch + step / steps_per_epoch`) that a mid-epoch resume restores exactly, and because the same
function serves every parallel backend through plain `param_group["lr"]` writes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-8)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(param_groups: Iterable[dict], lr: float) -> None:
    """Set every group's lr, scaled by its `lr_scale` (layer-wise decay) when present."""
    for group in param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def effective_lr(blr: float, batch_size: int, repeat_aug: int, accum_iter: int, world_size: int) -> float:
    """MAE-ST's linear scaling rule: lr = blr * clips per optimiser step / 256."""
    return blr * batch_size * repeat_aug * accum_iter * world_size / 256
