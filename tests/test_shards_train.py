"""Training from tar shards end to end (slow: each test runs main_pretrain.py): local shards, shards over a
loopback HTTP server read by range requests, the video-text objective on captioned shards, and a two-source
mixture of files and shards resumed exactly after SIGKILL and on another world size."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.range_server import RangeServer
from datasets.shard_writer import write_shards
from datasets.synthetic import ensure_synthetic_dataset
from tests.test_pretrain import FAST, ROOT, command, env, kill_at_checkpoint, losses

pytestmark = pytest.mark.slow
RUN = [a for a in FAST if a != "--synthetic_videos" and a != "24"] + [
    "--precision", "fp32", "--vis_every", "0", "--model", "mae_vit_micro_patch8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Generated videos (6 in train.csv) and the same videos packed into captioned shards of ~100 KB."""
    videos = Path(ensure_synthetic_dataset(str(tmp_path_factory.mktemp("cache")), num_videos=8, size=32, frames=24,
                                           seed=1))
    listed = tmp_path_factory.mktemp("list") / "train.txt"
    rows = [ln.split() for ln in (videos / "train.csv").read_text().split("\n") if ln.strip()]
    listed.write_text("".join(f"{videos / p} {label} a clip that moves, number {i}\n"
                              for i, (p, label) in enumerate(rows)))
    shards = tmp_path_factory.mktemp("shards")
    write_shards(str(listed), str(shards), 100 << 10)
    return videos, shards


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_pretrain_from_local_shards_with_a_data_worker(data: tuple[Path, Path], tmp_path: Path) -> None:
    _, shards = data
    out = tmp_path / "run"
    _run(command(out, 1, ["--data_path", str(shards), "--max_steps", "1", "--save_every", "0"] + RUN
                 + ["--num_workers", "1"]))  # the dataset (and its byte reader) pickled to a worker
    assert sorted(losses(out)) == [1]


def test_pretrain_from_http_shards_reads_members_by_range(data: tuple[Path, Path], tmp_path: Path) -> None:
    _, shards = data
    total = sum(p.stat().st_size for p in shards.glob("*.tar"))
    with RangeServer(str(shards)) as server:
        pattern = server.url(f"{{000000..{len(list(shards.glob('*.tar'))) - 1:06d}}}.tar")
        out = tmp_path / "run"
        _run(command(out, 1, ["--data_path", pattern, "--max_steps", "1", "--save_every", "0"] + RUN))
        served = server.bytes_served
    assert sorted(losses(out)) == [1]
    # indexes and the two videos of one step (plus the demo clip of the first batch): far below the shards' size
    assert 0 < served < total / 2, (served, total)


def test_videotext_trains_from_shard_captions(data: tuple[Path, Path], tmp_path: Path) -> None:
    _, shards = data
    out = tmp_path / "vt"
    _run(command(out, 1, ["--objective", "videotext", "--data_path", str(shards), "--max_steps", "2",
                          "--save_every", "0", "--tokenizer", "byte", "--text_depth", "1", "--context_length", "24",
                          "--input_size", "32", "--num_frames", "4", "--repeat_aug", "1", "--batch_size", "2",
                          "--num_workers", "0", "--log_every", "1", "--precision", "fp32",
                          "--model", "mae_vit_micro_patch8"], fast=[]))
    assert sorted(losses(out)) == [1, 2]


def _mixture(tmp_path: Path, videos: Path, shards: Path) -> Path:
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"block_size: 2\nweighted_items: 6\nsources:\n"
                   f"  - {{name: files, list_file: {videos}/train.csv, weight: once}}\n"
                   f"  - {{name: sharded, shards: {shards}/train.shards, weight: 1, sampling_rate: 2}}\n")
    return mix


def test_mixture_of_files_and_shards_resumes_exactly_after_sigkill(data: tuple[Path, Path], tmp_path: Path) -> None:
    videos, shards = data
    args = ["--data_mixture", str(_mixture(tmp_path, videos, shards)), "--epochs", "1", "--save_every", "3"] + RUN
    ref = tmp_path / "ref"
    _run(command(ref, 1, args))
    expected = losses(ref)
    assert sorted(expected) == list(range(1, 7))  # 12 items (6 per source) = 6 steps per epoch
    out = tmp_path / "killed"
    kill_at_checkpoint(command(out, 1, args), out, 3)  # mid-epoch
    _run(command(out, 1, args))
    got = losses(out)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6 * max(1.0, abs(loss)), (step, got[step], loss)


@pytest.mark.parametrize(("before", "kill_step", "after"), [(2, 1, 1), (1, 2, 2)], ids=["2to1", "1to2"])
def test_mixture_of_files_and_shards_resumes_on_another_world_size(data: tuple[Path, Path], tmp_path: Path,
                                                                   before: int, kill_step: int, after: int) -> None:
    videos, shards = data
    args = ["--data_mixture", str(_mixture(tmp_path, videos, shards)), "--epochs", "1", "--save_every", "1"] + RUN
    out = tmp_path / "run"
    kill_at_checkpoint(command(out, before, args), out, kill_step)  # 4 of the epoch's 12 items (2 clips per rank)
    _run(command(out, after, args))  # the rest on the other world size
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    assert last["items/files"] == 6 and last["items/sharded"] == 6  # every item of the epoch's draw, once
    assert last["epoch"] == 1.0  # the epoch ended where its 12 items end
    assert os.path.islink(out / "checkpoints" / "latest")
