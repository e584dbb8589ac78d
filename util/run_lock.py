"""One run per output folder: rank 0 holds an advisory lock on OUT/run.lock for the run's lifetime.

Two runs writing one folder corrupt each other (the logger trims the other's log.jsonl, the
checkpointer removes the other's in-flight *.tmp save), so a second run refuses at once and names the
holder (host, pid, start time, job), written into the lock file. The lock is `fcntl.flock` on an open
file: the kernel drops it when the process dies, so a SIGKILLed run never blocks the next one.

A requeue of the same job (same SLURM_JOB_ID or SUBMITIT_LOCAL_JOB_ID) whose old process is gone but
whose lock is still held (an NFS lock lease not yet expired, or a leftover child still holding the
file) takes the lock over: it locks a fresh file and renames it over the old one, so every later
run locks the new file. Lockers check after locking that the file they locked is still the one at
the path, so a takeover never lets two runs in.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from util.errors import MaeError

log = logging.getLogger("mae_st.run_lock")
LOCK_FILE = "run.lock"
JOB_ID_VARS = ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID")


class RunLockedError(MaeError, RuntimeError):
    """The output folder is in use by another run (named in the message)."""


def current_job_id() -> str | None:
    """The scheduler's job id of this process (SLURM or submitit's local executor), if any."""
    return next((os.environ[v] for v in JOB_ID_VARS if os.environ.get(v)), None)


def _alive(pid: int) -> bool:
    """True if a process with this pid exists on this host."""
    if pid <= 0:  # no pid recorded (kill(-1) or kill(0) would address whole process groups)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(path: Path) -> dict:
    """The holder's record in the lock file ({} if empty or unreadable)."""
    try:
        data = json.loads(path.read_text(errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    """'host pid N, started T (job J)' for a lock file's record."""
    if not holder:
        return "an unknown process (the lock file holds no record)"
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')}, started {holder.get('start', '?')}{job}"


class RunLock:
    """The held lock on `OUT/run.lock`; `release()` (or the process's death) frees it."""

    def __init__(self, fd: int, path: Path, record: dict):
        self.fd, self.path, self.record = fd, path, record

    def release(self) -> None:
        """Unlock and close (idempotent)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _write_record(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)


def _try_lock(path: Path) -> int | None:
    """An fd holding the lock on the file now at `path`, or None if another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # a takeover replaced the file between our open and our lock: lock the new one


def acquire_run_lock(output_dir: str | os.PathLike, job_id: str | None = None) -> RunLock:
    """Lock `output_dir` for this run or raise RunLockedError naming the holder (see the module doc).

    `job_id`: this run's scheduler job id (default: from the environment); a holder with the same id
    whose process is gone is this job's previous incarnation, and its lock is taken over.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise RunLockedError(f"{path} is not a regular file: remove it (it is the run lock of {out})")
    job_id = job_id if job_id is not None else current_job_id()
    host = socket.gethostname()
    record = {"host": host, "pid": os.getpid(), "start": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "job_id": job_id, "command": " ".join(sys.argv)[:500]}
    fd = _try_lock(path)
    if fd is None:
        holder = _read_holder(path)
        same_job = job_id is not None and holder.get("job_id") == job_id
        pid = holder.get("pid")
        gone = holder.get("host") != host or not _alive(pid if isinstance(pid, int) else -1)
        if not (same_job and gone):
            raise RunLockedError(
                f"{out} is in use by another run: {_describe(holder)} holds {path}. Two runs in one folder "
                f"overwrite each other's log and checkpoints: wait for it, stop it, or give this run another "
                f"--output_dir (the lock dies with its process, so a killed run never blocks the next)")
        log.warning("taking over %s from this job's previous run (%s), whose process is gone", path, _describe(holder))
        tmp = out / f"{LOCK_FILE}.{host}.{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else has it
        _write_record(fd, record)
        os.replace(tmp, path)
        return RunLock(fd, path, record)
    _write_record(fd, record)
    return RunLock(fd, path, record)
