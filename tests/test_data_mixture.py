"""Weighted data mixtures: the epoch's draw from (seed, epoch), one source per batch, exact resume on any
world size, per-source failure policy, strict mixture files, and a 2-step main_pretrain.py run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.mixture import (
    Mixture,
    MixtureDataset,
    MixtureSource,
    SourceFailures,
    blocks_per_source,
    draw_epoch,
    load_mixture,
)
from datasets.sampler import ResumableDistributedSampler
from datasets.synthetic import ensure_synthetic_dataset
from util.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LENGTHS, WEIGHTS, BLOCK = (10, 7, 30), (None, None, 2.0), 4  # two 'once' sources and a weighted one


def _draw(epoch: int, seed: int = 5, weighted_items: int | None = 24) -> tuple[np.ndarray, ...]:
    return draw_epoch(seed, epoch, LENGTHS, WEIGHTS, BLOCK, weighted_items)


def _global_sequence(world: int, batch: int, epoch: int, consumed: int = 0) -> tuple[list[int], list[list[int]]]:
    """Positions per global step as the trainer reads them (ranks in order), and every rank micro-batch."""
    n = sum(blocks_per_source(LENGTHS, WEIGHTS, BLOCK, 24)) * BLOCK
    samplers = [ResumableDistributedSampler(n, world, r, shuffle=False, seed=5, batch_size=batch)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
        s.set_consumed(consumed)
    per_rank = [[i for _, i in s] for s in samplers]
    steps = len(per_rank[0]) // batch
    batches = [p[k * batch:(k + 1) * batch] for k in range(steps) for p in per_rank]
    return [i for b in batches for i in b], batches


def test_the_draw_is_a_function_of_seed_and_epoch() -> None:
    first, again = _draw(3), _draw(3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[1], _draw(4)[1])  # another epoch, another draw
    assert not np.array_equal(first[1], draw_epoch(6, 3, LENGTHS, WEIGHTS, BLOCK, 24)[1])  # another seed
    assert len(first[0]) == len(_draw(4)[0]) == (3 + 2 + 6) * BLOCK  # the same length every epoch


def test_once_sources_use_every_video_and_every_block_is_one_source() -> None:
    source, video, passes = _draw(2)
    assert all(len(set(source[k:k + BLOCK].tolist())) == 1 for k in range(0, len(source), BLOCK))
    for s, n in ((0, 10), (1, 7)):
        mine = source == s
        assert sorted(video[mine & (passes == 0)].tolist()) == list(range(n))  # each video once ...
        assert mine.sum() - n < BLOCK  # ... plus fewer than a block of repeats, which are other samples
        assert (passes[mine][n:] == 1).all()


def test_weights_are_respected_exactly_and_every_video_equally_over_epochs() -> None:
    lengths, weights = (50, 30), (0.7, 0.3)
    assert blocks_per_source(lengths, weights, 10, 1000) == [70, 30]
    counts = np.zeros((2, 50), dtype=int)
    for epoch in range(3):
        source, video, _ = draw_epoch(0, epoch, lengths, weights, 10, 1000)
        assert np.bincount(source).tolist() == [700, 300]  # exactly the weights' shares, every epoch
        np.add.at(counts, (source, video), 1)
    assert (counts[0] == 42).all()  # 2100 draws of 50 videos: 42 passes, each video once per pass
    assert (counts[1, :30] == 30).all() and (counts[1, 30:] == 0).all()
    assert blocks_per_source((5, 5, 5), (1.0, 1.0, 1.0), 1, 10) == [4, 3, 3]  # largest remainder, ties to the first


@pytest.mark.parametrize("epoch", [0, 1])
def test_world_size_one_and_two_consume_the_same_global_sequence_in_single_source_batches(epoch: int) -> None:
    one, batches_one = _global_sequence(1, 4, epoch)
    two, batches_two = _global_sequence(2, 2, epoch)
    four_of_one, _ = _global_sequence(4, 1, epoch)
    assert one == two == four_of_one and sorted(one) == list(range(len(_draw(epoch)[0])))
    source = _draw(epoch)[0]
    for b in batches_one + batches_two:
        assert len(set(source[b].tolist())) == 1, "a rank's batch mixes sources"


@pytest.mark.parametrize("before,after", [((1, 4), (1, 4)), ((2, 2), (1, 4)), ((1, 4), (2, 2)), ((2, 2), (4, 1))])
def test_mid_epoch_resume_continues_exactly_on_any_world_size(before: tuple[int, int], after: tuple[int, int]) -> None:
    full, _ = _global_sequence(*before, epoch=1)
    consumed = 3 * 4  # three steps of a global batch of 4, then SIGKILL
    rest, batches = _global_sequence(*after, epoch=1, consumed=consumed)
    assert full[:consumed] + rest == full
    source = _draw(1)[0]
    assert all(len(set(source[b].tolist())) == 1 for b in batches)


# ---------------------------------------------------------------- datasets over generated videos

@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two generated sets (8 videos each, 32 px, different seeds) in a test cache."""
    cache = str(tmp_path_factory.mktemp("cache"))
    a = ensure_synthetic_dataset(cache, num_videos=8, size=32, frames=24, seed=1)
    b = ensure_synthetic_dataset(cache, num_videos=8, size=32, frames=24, seed=2)
    return Path(a), Path(b)


