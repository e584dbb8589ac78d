"""One training step, and what the loop keeps between steps: the position, the metric window, NaN checks.

A step is `accum_iter` micro-steps of forward + backward (gradient sync only on the last, which the
step tells the backend) and one optimiser step. Nothing here forces a host-device sync: losses and
gradient norms stay on the device in a `StepWindow` until a log or save step reads them, and a
non-finite value is caught there, before any checkpoint is written from that state.
`benchmarks/bench_step.py` times exactly `train_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

# A loss function returns {"loss": the loss, name: scalar tensor to log (averaged) ...}; a task's `loss` does.
# A bare loss tensor (or a (loss, metrics) pair) is accepted too, for short scripts and benchmarks.
LossOut = dict[str, torch.Tensor] | torch.Tensor | tuple[torch.Tensor, dict]
LossFn = Callable[[nn.Module, dict[str, Any]], LossOut]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient norm or weight."""


@dataclass
class TrainState:
    """Where training stands: saved in every checkpoint and restored on resume.

    `consumed` counts the samples (videos) of this epoch already used over all ranks: unlike a step
    count it means the same on any number of ranks, so a resume on another world size continues with
    exactly the samples not yet seen.
    """

    epoch: int = 0
    step_in_epoch: int = 0  # optimiser steps done in `epoch` (for humans: `util.checkpoint info`)
    global_step: int = 0
    consumed: int = 0

    def state_dict(self) -> dict[str, int]:
        """Plain-int dict for the checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's dict (its other keys are other entries; `SamplerPosition` sets `consumed`)."""
        self.epoch, self.step_in_epoch, self.global_step = (int(state[k]) for k in ("epoch", "step_in_epoch",
                                                                                   "global_step"))
        self.consumed = int(state.get("consumed", 0))


