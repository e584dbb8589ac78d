"""Training logs: a console line (or progress bar on a terminal), TensorBoard scalars, OUT/log.jsonl.

Only the main process writes. A resumed run continues the same `log.jsonl` and TensorBoard run:
first it drops what was logged after the checkpoint it resumes from (those steps run again), so
the log holds the run's history once.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("mae_st")


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or this process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncate_log(path: str, last_step: int) -> None:
    """Keep only the records of steps <= last_step in a JSON-lines log (atomically); no-op without a file."""
    if not os.path.isfile(path):
        return
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:  # a damaged byte makes its line unreadable, no more
        for line in f:
            try:
                record = json.loads(line)
                step = int(record.get("step", 0)) if isinstance(record, dict) else None
            except (json.JSONDecodeError, TypeError, ValueError, OverflowError):
                step = None
            if step is None:  # a line cut by a kill, or not one of our records: drop it
                dropped += int(bool(line.strip()))
            elif step <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        log.warning("%s: dropped %d line(s) that are not step records (cut by a kill, or damaged)", path, dropped)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class TrainLogger:
    """Writes metrics of logged steps to the console, TensorBoard and a JSON-lines file."""

    def __init__(self, output_dir: str, enabled: bool, total_steps: int, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled, self.total_steps = enabled, total_steps
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        path = os.path.join(output_dir, "log.jsonl")
        truncate_log(path, resume_step if resume_step is not None else 0)
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Same folder on every resume: TensorBoard shows one continuing run, and purge_step hides
            # the events of steps after the checkpoint (they are logged again).
            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge)
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, dynamic_ncols=True, leave=True)

    def log(self, step: int, metrics: dict[str, Any], eta_s: float | None = None) -> None:
        """Record one logged step (global optimiser step) with scalar metrics."""
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        record["time"] = time.time()
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)
        line = self._format(step, metrics, eta_s)
        if self.bar is not None:
            self.bar.n = min(step, self.total_steps)
            self.bar.set_postfix_str(line, refresh=True)
        else:
            log.info(line)

    def _format(self, step: int, m: dict[str, Any], eta_s: float | None) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        if "epoch" in m:
            parts.append(f"ep {m['epoch']:.2f}")
        for key, fmt in (("loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".3f"), ("clips_per_s", ".1f")):
            if key in m:
                parts.append(f"{key} {m[key]:{fmt}}")
        if "data_wait" in m:
            parts.append(f"data {100 * m['data_wait']:.0f}%")
        if "mfu" in m:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        if "mem_gb" in m:
            parts.append(f"mem {m['mem_gb']:.2f}G")
        if "bad_videos" in m and m["bad_videos"]:
            parts.append(f"bad videos {int(m['bad_videos'])}")
        if eta_s is not None:
            parts.append(f"eta {datetime.timedelta(seconds=int(eta_s))}")
        return "  ".join(parts)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """Add a [3, H, W] float image in [0, 1] to TensorBoard."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step)

    def scalars(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        """Record extra scalars (e.g. evaluation results) in TensorBoard and log.jsonl."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        """Flush and close every sink."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