def _write_mixture(path: Path, a: Path, b: Path, block: int = 2, extra: str = "") -> Path:
    path.write_text(f"""block_size: {block}
weighted_items: 6
sources:
  - name: small
    list_file: {a}/train.csv
    weight: once
    sampling_rate: 2
    repeat_aug: 1
  - name: other
    list_file: {b}/train.csv
    weight: 1.5
    target_fps: 15
    repeat_aug: 2
    max_failure_rate: 0.2
{extra}""")
    return path


def test_mixture_items_follow_the_draw_with_each_sources_sampling(two_sources: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    from datasets.video_dataset import VideoDataset

    mixture = load_mixture(str(_write_mixture(tmp_path / "mix.yaml", *two_sources)))
    datasets = [VideoDataset(s.list_file, s.root, num_frames=4, crop_size=16, short_side_range=None, seed=5,
                             **s.sampling) for s in mixture.sources]
    ds = MixtureDataset(mixture, datasets, seed=5)
    assert len(ds) == (3 + 3) * 2  # 6 videos of 'small' in blocks of 2; 6 weighted items of 'other'
    source, video, _ = ds.draw(0)
    for pos in (0, 1, len(ds) - 1):
        item = ds[(0, pos)]
        s = int(source[pos])
        assert item["clips"].shape[0] == (1, 2)[s] and (item["source"] == s).all()
        assert int(item["index"][0]) == int(video[pos])
        assert torch.equal(item["clips"], ds[(0, pos)]["clips"])  # a function of (seed, epoch, position)
    assert ds.counts(0, 4) == {"small": int((source[:4] == 0).sum()), "other": int((source[:4] == 1).sum())}
    assert ds.describe().startswith("small: 6 videos, 6 items/epoch (each once), sampling_rate 2")


def test_failure_policy_applies_per_source_and_a_mixed_batch_is_refused() -> None:
    tracker = SourceFailures(["good", "bad"], [0.5, 0.1], "mix.yaml")
    batch = {"source": torch.zeros(4, dtype=torch.long), "attempts": 60, "failures": 20}
    tracker.update_from_batch(batch)  # 33% of 'good' fails: under its 50% limit
    batch = {"source": torch.ones(4, dtype=torch.long), "attempts": 60, "failures": 20, "failed_paths": ["x.mp4"]}
    with pytest.raises(RuntimeError, match=r"source 'bad' of mix.yaml: video decode failure rate 33.3%.*x.mp4.*"
                                           r"the source's max_failure_rate \(mix.yaml\)"):
        tracker.update_from_batch(batch)
    assert tracker.rates()["good"] == pytest.approx(1 / 3)
    with pytest.raises(RuntimeError, match="several mixture sources"):
        tracker.update_from_batch({"source": torch.tensor([0, 1]), "attempts": 2, "failures": 0})


# ---------------------------------------------------------------- malformed mixture files

BAD_FILES = [
    ("colour: red\nblock_size: 2\nsources: []\n", "unknown key 'colour'"),
    ("block_size: 2\nsources: []\n", "sources: expected a non-empty list"),
    ("sources:\n  - {name: a, list_file: LIST, weight: once}\n", "missing key 'block_size'"),
    ("block_size: 0\nsources:\n  - {name: a, list_file: LIST, weight: once}\n", "block_size: expected an integer"),
    ("block_size: 2\nsources:\n  - {name: a, list_file: LIST, weight: once, stride: 3}\n",
     r"sources\[0\]: unknown key 'stride'"),
    ("block_size: 2\nsources:\n  - {name: a, list_file: LIST}\n", r"sources\[0\]: missing key 'weight'"),
    ("block_size: 2\nsources:\n  - {name: a, list_file: LIST, weight: -1}\n", r"source 'a'.weight: expected a positive"),
    ("block_size: 2\nsources:\n  - {name: a, list_file: nowhere.csv, weight: once}\n",
     r"source 'a'.list_file: .*nowhere.csv is not a file"),
    ("block_size: 2\nsources:\n  - {name: a, list_file: LIST, weight: once, root: /no/such/dir}\n",
     r"source 'a'.root: /no/such/dir is not a folder"),
    ("block_size: 2\nsources:\n  - {name: a, list_file: LIST, weight: once, repeat_aug: true}\n",
     r"source 'a'.repeat_aug: expected an integer >= 1"),
    ("block_size: 2\nsources:\n  - {name: a, list_file: LIST, weight: once, frame_sampling: random}\n",
     r"source 'a'.frame_sampling: expected one of stride, segment"),
    ("block_size: 2\nsources:\n  - {name: a, list_file: LIST, weight: 1, max_failure_rate: 2}\n",
     r"source 'a'.max_failure_rate: expected a number in \[0, 1\]"),
    ("block_size: 2\nsources:\n  - {name: a, list_file: LIST, weight: once}\n  - {name: a, list_file: LIST, "
     "weight: 1}\n", "source name 'a' appears twice"),
    ("block_size: 2\nweighted_items: 5\nsources:\n  - {name: a, list_file: LIST, weight: once}\n",
     "weighted_items: no source has a numeric weight"),
    ("block_size: 2\nsources:\n  - {name: 'a b', list_file: LIST, weight: once}\n", r"sources\[0\].name: expected"),
]


@pytest.mark.parametrize("text,message", BAD_FILES, ids=[m.split(":")[0][:30] for _, m in BAD_FILES])
def test_malformed_mixture_files_are_refused_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "list.csv").write_text("v.mp4 0\n")
    path = tmp_path / "mix.yaml"
    path.write_text(text.replace("LIST", "list.csv"))
    with pytest.raises(ConfigError, match=message) as info:
        load_mixture(str(path))
    assert str(path) in str(info.value)