class SamplerPosition:
    """The sampler's position in a checkpoint, read from and restored into the `TrainState`.

    The loop, not the sampler, advances the position (the sampler is only told it when an epoch
    starts), so this view of the train state is what a save must record. On load it is the authority
    for `consumed`: samples of the epoch already used over all ranks, the same on any world size.
    """

    def __init__(self, state: TrainState) -> None:
        self.state = state

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "consumed"}, as `ResumableDistributedSampler.state_dict` names them."""
        return {"epoch": self.state.epoch, "consumed": self.state.consumed}

    def load_state_dict(self, position: dict[str, Any]) -> None:
        """Continue after the saved samples."""
        self.state.consumed = int(position["consumed"])


def step_seed(seed: int, global_step: int, rank: int) -> int:
    """Seed of the global RNG for one step (dropout, drop path): a resume replays it exactly."""
    return (seed * 1_000_003 + global_step) * 1_009 + rank


def split_loss(out: LossOut) -> tuple[torch.Tensor, dict]:
    """(loss, extra metrics) from what a loss function returned."""
    if isinstance(out, dict):
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}
    return out if isinstance(out, tuple) else (out, {})


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def train_step(backend: Any, micro_batches: Iterable[dict], loss_fn: LossFn, accum_iter: int
               ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor], int]:
    """One optimiser step over `accum_iter` micro-batches: (mean loss, pre-clip grad norm, extra metrics, clips).

    All returned tensors stay on the device (no host sync). Under `--compile model-cudagraphs` the model's
    outputs live in the CUDA graph's memory, which its next replay overwrites: what the step returns (and a
    `StepWindow` keeps until a log step) is copied out of it.
    """
    graphs = getattr(getattr(backend, "cfg", None), "compile", "") == "model-cudagraphs"
    keep = torch.clone if graphs else _same
    if graphs:  # the previous step's graph outputs are no longer read: its memory may be reused
        torch.compiler.cudagraph_mark_step_begin()
    total, extras, clips = None, {}, 0
    for i, batch in enumerate(micro_batches):
        with backend.microstep(is_last=i == accum_iter - 1):
            with backend.precision():
                loss, extra = split_loss(loss_fn(backend.module, batch))
            backend.backward(loss)
        loss = keep(loss.detach().float())
        total = loss if total is None else total + loss
        for key, value in extra.items():
            value = keep(value.detach().float().reshape(()))
            extras[key] = value if key not in extras else extras[key] + value
        clips += batch["clips"].shape[0]
    if total is None:
        raise ValueError("train_step got no micro-batches")
    grad_norm = backend.step()
    return total / accum_iter, grad_norm, {k: v / accum_iter for k, v in extras.items()}, clips


def _world() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def all_finite(module: nn.Module) -> bool:
    """True on every rank iff every local parameter shard on every rank is finite (collective when distributed)."""
    flags = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in module.parameters()
             if p.numel()]
    ok = torch.stack(flags).all() if flags else torch.tensor(True)
    if _world():
        t = ok.to(torch.int32).reshape(1)
        if torch_dist.get_backend() != "nccl":
            t = t.cpu()
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
        return bool(t.item())
    return bool(ok)


class StepWindow:
    """Losses, grad norms and extra metrics of the steps since the last log, kept on the device."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window (after a log line)."""
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.extra: dict[str, list[torch.Tensor]] = {}
        self.unchecked = 0  # steps at the end of the window not yet checked for NaN/inf

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, extra: dict) -> None:
        """Record one optimiser step."""
        self.losses.append(loss)
        self.norms.append(grad_norm.float().reshape(()) if grad_norm is not None else loss.new_zeros(()))
        self.steps.append(step)
        for key, value in extra.items():
            self.extra.setdefault(key, []).append(value)
        self.unchecked += 1

    def first_bad_step(self) -> int | None:
        """First step of the unchecked tail whose loss or grad norm is not finite, agreed by all ranks."""
        if not self.unchecked:
            return None
        n = self.unchecked
        values = torch.stack(self.losses[-n:] + self.norms[-n:]).float()
        steps = torch.tensor(self.steps[-n:] * 2, device=values.device)
        never = torch.tensor(2**62, device=values.device)
        first = torch.where(torch.isfinite(values), never, steps).min()
        if _world():
            first = first.reshape(1)
            if torch_dist.get_backend() != "nccl":
                first = first.cpu()
            torch_dist.all_reduce(first, op=torch_dist.ReduceOp.MIN)
        self.unchecked = 0
        first = int(first)
        return None if first == 2**62 else first

    def check(self, module: nn.Module | None = None, epoch: int | None = None) -> None:
        """Raise NonFiniteLossError if a step since the last check (or, given `module`, a weight) is not finite."""
        bad = self.first_bad_step()
        where = f" (epoch {epoch})" if epoch is not None else ""
        hint = ("no checkpoint was written from this state. Lower the lr (--blr), turn on clipping "
                "(--clip_grad), check the data, or use --precision bf16 instead of fp16.")
        if bad is not None:
            raise NonFiniteLossError(f"loss or gradient norm became NaN/inf at or before global step {bad}{where}; "
                                     + hint)
        if module is not None and not all_finite(module):
            step = self.steps[-1] if self.steps else "?"
            raise NonFiniteLossError(f"a weight became NaN/inf by global step {step}{where}; " + hint)

    def means(self) -> dict[str, float]:
        """Host values of the window: mean loss, grad norm and extra metrics (one sync)."""
        out = {"loss": float(torch.stack(self.losses).float().mean())}
        out["grad_norm"] = float(torch.stack(self.norms).mean())
        for key, values in self.extra.items():
            out[key] = float(torch.stack(values).mean())
        return out


def steps_in_epoch(num_samples: int, batch_size: int, world_size: int, accum_iter: int) -> int:
    """Optimiser steps per epoch (incomplete global batches are dropped, as MAE-ST does)."""
    steps = num_samples // (batch_size * world_size * accum_iter)
    if steps < 1:
        raise ValueError(
            f"{num_samples} training videos cannot fill one step of batch_size {batch_size} x {world_size} ranks "
            f"x accum_iter {accum_iter}; lower --batch_size or --accum_iter, or add data"
        )
    return steps
