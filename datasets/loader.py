"""One DataLoader builder for training, testing and the benchmarks: fork-safe workers, decode threads.

Workers start with `forkserver` by default. Forking a process whose FFmpeg thread pools are live
(the parent decoded or encoded video with PyAV: the demo writes its generated videos, the benchmarks
decode a batch) deadlocks the forked workers with PyAV 19 on Python >= 3.12; a forkserver (or
spawn) worker starts from a clean process that never touched FFmpeg. The price is that the dataset
is pickled to each worker once (keep it cheap: lists of paths, no open files, no decoded frames) and
each worker imports torch once (persistent workers pay it once per run).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

MP_CONTEXTS = ("forkserver", "spawn", "fork")


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, e.g. a SLURM allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_threads_for(num_workers: int, requested: int = 0, local_world_size: int = 1) -> int:
    """FFmpeg threads per decoding process: `requested` if > 0, else the cores each worker gets (>= 1).

    14 workers that each start one thread per core would run 14 x 16 threads on 16 cores; when the
    workers alone fill this rank's cores, one thread each is fastest.
    """
    if requested > 0:
        return requested
    per_rank = max(1, usable_cores() // max(1, local_world_size))
    return max(1, per_rank // max(1, num_workers))


def build_loader(
    dataset: torch.utils.data.Dataset,
    sampler: Iterable,
    batch_size: int,
    collate_fn,
    num_workers: int,
    mp_context: str = "forkserver",
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    drop_last: bool = False,
    persistent_workers: bool = True,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose workers (if any) start with `mp_context`; every loader of the project is made here."""
    if mp_context not in MP_CONTEXTS:
        raise ValueError(f"mp_context must be one of {MP_CONTEXTS}, got {mp_context!r}")
    workers = {}
    if num_workers > 0:
        workers = dict(multiprocessing_context=mp_context, prefetch_factor=prefetch_factor,
                       persistent_workers=persistent_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
        pin_memory=pin_memory, drop_last=drop_last, **workers,
    )
