"""Find host-device synchronisations on the CPU: every op that would make a CUDA host wait, or copy from it.

A CUDA step stays asynchronous as long as the host never reads a device value and never builds a tensor
from host data. On the CPU nothing waits, but the same ops still pass through the dispatcher, so a
TorchDispatchMode can list them with the Python line that caused each:

- `aten._local_scalar_dense`: `.item()`, `float(t)`, `int(t)`, `bool(t)`, `if t:` (the host reads a value);
- `aten.lift_fresh`: `torch.tensor(data)` (a host->device copy when built for the GPU);
- ops whose output shape depends on the data (`nonzero`, `masked_select`, `unique`, indexing with a
  boolean mask, ...) and `equal`:
  the host must learn a size or an answer.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("_local_scalar_dense", "lift_fresh", "nonzero", "masked_select", "unique", "_unique2",
            "unique_consecutive", "unique_dim", "equal", "is_nonzero", "repeat_interleave.Tensor")
REPO = str(Path(__file__).resolve().parents[1])


@dataclass
class SyncEvent:
    """One op that would synchronise, and where it was called from (innermost frame of ours last)."""

    op: str
    stack: list[tuple[str, int, str]] = field(default_factory=list)  # (file relative to the repo, line, function)
    data_side: bool = False  # called by the data pipeline (our datasets/ or torch.utils.data): host tensors by design

    def frames(self) -> str:
        """The project's part of the call stack, for failure messages."""
        return " <- ".join(f"{f}:{n} {fn}" for f, n, fn in reversed(self.stack[-6:]))


class HostSyncAudit(TorchDispatchMode):
    """Records every op of SYNC_OPS run while active, with the project's frames of its call stack."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[SyncEvent] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).removeprefix("aten.")
        # Indexing with a boolean mask hides a nonzero inside the kernel (a sync on CUDA).
        bool_index = name.startswith(("index.", "index_put")) and any(
            getattr(t, "dtype", None) is torch.bool for t in (args[1] if len(args) > 1 else ()) or ())
        if name.split(".")[0] in SYNC_OPS or name in SYNC_OPS or bool_index:
            stack = traceback.extract_stack()[:-1]
            ours = [(f.filename[len(REPO) + 1:], f.lineno, f.name) for f in stack
                    if f.filename.startswith(REPO) and "/tests/" not in f.filename]
            data = any("torch/utils/data/" in f.filename or f.filename.startswith(f"{REPO}/datasets/") for f in stack)
            self.events.append(SyncEvent(name, ours, data))
        return func(*args, **(kwargs or {}))
