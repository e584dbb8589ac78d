"""Fork-safe data loading: forkserver workers after the parent used PyAV, cheap pickling, decode threads.

The hazard (a forked worker deadlocks in FFmpeg) shows with PyAV 19 on Python >= 3.12; `.ci/run` also
runs this file in a Python 3.12 venv, where `fork` hangs, so the default cannot drift back unseen.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_helpers import write_counter_video

from datasets.decode import NotARegularFile, decode_frames
from datasets.loader import (
    MP_CONTEXTS,
    SHM_DIR,
    DataTimeoutError,
    batches,
    build_loader,
    check_shared_memory,
    clip_batch_bytes,
    decode_threads_for,
    usable_cores,
)
from datasets.video_dataset import VideoDataset, collate_clips

ROOT = Path(__file__).resolve().parents[1]


def test_loader_after_parent_used_pyav_finishes_with_forkserver(tmp_path: Path) -> None:
    """The parent encodes and decodes with FFmpeg threads, then 2 workers decode real files, in time."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "fork_loader.py"), str(tmp_path), "forkserver"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "context=forkserver batches=4" in proc.stdout


FORKED_CHILD_DECODES = """
import os, sys
from datasets.decode import decode_frames
path = sys.argv[1]
decode_frames(path, [0.1, 0.5], threads=1)  # the parent converts frames to RGB first ...
pid = os.fork()
if pid == 0:  # ... then a forked child (`--mp_context fork`, or a user's own fork) converts its own
    frames, _, _ = decode_frames(path, [0.2, 0.6], threads=1)
    print("child frames", len(frames), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_converts_frames_after_the_parent_did(tmp_path: Path) -> None:
    """The RGB conversion's reused swscale context must not follow a fork into the child."""
    # A context with swscale's own thread pool (FFmpeg >= 7.1) deadlocked a forked child that reused it.
    path = write_counter_video(str(tmp_path / "v.mp4"), 24)
    proc = subprocess.run([sys.executable, "-c", FORKED_CHILD_DECODES, path], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "child frames 2" in proc.stdout


def test_the_default_start_method_is_forkserver_everywhere() -> None:
    """Both mains and the loader builder default to forkserver; a bad choice is refused by name."""
    import inspect

    from main_finetune import get_args_parser as finetune_parser
    from main_pretrain import get_args_parser as pretrain_parser
    from util.config import parse_args

    for parser in (pretrain_parser(), finetune_parser()):
        assert parse_args(parser, [], default_config=None).mp_context == "forkserver"
    assert inspect.signature(build_loader).parameters["mp_context"].default == "forkserver"
    assert MP_CONTEXTS[0] == "forkserver"
    with pytest.raises(ValueError, match="mp_context must be one of"):
        build_loader([], None, 1, None, num_workers=1, mp_context="thread")


def test_loader_uses_the_context_asked_for() -> None:
    """The DataLoader's workers start with the method named (spawn here: no fork anywhere)."""
    loader = build_loader(list(range(4)), None, 2, None, num_workers=1, mp_context="spawn")
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    assert build_loader(list(range(4)), None, 2, None, num_workers=0).multiprocessing_context is None


def test_dataset_pickles_cheaply_and_still_decodes(tmp_path: Path) -> None:
    """What each worker receives: paths and settings only (no open container, no frames), ~100 B per video."""
    write_counter_video(str(tmp_path / "v.mp4"), 30, 30, width=48, height=32)
    n = 2000
    (tmp_path / "train.csv").write_text("".join(f"v.mp4 {i % 7}\n" for i in range(n)))
    ds = VideoDataset(str(tmp_path / "train.csv"), str(tmp_path), num_frames=4, sampling_rate=2, crop_size=32,
                      short_side_range=None)
    ds[0]  # a decode in the parent leaves nothing behind in the object
    blob = pickle.dumps(ds)
    assert len(blob) < 60_000 + 120 * n, len(blob)
    assert b"av." not in blob and b"ndarray" not in blob
    clone = pickle.loads(blob)
    assert clone[(0, 5)]["clips"].shape == ds[(0, 5)]["clips"].shape


def test_decode_threads_fit_the_cores() -> None:
    """One FFmpeg thread per worker when the workers fill the cores; an explicit count wins."""
    cores = usable_cores()
    assert decode_threads_for(num_workers=cores) == 1
    assert decode_threads_for(num_workers=4 * cores) == 1
    assert decode_threads_for(num_workers=1) == cores
    assert decode_threads_for(num_workers=0) == cores  # decoding in the main process
    assert decode_threads_for(num_workers=1, local_world_size=cores) == 1
    assert decode_threads_for(num_workers=8, requested=3) == 3


def test_threaded_decode_gives_the_same_frames(tmp_path: Path) -> None:
    """FFmpeg frame threads change speed, never content: the same frames at the same times."""
    path = write_counter_video(str(tmp_path / "t.mp4"), 90, 30, width=64, height=48, gop_size=30)
    times = np.array([0.5, 1.1, 1.2, 2.5])
    one, t1, _ = decode_frames(path, times, threads=1)
    four, t4, _ = decode_frames(path, times, threads=4)
    np.testing.assert_array_equal(one, four)
    np.testing.assert_array_equal(t1, t4)


@pytest.mark.parametrize("normalize", [False, True])
def test_the_batch_size_estimate_is_the_batch_the_loader_makes(tmp_path: Path, normalize: bool) -> None:
    """The shared-memory check sizes a batch from the dataset's geometry: it must be the real batch's size."""
    path = write_counter_video(str(tmp_path / "v.mp4"), 40)
    (tmp_path / "list.csv").write_text(f"{path} 0\n{path} 1\n{path} 2\n")
    ds = VideoDataset(str(tmp_path / "list.csv"), num_frames=4, sampling_rate=2, crop_size=32, repeat_aug=2,
                      normalize=normalize)
    batch = next(iter(build_loader(ds, range(3), 3, collate_clips, num_workers=0)))
    assert clip_batch_bytes(ds, 3) == batch["clips"].nbytes


@pytest.mark.skipif(not Path(SHM_DIR).is_dir(), reason="no /dev/shm on this platform")
def test_shared_memory_too_small_for_the_batches_in_flight_is_refused_with_the_fix() -> None:
    """Workers x prefetch batches that cannot fit in /dev/shm are refused before any work, naming the fix."""
    st = os.statvfs(SHM_DIR)
    capacity = st.f_blocks * st.f_frsize
    slots = 2 * (14 * 4 + 2)  # 2 ranks, 14 workers, prefetch 4, + the batch in the step and one spare
    fits = capacity // (4 * slots)
    assert check_shared_memory(fits, 14, 4, processes=2) == slots * fits
    with pytest.raises(RuntimeError, match=r"shared memory too small.*--shm-size=\d+g.*--num_workers"):
        check_shared_memory(capacity // slots + 1, 14, 4, processes=2)
    assert check_shared_memory(capacity, num_workers=0, prefetch_factor=4) == 0  # no workers: nothing shared


@pytest.mark.skipif(not Path(SHM_DIR).is_dir(), reason="no /dev/shm on this platform")
def test_pretraining_refuses_workers_that_would_overflow_shared_memory_before_any_step(tmp_path: Path) -> None:
    """main_pretrain.py stops at the loader with the fix, before a step, a log line or a checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "main_pretrain.py"), "--output_dir", str(out),
                           "--synthetic_videos", "8", "--input_size", "32", "--num_frames", "4", "--pred_t_dim", "2",
                           "--batch_size", "2", "--num_workers", "1", "--prefetch_factor", str(10**9),
                           "--decoder_embed_dim", "64", "--decoder_depth", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "shared memory too small for the DataLoader" in proc.stderr and "--shm-size=" in proc.stderr
    assert not (out / "log.jsonl").exists() or '"loss"' not in (out / "log.jsonl").read_text()
    assert not list(out.glob("checkpoint*"))


def test_fifo_in_the_list_is_skipped_and_counted_through_a_worker(tmp_path: Path) -> None:
    """A FIFO named .mp4 is never opened (av.open would wait for a writer forever): bounded by construction."""
    good = write_counter_video(str(tmp_path / "good.mp4"), 12)
    os.mkfifo(tmp_path / "fifo.mp4")
    (tmp_path / "train.csv").write_text("fifo.mp4 0\ngood.mp4 1\n")
    ds = VideoDataset(str(tmp_path / "train.csv"), str(tmp_path), num_frames=2, crop_size=16)
    loader = build_loader(ds, [0, 1], 2, collate_clips, num_workers=1, timeout=120)
    [batch] = list(batches(loader))
    assert batch["failures"] == 1 and batch["failed_paths"] == [str(tmp_path / "fifo.mp4")]
    assert batch["index"].tolist() == [1, 1]  # the FIFO's item was replaced by a readable video
    with pytest.raises(NotARegularFile, match=r"fifo\.mp4 is a FIFO \(named pipe\), not a regular file"):
        decode_frames(str(tmp_path / "fifo.mp4"), [0.0])
    assert good


class StalledReadDataset(VideoDataset):
    """Reads each file with a plain open() first: a FIFO then blocks as a file on a stalled mount would."""

    def _clips(self, path, rng, view):
        with open(path, "rb") as f:
            f.read(1)
        return super()._clips(path, rng, view)


def test_worker_stuck_in_a_read_stops_the_run_naming_the_file(tmp_path: Path) -> None:
    """--data_timeout: no batch within the bound -> DataTimeoutError naming the file the worker is on."""
    os.mkfifo(tmp_path / "stalled.mp4")
    (tmp_path / "train.csv").write_text("stalled.mp4 0\n")
    ds = StalledReadDataset(str(tmp_path / "train.csv"), str(tmp_path), num_frames=2, crop_size=16)
    # fork: the worker starts in milliseconds (it never touches FFmpeg), well inside the timeout
    loader = build_loader(ds, [0], 1, collate_clips, num_workers=1, mp_context="fork", timeout=5)
    try:
        with pytest.raises(DataTimeoutError, match=r"--data_timeout 5 s: the workers were reading \[.*stalled\.mp4'\]"):
            next(batches(loader))
    finally:  # release the blocked reader (a writer end opened and closed gives it EOF), if it still lives
        try:
            os.close(os.open(tmp_path / "stalled.mp4", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader left: the loader already stopped its worker
            pass


@pytest.mark.parametrize("what", ["classification", "video-text"])
def test_worker_stuck_in_a_read_stops_a_test_naming_the_file(tmp_path: Path, what: str) -> None:
    """The multi-view test loops (fine-tuning's and video-text retrieval's) stop like training does: the file named."""
    import torch

    from tasks.videotext_eval import embed_videos
    from util.evaluate import evaluate

    os.mkfifo(tmp_path / "stalled.mp4")
    (tmp_path / "val.csv").write_text("stalled.mp4 0\n")
    ds = StalledReadDataset(str(tmp_path / "val.csv"), str(tmp_path), mode="test", num_frames=2, crop_size=16)
    loader = build_loader(ds, [0], 1, collate_clips, num_workers=1, mp_context="fork", timeout=5)
    model = torch.nn.Flatten()
    run = (lambda: evaluate(model, loader, 1, 3, torch.device("cpu"))) if what == "classification" else (
        lambda: embed_videos(model, loader, 1, torch.device("cpu")))
    try:
        with pytest.raises(DataTimeoutError, match=r"--data_timeout 5 s: the workers were reading \[.*stalled\.mp4'\]"):
            run()
    finally:
        try:
            os.close(os.open(tmp_path / "stalled.mp4", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
