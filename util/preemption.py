"""Stop cleanly on a time limit or preemption: every rank agrees on a step, all save, the job is requeued.

SLURM (through submitit's `#SBATCH --signal=USR2@N`) and submitit's local controller send SIGUSR2
to every task some seconds before the limit; SLURM preemption and torchrun send SIGTERM. submitit's
own handler calls `checkpoint()` on rank 0 only and exits at once, so the collective save would
never happen (rank 0 gone, the others blocked in a collective). PreemptionWatcher therefore
replaces those handlers in every rank with one that only records the signal, and

1. `should_stop()` (called by the engine at each step boundary) agrees on the flag with one
   all_reduce(MAX) of a one-element CPU tensor every `check_every` steps. A collective rather than
   a file on the shared folder: it needs no shared file system, costs microseconds on the gloo side
   group (no GPU sync, no metadata traffic on Lustre/NFS from thousands of ranks), and every rank
   gets the same answer at the same step by construction (a file can be seen by one rank one step
   before another, which would split the save). A file is still honoured as a second input, read by
   rank 0 only: `touch OUT/STOP` (what `launchers/sbatch_torchrun.sh` does on its signal, because
   torchrun itself dies of SIGUSR2) stops a run after the next step with a checkpoint.
2. main_pretrain saves collectively (engine returned False) and calls `finish()`, which, under
   submitit, does on rank 0 what submitit's handler would have done (checkpoint() ->
   DelayedSubmission dumped over the job pickle, `scontrol requeue` on SLURM), then exits every rank
   (exit code 144 is the local controller's "requeue me"). Outside submitit it returns normally:
   rerunning the same command resumes (`--auto_resume`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("mae_st.preemption")

STOP_FILE = "STOP"
LOCAL_REQUEUE_EXIT_CODE = 144  # submitit.local.local.LOCAL_REQUEUE_RETURN_CODE
_FILE, _SIGNAL = 1, 2  # flag levels: MAX over ranks keeps "a signal arrived somewhere"


class PreemptionWatcher:
    """Records SIGUSR2/SIGTERM, agrees on stopping across ranks, and requeues the job after the save."""

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        check_every: int = 1,
        signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM),
    ) -> None:
        self.check_every = max(1, check_every)
        self.stop_file = Path(output_dir) / STOP_FILE if output_dir else None
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.stopped = False  # set once all ranks agreed to stop
        self.reason = ""
        self._flag = 0
        self._calls = 0
        self._pid = os.getpid()
        self._group = None
        if self.distributed and dist.get_backend() != "gloo":
            # A CPU side group: reading the flag of an NCCL all_reduce would sync the GPU stream every check.
            self._group = dist.new_group(backend="gloo")
        # submitit's handler object (rank 0 needs it after the save to requeue the job its way).
        self._submitit = _submitit_handler(signal.getsignal(signal.SIGUSR2))
        self._previous: dict[int, Any] = {}
        for sig in signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def request_stop(self) -> None:
        """Stop at the next agreed step boundary, as a signal would (e.g. from a time budget)."""
        self._flag = _SIGNAL

    # ------------------------------------------------------------------ signal side (no I/O, no collectives)
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid or (self._flag == _SIGNAL and signum == signal.SIGTERM):
            # A forked DataLoader worker inherited this handler and must die as usual; a second SIGTERM
            # means "now" (e.g. a hung collective): both fall back to the default action.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._flag = _SIGNAL
        os.write(2, f"[rank{self.rank}] caught {signal.Signals(signum).name}: stopping after this step\n".encode())

    # ------------------------------------------------------------------ step boundary (collective)
    def should_stop(self) -> bool:
        """True on every rank once any rank saw a signal (or rank 0 a STOP file); collective every check_every calls."""
        self._calls += 1
        if self.stopped:
            return True
        if (self._calls - 1) % self.check_every:
            return False
        flag = self._flag
        if self.rank == 0 and self.stop_file is not None and self.stop_file.exists():
            flag = max(flag, _FILE)
        if self.distributed:
            t = torch.tensor([flag], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
            flag = int(t.item())
        if flag:
            self.stopped = True
            self.reason = "signal" if flag == _SIGNAL else f"{self.stop_file} exists"
            log.warning("all ranks stop at this step (%s); saving a checkpoint", self.reason)
        return self.stopped

    # ------------------------------------------------------------------ after the final save
    def close(self) -> None:
        """Give the signals back to whoever handled them before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def finish(self) -> None:
        """Call after the last save: requeue and exit under submitit if training was stopped, else return."""
        self.close()
        if not self.stopped:
            return
        if self.rank == 0 and self.stop_file is not None and self.stop_file.exists():
            self.stop_file.unlink()  # consumed: the resumed run must not stop at once
        submitit_handler = self._submitit
        if submitit_handler is None or self.reason != "signal":
            log.warning("stopped early (%s) with a checkpoint; rerun the same command to resume", self.reason)
            return
        requeue = self.rank != 0 or _dump_requeue(submitit_handler)  # rank 0 writes the new job pickle
        if self.distributed:
            dist.barrier()  # the pickle exists before any task exits (and before SLURM kills the step)
        if self.rank == 0 and requeue:
            env = submitit_handler.env
            if env.cluster != "local":
                env._requeue(_countdown(submitit_handler))  # SLURM: `scontrol requeue`; the job is killed and pends
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if not requeue:
            raise SystemExit("stopped by a signal, but the job could not be requeued (see the log above)")
        log.warning("exiting for requeue; the requeued job resumes from the checkpoint just written")
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(LOCAL_REQUEUE_EXIT_CODE)


def _submitit_handler(handler: Any) -> Any:
    """submitit's SignalHandler behind a saved USR2 handler, or None when not running under submitit."""
    owner = getattr(handler, "__self__", None)
    if owner is None or type(owner).__module__ != "submitit.core.job_environment":
        return None
    return owner


def _countdown(handler: Any) -> int:
    """Requeues left, counted as submitit does (only time-outs use one up, not preemptions)."""
    return handler._delayed._timeout_countdown - int(handler.has_timed_out())


def _dump_requeue(handler: Any) -> bool:
    """On rank 0: the job's checkpoint() as the next submission, as submitit's handler does; False if none."""
    from submitit.core import job_environment

    countdown = _countdown(handler)
    if countdown < 0:
        reason = "timed out too many times (--max_requeues)"
    else:  # calls the job's checkpoint() and writes its DelayedSubmission over the job pickle
        reason = job_environment._checkpoint(handler._delayed, handler._job_paths.submitted_pickle, countdown)
    if reason:
        log.error("not requeued: %s", reason)
        return False
    log.warning("requeue prepared (%d time-outs left)", countdown)
    return True