def test_a_good_file_resolves_paths_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.csv").write_text("v.mp4 0\n")
    path = tmp_path / "mix.yaml"
    path.write_text("block_size: 8\nsources:\n  - {name: a, list_file: lists/a.csv, weight: 2, target_fps: 24}\n")
    assert load_mixture(str(path)) == Mixture(str(path), (MixtureSource(
        "a", str(tmp_path / "lists" / "a.csv"), str(tmp_path / "lists"), 2.0, {"target_fps": 24}, None),), 8, None)


def test_batch_size_must_divide_block_size_and_data_path_is_refused(tmp_path: Path) -> None:
    import main_pretrain
    import tasks

    (tmp_path / "a.csv").write_text("v.mp4 0\n")
    mix = tmp_path / "mix.yaml"
    mix.write_text("block_size: 6\nsources:\n  - {name: a, list_file: a.csv, weight: once}\n")
    args = tasks.parse("pretrain", ["--data_mixture", str(mix), "--batch_size", "4"])
    with pytest.raises(ConfigError, match=r"mix.yaml: block_size 6 is not a multiple of --batch_size 4"):
        main_pretrain.build_task(args)
    args = tasks.parse("pretrain", ["--data_mixture", str(mix), "--batch_size", "3", "--data_path", str(tmp_path)])
    with pytest.raises(ConfigError, match="leave out --data_path"):
        main_pretrain.build_task(args)


# ---------------------------------------------------------------- end to end

@pytest.mark.slow  # ~18 s on 2 cores: a process start, a model, two steps
def test_main_pretrain_data_mixture_runs_two_steps_and_logs_per_source_counts(two_sources: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    mix = _write_mixture(tmp_path / "mix.yaml", *two_sources)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "main_pretrain.py"), "--data_mixture", str(mix), "--output_dir", str(out),
           "--input_size", "32", "--num_frames", "4", "--pred_t_dim", "2", "--batch_size", "2", "--num_workers", "0",
           "--log_every", "1", "--max_steps", "2", "--decoder_embed_dim", "32", "--decoder_depth", "1",
           "--model", "mae_vit_micro_patch8", "--vis_every", "0", "--precision", "fp32", "--save_every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data mixture small: 6 videos, 6 items/epoch (each once), sampling_rate 2" in proc.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # the epoch's first 2 * step items, counted per source from the draw
        assert r["items/small"] + r["items/other"] == 2 * r["step"]
        assert r["bad_rate/small"] == r["bad_rate/other"] == 0.0
