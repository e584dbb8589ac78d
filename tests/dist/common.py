"""Shared pieces of the distributed test workers: tiny model, per-sample data, a plain reference run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models import create_model  # noqa: E402
from util.optim import build_adamw, param_groups  # noqa: E402

GLOBAL_BATCH = 4  # samples per optimizer step, whatever the world size and accumulation
MASK_RATIO = 0.75
BASE_LR = 1e-3
CLIP = 0.5
LAYER_DECAY = 0.75


def make_model() -> torch.nn.Module:
    """The tiny MAE, with the same initial weights in every process."""
    torch.manual_seed(0)
    return create_model(
        "mae_vit_micro_patch8", img_size=32, num_frames=4, t_patch_size=2, depth=2,
        decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
    )


def make_backend(model: torch.nn.Module, info, *, lr: float = BASE_LR, accum_iter: int = 1,
                 batch_size: int = GLOBAL_BATCH, **over):
    """setup_parallel with test defaults; `over` sets ParallelConfig / OptimConfig fields by name."""
    from util.config import OptimConfig, ParallelConfig
    from util.parallel import setup_parallel

    par = {k: over.pop(k) for k in list(over) if k in ParallelConfig.__dataclass_fields__}
    opt = {k: over.pop(k) for k in list(over) if k in OptimConfig.__dataclass_fields__}
    if over:
        raise TypeError(f"unknown backend options {sorted(over)}")
    parallel = ParallelConfig(**{"dist": "ddp", "zero_stage": 1, "precision": "fp32", **par})
    optim = OptimConfig(**{"clip_grad": CLIP, "weight_decay": 0.05, "layer_decay": LAYER_DECAY, **opt})
    return setup_parallel(model, parallel, optim, lr, info, accum_iter, batch_size)


def micro_step(backend, clips: torch.Tensor, noise: torch.Tensor, is_last: bool = True) -> torch.Tensor:
    """Forward + backward of one micro-batch through the backend, as the run loop does; returns the loss."""
    with backend.microstep(is_last):
        with backend.precision():
            loss, _, _ = backend.module(clips, MASK_RATIO, noise)
        backend.backward(loss)
    return loss


def sample(idx: int, num_tokens: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip [3, 4, 32, 32] and mask noise [L] of global sample idx: independent of rank layout."""
    g = torch.Generator().manual_seed(1000 + idx)
    return torch.randn(3, 4, 32, 32, generator=g), torch.rand(num_tokens, generator=g)


def batch(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked clips and noise for a list of global sample indices."""
    clips, noise = zip(*(sample(i) for i in indices), strict=True)
    return torch.stack(clips), torch.stack(noise)


def micro_indices(step: int, rank: int, world: int, accum: int, micro: int) -> list[int]:
    """Rank r, micro-step m of optimizer step s takes a contiguous slice of that step's global batch."""
    per_rank = GLOBAL_BATCH // world
    per_micro = per_rank // accum
    start = step * GLOBAL_BATCH + rank * per_rank + micro * per_micro
    return list(range(start, start + per_micro))


def lr_at(step: int) -> float:
    """A changing lr, so that the test sees that writes to param_groups take effect."""
    return BASE_LR * (1.0 + step) / 3.0


def reference_run(steps: int, snapshot_at: int = 3) -> tuple[list[float], dict, list[float]]:
    """One plain process, global batch per step: (losses, state dict after `snapshot_at` steps, grad norms)."""
    model = make_model()
    opt = build_adamw(param_groups(model, 0.05, LAYER_DECAY), BASE_LR, torch.device("cpu"))
    losses, norms, snap = [], [], {}
    for s in range(steps):
        if s == snapshot_at:
            snap = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(s) * g["lr_scale"]
        clips, noise = batch(list(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)))
        loss, _, _ = model(clips, MASK_RATIO, noise)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, snap, norms


def env_world() -> tuple[int, int]:
    """(rank, world) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
