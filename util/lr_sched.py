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


def effective_lr(blr: float, batch_size: int, repeat_aug: int, accum_iter: int, world_size: int,
                 scale_by: str = "clips") -> float:
    """The linear scaling rule: lr = blr * (clips or videos) per optimiser step / 256.

    MAE-ST's pretraining code counts videos (its repeated clips share one lr unit); its fine-tuning
    code, and this project before the flag, count clips. The two differ by `repeat_aug`.
    """
    if scale_by not in ("clips", "videos"):
        raise ValueError(f"lr scale_by must be 'clips' or 'videos', got {scale_by!r}")
    per_step = batch_size * accum_iter * world_size * (repeat_aug if scale_by == "clips" else 1)
    return blr * per_step / 256


def schedule_line(epochs: int, warmup_epochs: float, repeat_aug: int, lr: float, abs_lr: float | None, blr: float,
                  scale_by: str, videos_per_step: int) -> str:
    """The start-up line naming both epoch counts (data passes and effective) and the lr rule."""
    unit = videos_per_step * (repeat_aug if scale_by == "clips" else 1)
    rule = f"--lr {abs_lr:.3g}" if abs_lr else f"blr {blr:.3g} x {unit} {scale_by} / 256 (--lr_scale_by {scale_by})"
    return (f"schedule: {epochs} epochs = data passes; x repeat_aug {repeat_aug} = {epochs * repeat_aug} effective "
            f"epochs (the papers' count); warm-up {warmup_epochs:g} ({warmup_epochs * repeat_aug:g} effective); "
            f"lr {lr:.3e} = {rule}")
