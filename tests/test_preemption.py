"""PreemptionWatcher in-process: signals set a flag, ranks agree on one step, STOP file, requeue submission."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.preemption import STOP_FILE, PreemptionWatcher  # noqa: E402


def test_signal_sets_flag_and_finish_restores_handlers_outside_submitit(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    watcher = PreemptionWatcher(tmp_path)
    try:
        assert not watcher.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)  # handled on the main thread before kill() returns to Python code
        assert watcher.should_stop() and watcher.reason == "signal"
        assert watcher.should_stop()  # stays stopped
    finally:
        watcher.finish()  # not under submitit: returns (rerun the command to resume)
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_stops_too_and_check_every_spaces_the_checks(tmp_path: Path) -> None:
    watcher = PreemptionWatcher(tmp_path, check_every=3)
    try:
        assert not watcher.should_stop()  # call 1: checked
        os.kill(os.getpid(), signal.SIGTERM)
        assert not watcher.should_stop() and not watcher.should_stop()  # calls 2, 3: not checked
        assert watcher.should_stop()  # call 4: checked
    finally:
        watcher.close()


def test_stop_file_stops_and_is_consumed(tmp_path: Path) -> None:
    watcher = PreemptionWatcher(tmp_path)
    try:
        assert not watcher.should_stop()
        (tmp_path / STOP_FILE).touch()
        assert watcher.should_stop() and STOP_FILE in watcher.reason
    finally:
        watcher.finish()
    assert not (tmp_path / STOP_FILE).exists()  # a resumed run must not stop at once


def test_request_stop_stops_at_the_next_check(tmp_path: Path) -> None:
    watcher = PreemptionWatcher(tmp_path)
    try:
        assert not watcher.should_stop()
        watcher.request_stop()
        assert watcher.should_stop() and watcher.reason == "signal"
    finally:
        watcher.close()


def _rank_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    watcher = PreemptionWatcher(None)
    stopped_at = None
    for call in range(1, 20):
        if rank == 1 and call == 5:
            os.kill(os.getpid(), signal.SIGUSR2)  # only rank 1 sees the signal
        if watcher.should_stop():
            stopped_at = call
            break
    watcher.close()
    Path(out, f"rank{rank}").write_text(str(stopped_at))
    dist.destroy_process_group()


def test_ranks_agree_on_the_same_step_when_only_one_was_signalled(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "5"


def test_trainer_checkpoint_resubmits_the_same_run_resuming_from_latest() -> None:
    from launchers.slurm import Trainer

    args = argparse.Namespace(resume="/old/ckpt", auto_resume=False, lr=None, output_dir="/job")
    trainer = Trainer(args, "main_pretrain")
    delayed = trainer.checkpoint()
    nxt = delayed.function
    assert isinstance(nxt, Trainer) and nxt.main_module == "main_pretrain"
    assert nxt.args.resume == "" and nxt.args.auto_resume and nxt.args.output_dir == "/job"
    assert args.resume == "/old/ckpt"  # the running job's own args are left alone


def test_forked_child_dies_of_sigterm_as_usual(tmp_path: Path) -> None:
    """DataLoader workers fork with the watcher's handler: in them SIGTERM must still terminate."""
    watcher = PreemptionWatcher(tmp_path)
    try:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: wait to be killed; exit 0 would mean the signal was swallowed
            os.write(ready_w, b"1")  # signals that land inside fork() itself are dropped by Python: wait for this
            time.sleep(10)
            os._exit(0)
        os.read(ready_r, 1)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert not watcher.should_stop()  # the parent saw nothing
    finally:
        watcher.close()
