"""`--bench model,loader,e2e`: time a run's own components instead of training (benchmarks/bench_train.py).

The runner sets the run up exactly as training does (`Trainer.setup`: task, dataset, DataLoader,
backend, compile, precision) and then drives those components itself, so the production loop
carries no benchmark mode:
- model: one real batch, built in this process (no workers left running to steal cores), stepped
  again and again through `util.engine.train_step`;
- loader: batches from the real DataLoader, moved to the device, no model work;
- e2e: the loader feeding `train_step` step after step (no logs, no saves), timing the data wait.
Writes OUT/bench.json on rank 0 and returns the same dict.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from datasets import collate_clips
from datasets.loader import batches
from util.distributed import cleanup
from util.engine import train_step
from util.logger import peak_memory_gb

if TYPE_CHECKING:
    from util.trainer import Trainer

log = logging.getLogger("mae_st.bench")
WARM_STEPS = 2  # untimed steps first: workers start, kernels and compile caches warm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forever(trainer: Trainer) -> Iterator[dict]:
    """Loader batches across epoch boundaries (small datasets end before a benchmark does)."""
    for epoch in itertools.count():
        trainer.sampler.set_epoch(epoch)
        trainer.sampler.set_consumed(0)
        yield from batches(trainer.loader)


def _time_model(trainer: Trainer, steps: int) -> float:
    """Seconds per optimiser step on one fixed batch."""
    loop, ctx = trainer.cfg.loop, trainer.ctx
    fixed = ctx.prepare(collate_clips([trainer.dataset[(0, i)] for i in range(loop.batch_size)]))
    for i in range(WARM_STEPS + steps):
        if i == WARM_STEPS:
            _sync(ctx.device)
            t0 = time.perf_counter()
        train_step(trainer.backend, itertools.repeat(fixed, loop.accum_iter), trainer.task.loss, loop.accum_iter)
        trainer.task.after_step(ctx)
    _sync(ctx.device)
    return (time.perf_counter() - t0) / steps


def _time_loader(trainer: Trainer, steps: int) -> float:
    """Seconds per optimiser step's worth of batches from the DataLoader, on the device."""
    accum, it = trainer.cfg.loop.accum_iter, _forever(trainer)
    for _ in range(WARM_STEPS * accum):
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps * accum):
        trainer.ctx.prepare(next(it))
    _sync(trainer.ctx.device)
    return (time.perf_counter() - t0) / steps


def _time_e2e(trainer: Trainer, steps: int) -> tuple[float, float]:
    """(seconds per step, share of it spent waiting for data) with the loader feeding the model."""
    accum, it, ctx = trainer.cfg.loop.accum_iter, _forever(trainer), trainer.ctx
    timer = {"data": 0.0, "failures": 0}
    t0 = 0.0
    for i in range(WARM_STEPS + steps):
        if i == WARM_STEPS:
            _sync(ctx.device)
            t0, timer["data"] = time.perf_counter(), 0.0
        train_step(trainer.backend, trainer.micro_batches(it, timer), trainer.task.loss, accum)
        trainer.task.after_step(ctx)
    _sync(ctx.device)
    secs = time.perf_counter() - t0
    return secs / steps, timer["data"] / secs


def run_bench(trainer: Trainer) -> dict:
    """Set the run up as training would, time each --bench mode, write OUT/bench.json; returns its content."""
    try:
        trainer.setup(train=True, lock=True)
        loop, dist = trainer.cfg.loop, trainer.dist
        modes, n = [m for m in loop.bench.split(",") if m], loop.bench_steps
        per_step = loop.batch_size * trainer.cfg.data.repeat_aug * loop.accum_iter  # clips per rank
        rows: dict[str, dict] = {}
        if "model" in modes:
            secs = _time_model(trainer, n)
            rows["model"] = {"clips_per_s": per_step / secs, "step_s": secs, "data_wait": 0.0}
        if "loader" in modes:
            secs = _time_loader(trainer, n)
            rows["loader"] = {"clips_per_s": per_step / secs, "step_s": secs, "data_wait": 1.0}
        if "e2e" in modes:
            secs, wait = _time_e2e(trainer, n)
            rows["e2e"] = {"clips_per_s": per_step / secs, "step_s": secs, "data_wait": wait}
        for name, row in rows.items():
            if trainer.flops and name != "loader":
                row["mfu"] = row["clips_per_s"] * trainer.flops / trainer.peak
        result = {"bench": rows, "device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda"
                  else f"CPU ({os.cpu_count()} cores)", "threads": trainer.ctx.threads,
                  "flops_per_clip": trainer.flops, "peak_flops": trainer.peak, "clips_per_step_per_rank": per_step,
                  "world_size": dist.world_size, "peak_mem_gb": peak_memory_gb(dist.device), "steps": n}
        if dist.is_main:
            (trainer.out / "bench.json").write_text(json.dumps(result, indent=1))
            log.info("bench: %s", json.dumps(rows))
        trainer.logger.close()
        trainer.watcher.close()
        cleanup()
        return result
    finally:
        trainer.release()
