"""Segment sampling (SSv2's protocol) against hand-computed frame indices, on real VP9 .webm files; no-flip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets import VideoDataset
from datasets.decode import probe
from datasets.sampling import frame_count, segment_frame_indices
from datasets.synthetic import write_video
from tasks import finetune_parser
from tasks.classify import AugmentConfig, FinetuneConfig
from util.config import parse_args, section
from util.errors import DataFileError

LEVEL = 20  # frame i is a flat grey of i * LEVEL: its index survives lossy VP9


def level_video(path: Path, n: int, fps: int = 12, size: tuple[int, int] = (32, 48)) -> Path:
    """A VP9 .webm (SSv2's codec, 12 fps) whose frame i is flat grey i * LEVEL."""
    frames = np.empty((n, *size, 3), np.uint8)
    for i in range(n):
        frames[i] = i * LEVEL
    write_video(str(path), frames, fps=fps, codec="libvpx-vp9")
    return path


def frame_ids(clip) -> list[int]:
    """The frame index of each frame of a uint8 clip [C, T, H, W] of a `level_video`."""
    return [int(round(float(clip[:, t].float().mean()) / LEVEL)) for t in range(clip.shape[1])]


def test_segment_indices_equal_hand_computed_ones() -> None:
    # 10 frames, 4 segments of 2.5 frames: [0, 2.5), [2.5, 5), [5, 7.5), [7.5, 10)
    assert segment_frame_indices(10, 4).tolist() == [1, 3, 6, 8]  # middles 1.25, 3.75, 6.25, 8.75
    # two test views: VideoMAE's ssv2.py int(tick / 2 + tick * x) and int(tick * x) with tick = 2.5
    assert segment_frame_indices(10, 4, view=0, num_views=2).tolist() == [1, 3, 6, 8]
    assert segment_frame_indices(10, 4, view=1, num_views=2).tolist() == [0, 2, 5, 7]
    assert segment_frame_indices(48, 16).tolist() == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37, 40, 43, 46]
    # three views: offsets 1/2, 5/6 and 1/6 of a 2.5-frame segment
    assert segment_frame_indices(10, 4, view=1, num_views=3).tolist() == [2, 4, 7, 9]
    assert segment_frame_indices(10, 4, view=2, num_views=3).tolist() == [0, 2, 5, 7]
    # fewer frames than segments: frames repeat, in order
    assert segment_frame_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]


def test_training_draws_stay_in_their_segment_and_cover_it() -> None:
    rng = np.random.default_rng(0)
    draws = np.stack([segment_frame_indices(10, 4, rng) for _ in range(2000)])
    # segment i holds the frames with floor((i + u) * 2.5) for u in [0, 1): written out by hand
    assert [sorted(set(draws[:, i].tolist())) for i in range(4)] == [[0, 1, 2], [2, 3, 4], [5, 6, 7], [7, 8, 9]]
    again = np.random.default_rng(0)
    assert np.array_equal(draws[0], segment_frame_indices(10, 4, again))  # the sample's generator decides


@pytest.fixture(scope="module")
def webm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return level_video(tmp_path_factory.mktemp("segments") / "clip.webm", n=10)


def test_frame_count_of_a_webm(webm: Path) -> None:
    assert frame_count(probe(str(webm))) == 10


def dataset(webm: Path, mode: str, **kw) -> VideoDataset:
    return VideoDataset("", mode=mode, num_frames=4, crop_size=32, normalize=False, short_side_range=None,
                        samples=[(str(webm), 0)], frame_sampling="segment", **kw)


def test_test_views_decode_the_hand_computed_frames(webm: Path) -> None:
    ds = dataset(webm, "test", num_temporal_views=2, num_spatial_crops=3)
    assert len(ds) == 6
    got = {int(ds[i]["view"]) // 3: frame_ids(ds[i]["clips"][0]) for i in range(0, 6, 3)}
    assert got == {0: [1, 3, 6, 8], 1: [0, 2, 5, 7]}
    one = dataset(webm, "test", num_temporal_views=1, num_spatial_crops=1)
    assert frame_ids(one[0]["clips"][0]) == [1, 3, 6, 8]  # the middle frame of each segment


def test_training_clips_take_one_frame_per_segment(webm: Path) -> None:
    ds = dataset(webm, "finetune", repeat_aug=2, hflip=False)
    seen: list[set[int]] = [set() for _ in range(4)]
    for epoch in range(12):  # one video: the draws differ by epoch
        for clip in ds[(epoch, 0)]["clips"]:
            for i, f in enumerate(frame_ids(clip)):
                seen[i].add(f)
    assert all(seen[i] <= allowed for i, allowed in enumerate([{0, 1, 2}, {2, 3, 4}, {5, 6, 7}, {7, 8, 9}]))
    assert sum(len(s) for s in seen) > 4  # draws differ between items
    assert frame_ids(ds[(3, 0)]["clips"][0]) == frame_ids(ds[(3, 0)]["clips"][0])  # exact on a repeat


def test_unknown_frame_sampling_is_refused(webm: Path) -> None:
    with pytest.raises(DataFileError, match="frame_sampling"):
        VideoDataset("", samples=[(str(webm), 0)], frame_sampling="dense")


def test_no_hflip_never_mirrors(tmp_path: Path) -> None:
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    frames[:, :, 16:] = 240  # dark left half, bright right half: a flip swaps them
    path = tmp_path / "halves.webm"
    write_video(str(path), frames, fps=12, codec="libvpx-vp9")
    args = parse_args(finetune_parser(), ["--no-hflip", "--frame_sampling", "segment"])
    assert section(AugmentConfig, args).hflip is False
    assert section(FinetuneConfig, args).frame_sampling == "segment"

    def left_is_bright(hflip: bool) -> list[bool]:
        ds = VideoDataset("", mode="finetune", num_frames=4, crop_size=32, normalize=False, short_side_range=None,
                          scale=(1.0, 1.0), aspect=(1.0, 1.0), samples=[(str(path), 0)], hflip=hflip,
                          frame_sampling="segment")
        return [float(ds[(i, 0)]["clips"][0, :, :, :, :8].float().mean()) > 120 for i in range(16)]

    assert not any(left_is_bright(False))
    assert any(left_is_bright(True))  # the check can see a flip (2^-16 chance of none in 16 draws)
