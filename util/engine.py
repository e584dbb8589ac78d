"""The train step and epoch loop shared by pretraining and fine-tuning (one loop, two loss functions).

A step is `accum_iter` micro-steps of forward + backward (gradient sync only on the last) and one
optimiser step through the parallel backend. The loop never forces a host-device sync except on
logging and saving steps: losses stay on the device until then, and a non-finite loss or gradient
norm is caught there, before any checkpoint is written from that state.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from datasets.transforms import normalize_clips
from util.checkpoint import finish_pending_save
from util.logger import TrainLogger, peak_memory_gb
from util.lr_sched import apply_lr, lr_at

# A loss function returns the loss, or (loss, {name: scalar tensor}) to log extra averaged metrics.
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor | tuple[torch.Tensor, dict]]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient norm."""


@dataclass
class TrainState:
    """Where training stands: saved in every checkpoint and restored on resume."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimiser steps already done in `epoch`
    global_step: int = 0

    def state_dict(self) -> dict[str, int]:
        """Plain-int dict for the checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's dict."""
        self.epoch, self.step_in_epoch, self.global_step = (int(state[k]) for k in ("epoch", "step_in_epoch", "global_step"))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch to the device without blocking the host; uint8 clips are normalised there.

    Loaders for an accelerator send uint8 clips (4x fewer bytes to pin and copy, no float work in
    the workers) and the device normalises them, which costs it almost nothing.
    """
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if torch.is_tensor(out.get("clips")) and out["clips"].dtype == torch.uint8:
        out["clips"] = normalize_clips(out["clips"])
    return out


def step_seed(seed: int, global_step: int, rank: int) -> int:
    """Seed of the global RNG for one step (dropout, drop path): a resume replays it exactly."""
    return (seed * 1_000_003 + global_step) * 1_009 + rank


def _first_bad(values: list[torch.Tensor], steps: list[int], world: bool) -> int | None:
    """First step whose loss or grad norm is not finite, agreed by all ranks (one small collective)."""
    if not values:
        return None
    finite = torch.isfinite(torch.stack([v.float().reshape(()) for v in values]))
    bad = torch.where(~finite, torch.tensor(steps, device=finite.device), torch.tensor(2**62, device=finite.device))
    first = bad.min()
    if world and torch_dist.is_available() and torch_dist.is_initialized():
        first = first.to("cuda" if first.is_cuda else "cpu")
        torch_dist.all_reduce(first, op=torch_dist.ReduceOp.MIN)
    first = int(first)
    return None if first == 2**62 else first


def train_one_epoch(
    backend: Any,
    loader_iter: Iterator[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    state: TrainState,
    args: argparse.Namespace,
    steps_per_epoch: int,
    logger: TrainLogger,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    save_fn: Callable[[TrainState], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    flops_per_clip: float | None = None,
    peak_flops: float | None = None,
) -> bool:
    """Run the remaining optimiser steps of `state.epoch`; returns False when stopped early."""
    accum = args.accum_iter
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    window_losses: list[torch.Tensor] = []
    window_norms: list[torch.Tensor] = []
    window_steps: list[int] = []
    window_failures = 0
    window_extra: dict[str, list[torch.Tensor]] = {}
    clips = 0
    data_time = 0.0
    window_start = time.perf_counter()
    step_times: list[float] = []
    backend.module.train()

    for step in range(state.step_in_epoch, steps_per_epoch):
        if args.max_steps and state.global_step >= args.max_steps:
            return False
        if should_stop is not None and should_stop():
            return False
        step_start = time.perf_counter()
        lr = lr_at(state.epoch + step / steps_per_epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
        apply_lr(backend.param_groups, lr)
        torch.manual_seed(step_seed(args.seed, state.global_step, rank))
        step_loss = None
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(loader_iter)
            data_time += time.perf_counter() - t0
            window_failures += int(batch.get("failures", 0))
            batch = to_device(batch, device)
            with backend.autocast():
                loss = loss_fn(backend.module, batch)
            if isinstance(loss, tuple):
                loss, extra = loss
                for key, value in extra.items():
                    window_extra.setdefault(key, []).append(value.detach().float().reshape(()))
            backend.backward(loss, is_last_microstep=micro == accum - 1)
            loss = loss.detach()
            step_loss = loss if step_loss is None else step_loss + loss
            clips += batch["clips"].shape[0]
        grad_norm = backend.step()
        finish_pending_save(wait=False)  # an asynchronous checkpoint becomes `latest` once fully written
        state.step_in_epoch = step + 1
        state.global_step += 1
        window_losses.append(step_loss / accum)
        if grad_norm is not None:
            window_norms.append(grad_norm)
        window_steps.append(state.global_step)
        step_times.append(time.perf_counter() - step_start)

        is_log = state.global_step % args.log_every == 0 or step + 1 == steps_per_epoch
        is_save = save_fn is not None and args.save_every > 0 and state.global_step % args.save_every == 0
        if not (is_log or is_save):
            continue
        bad = _first_bad(window_losses + window_norms, window_steps + window_steps[: len(window_norms)], world_size > 1)
        if bad is not None:
            raise NonFiniteLossError(
                f"loss or gradient norm became NaN/inf at or before global step {bad} (epoch {state.epoch}); "
                "no checkpoint was written from this state. Lower the lr (--blr), check the data, or use "
                "--precision bf16 instead of fp16."
            )
        if is_log:
            elapsed = time.perf_counter() - window_start
            losses = torch.stack(window_losses).float()
            metrics: dict[str, Any] = {
                "epoch": state.epoch + state.step_in_epoch / steps_per_epoch,
                "loss": float(losses.mean()),
                "lr": lr,
                "clips_per_s": clips * world_size / max(elapsed, 1e-9),
                "data_wait": data_time / max(elapsed, 1e-9),
                "mem_gb": peak_memory_gb(device),
                "bad_videos": window_failures,
            }
            if len(window_losses) == 1:
                metrics["loss"] = float(losses[0])
            for key, values in window_extra.items():
                metrics[key] = float(torch.stack(values).mean())
            if window_norms:
                metrics["grad_norm"] = float(torch.stack([n.float().reshape(()) for n in window_norms]).mean())
            if flops_per_clip and peak_flops:
                metrics["tflops"] = flops_per_clip * clips / max(elapsed, 1e-9) / 1e12
                metrics["mfu"] = flops_per_clip * clips / max(elapsed, 1e-9) / peak_flops
            mean_step = sum(step_times) / len(step_times)
            logger.log(state.global_step, metrics, eta_s=mean_step * max(total_steps - state.global_step, 0))
            window_losses, window_norms, window_steps, step_times, window_extra = [], [], [], [], {}
            clips, data_time, window_failures = 0, 0.0, 0
            window_start = time.perf_counter()
        if is_save:
            save_fn(state)
    return True


def steps_in_epoch(num_samples: int, batch_size: int, world_size: int, accum_iter: int) -> int:
    """Optimiser steps per epoch (incomplete global batches are dropped, as MAE-ST does)."""
    steps = num_samples // (batch_size * world_size * accum_iter)
    if steps < 1:
        raise ValueError(
            f"{num_samples} training videos cannot fill one step of batch_size {batch_size} x {world_size} ranks "
            f"x accum_iter {accum_iter}; lower --batch_size or --accum_iter, or add data"
        )
    return steps

