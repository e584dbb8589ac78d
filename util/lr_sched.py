"""Learning-rate schedules: per-iteration linear warm-up, then half-cycle cosine to `min_lr` (MAE), or
warm-up-stable-decay (`wsd`): warm-up, constant, then a decay to `min_lr` over the last `decay_fraction`
of training.

Written out rather than taken from timm's schedulers because the position is a float epoch
(`epoch + step / steps_per_epoch`) that a mid-epoch resume restores exactly, and because the same
function serves every parallel backend through plain `param_group["lr"]` writes.

WSD decay shapes (`progress` p runs 0 -> 1 over the decay): `linear` 1 - p (V-JEPA 2's cooldown, and
Hagele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"), `sqrt`
1 - sqrt(p) (Hagele et al.'s best cooldown), `cosine` (1 + cos(pi p)) / 2 (a cosine tail, one
of the cooldown forms Hagele et al. compare). A constant phase leaves a checkpoint from which a longer run, or a cooldown
at another clip size, can branch without re-warming.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

LR_SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


def decay_factor(progress: float, shape: str) -> float:
    """Share of the (lr - min_lr) range left at `progress` in [0, 1] of a decay of this shape."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "sqrt":
        return 1.0 - math.sqrt(p)
    raise ValueError(f"unknown decay shape {shape!r}; choose one of {list(DECAY_SHAPES)}")


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float, schedule: str = "cosine",
          decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    """Learning rate at a fractional epoch: warm-up, then cosine to `min_lr`, or wsd (constant, then a decay)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-8)
        return min_lr + (lr - min_lr) * decay_factor((epoch - warmup_epochs) / span, "cosine")
    if schedule != "wsd":
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {list(LR_SCHEDULES)}")
    # The decay never eats into the warm-up: with decay_fraction 1 it starts where the warm-up ends.
    start = max(epochs * (1.0 - decay_fraction), warmup_epochs)
    if epoch < start:
        return lr
    return min_lr + (lr - min_lr) * decay_factor((epoch - start) / max(epochs - start, 1e-8), decay_shape)


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
                  scale_by: str, videos_per_step: int, schedule: str = "cosine", decay_fraction: float = 0.2,
                  decay_shape: str = "linear") -> str:
    """The start-up line naming both epoch counts (data passes and effective), the lr rule and the schedule's shape."""
    unit = videos_per_step * (repeat_aug if scale_by == "clips" else 1)
    rule = f"--lr {abs_lr:.3g}" if abs_lr else f"blr {blr:.3g} x {unit} {scale_by} / 256 (--lr_scale_by {scale_by})"
    if schedule == "wsd":
        start = max(epochs * (1.0 - decay_fraction), warmup_epochs)
        shape = (f"wsd: constant to epoch {start:g}, then {decay_shape} decay over the last {epochs - start:g} "
                 f"({(epochs - start) * repeat_aug:g} effective)")
    else:
        shape = "cosine to min_lr"
    return (f"schedule: {epochs} epochs = data passes; x repeat_aug {repeat_aug} = {epochs * repeat_aug} effective "
            f"epochs (the papers' count); warm-up {warmup_epochs:g} ({warmup_epochs * repeat_aug:g} effective); "
            f"lr {lr:.3e} = {rule}; {shape}")
