"""One DataLoader builder for training, testing and the benchmarks: fork-safe workers, decode threads.

Workers start with `forkserver` by default. Forking a process whose FFmpeg thread pools are live
(the parent decoded or encoded video with PyAV: the demo writes its generated videos, the benchmarks
decode a batch) deadlocks the forked workers with PyAV 19 on Python >= 3.12; a forkserver (or
spawn) worker starts from a clean process that never touched FFmpeg. The price is that the dataset
is pickled to each worker once (keep it cheap: lists of paths, no open files, no decoded frames) and
each worker imports torch once (persistent workers pay it once per run).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator

import torch

from util.errors import MaeError

MP_CONTEXTS = ("forkserver", "spawn", "fork")
SHM_DIR = "/dev/shm"  # where torch puts the tensors workers hand to the main process (both sharing strategies)
log = logging.getLogger(__name__)


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
    timeout: float = 0.0,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose workers (if any) start with `mp_context`; every loader of the project is made here.

    `timeout` > 0 (seconds, workers only): a batch that takes longer stops the iteration with torch's
    "DataLoader timed out"; iterate with `batches` to get a DataTimeoutError naming the files being read.
    """
    if mp_context not in MP_CONTEXTS:
        raise ValueError(f"mp_context must be one of {MP_CONTEXTS}, got {mp_context!r}")
    workers = {}
    if num_workers > 0:
        workers = dict(multiprocessing_context=mp_context, prefetch_factor=prefetch_factor,
                       persistent_workers=persistent_workers, timeout=timeout)
        if hasattr(dataset, "track_workers"):  # before the workers get their copy of the dataset
            dataset.track_workers(num_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
        pin_memory=pin_memory, drop_last=drop_last, **workers,
    )


class DataTimeoutError(MaeError, RuntimeError):
    """No batch from the data workers within --data_timeout seconds: a read that does not return."""


def batches(loader: Iterable) -> Iterator:
    """Iterate `loader`; a DataLoader's timeout becomes a DataTimeoutError naming the files its workers were reading.

    A worker blocked in a read (a FIFO, a device, a stalled network mount) cannot be interrupted or skipped
    from outside: the run stops with the file named, so it can be removed from the list or the mount fixed.
    The iterator is made here, not at the first `next`: making one draws torch's global RNG (the loader's
    base seed), which must happen before the trainer seeds a step, or a run resumed mid-epoch (whose
    iterator starts at that step) would draw that step's dropout and drop-path masks differently.
    """
    return _batches(loader, iter(loader))


def _batches(loader: Iterable, it: Iterator) -> Iterator:
    """The batches of `it` (made from `loader`), with timeouts named as `batches` says."""
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as exc:
            if not getattr(loader, "timeout", 0) or "DataLoader timed out" not in str(exc):
                raise
            reading = getattr(getattr(loader, "dataset", None), "paths_being_read", list)()
            where = (f"the workers were reading {reading}" if reading else
                     "no worker was inside a video (stuck starting up, or in the sampler or collate)")
            raise DataTimeoutError(
                f"no batch from the {loader.num_workers} data worker(s) for --data_timeout {loader.timeout:g} s: "
                f"{where}. A FIFO, device or stalled network mount blocks a read forever: remove the file from "
                f"the list or fix the mount; raise --data_timeout if the storage is just slow") from None
        yield batch


def clip_batch_bytes(dataset: torch.utils.data.Dataset, batch_size: int) -> int | None:
    """Bytes of one batch's clips from the dataset's geometry (R clips of T frames, S x S, uint8 or float32)."""
    size = getattr(dataset, "crop_size", None)
    if size is None:
        return None  # a dataset that does not say its clip size: nothing to estimate from
    clips = getattr(dataset, "repeat_aug", 1) * getattr(dataset, "num_frames", 1)
    return batch_size * clips * 3 * size * size * (4 if getattr(dataset, "normalize", True) else 1)


def check_shared_memory(batch_bytes: int, num_workers: int, prefetch_factor: int, processes: int = 1,
                        path: str = SHM_DIR) -> int:
    """Refuse, before any work, workers whose batches in flight cannot fit in shared memory; returns the bytes.

    Each worker keeps `prefetch_factor` batches in `path` (tmpfs) until the main process takes them, and
    the main process holds one more while the step runs; `processes` ranks on the node share it. When it
    is full a worker dies with SIGBUS in the middle of a run (Docker's default --shm-size is 64 MB).
    """
    if num_workers <= 0 or not os.path.isdir(path):
        return 0
    need = processes * (num_workers * prefetch_factor + 2) * batch_bytes
    st = os.statvfs(path)
    capacity, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    what = (f"{processes} rank(s) x ({num_workers} workers x {prefetch_factor} prefetched + 2) batches of "
            f"{batch_bytes / 2**20:.1f} MiB need {need / 2**30:.2f} GiB in {path}")
    if need > capacity:
        raise RuntimeError(
            f"shared memory too small for the DataLoader: {what}, which holds {capacity / 2**30:.2f} GiB; the "
            f"workers would die with 'Bus error' mid-run. Fix: give the job more shared memory (docker run "
            f"--shm-size={math.ceil(1.25 * need / 2**30)}g; Kubernetes: an emptyDir volume with medium: Memory "
            f"mounted at /dev/shm), or lower --num_workers, --prefetch_factor or --batch_size.")
    if need > free:
        log.warning("shared memory is short: %s, %.2f GiB free of %.2f (others use it); workers may die with "
                    "'Bus error' if it fills", what, free / 2**30, capacity / 2**30)
    return need
