"""rho clips on real files: R clips of one decode at distinct times, within the timespan limit, with the
geometry AMT reads, grouped by video after collate; and the canonical (whole-video) views of AMT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_helpers import read_counter, write_counter_video

from datasets import VideoDataset, collate_clips
from datasets.amt_views import CanonicalViews

FPS, FRAMES = 30, 90  # 3 s videos whose frames carry their index


@pytest.fixture(scope="module")
def video_list(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("rho")
    for name in ("a.mp4", "b.mp4"):
        write_counter_video(str(root / name), FRAMES, FPS, width=64, height=48, gop_size=15)
    (root / "train.csv").write_text("a.mp4 0\nb.mp4 1\n")
    return str(root)


def rho_dataset(root: str, **kw) -> VideoDataset:
    """Whole, unflipped frames (so each frame's index can be read back), 4 clips of 4 frames 2 apart."""
    return VideoDataset(f"{root}/train.csv", root, mode="pretrain", num_frames=4, sampling_rate=2, crop_size=32,
                        repeat_aug=4, scale=(1.0, 1.0), aspect=(1.33, 1.34), hflip=False, short_side_range=None,
                        normalize=False, **kw)


def frame_indices(clips: torch.Tensor) -> np.ndarray:
    """[R, T] frame indices read from uint8 clips [R, C, T, H, W]."""
    return np.array([[read_counter(clip[:, t].permute(1, 2, 0).numpy()) for t in range(clip.shape[1])]
                     for clip in clips])


def test_rho_clips_are_windows_of_one_video_at_distinct_times(video_list: str) -> None:
    ds = rho_dataset(video_list)
    spreads, same = [], 0
    for epoch in range(4):
        item = ds[(epoch, 1)]
        idx = frame_indices(item["clips"])
        assert (np.diff(idx, axis=1) == 2).all()  # each clip: 4 frames of one window, 2 frames apart
        starts = idx[:, 0]
        # Independent uniform times (as the study samples them): two may round to one frame, not all.
        assert len(set(starts.tolist())) >= 3, starts
        same += sum(int(a == b) for i, a in enumerate(starts) for b in starts[i + 1:])
        spreads.append(starts.max() - starts.min())
        # The geometry reports where each clip was cut: start (s) and the whole frame, unflipped.
        geo = item["geometry"]
        assert geo.shape == (4, 7) and item["index"].tolist() == [1] * 4
        np.testing.assert_allclose(geo[:, 0].numpy() * FPS, starts, atol=1.0)
        np.testing.assert_allclose(geo[:, 1].numpy(), (FRAMES - 1) / FPS, atol=1.5 / FPS)
        np.testing.assert_allclose(geo[:, 2:].numpy(), [[0, 0, 1, 1, 0]] * 4, atol=1e-6)
    assert max(spreads) > 30 and same <= 2  # unlimited: clips more than a second apart; few coincide


def test_timespan_limits_the_distance_between_clip_starts(video_list: str) -> None:
    ds = rho_dataset(video_list, clip_timespan=0.5)
    lows = []
    for epoch in range(6):
        starts = frame_indices(ds[(epoch, 0)]["clips"])[:, 0]
        assert starts.max() - starts.min() <= 0.5 * FPS + 1, starts  # within half a second (+1 frame rounding)
        lows.append(starts.min())
    assert max(lows) - min(lows) > 15  # the window itself moves over the video


def test_collated_rho_clips_stay_grouped_by_video(video_list: str) -> None:
    ds = rho_dataset(video_list)
    batch = collate_clips([ds[(0, 0)], ds[(0, 1)]])
    assert batch["index"].tolist() == [0] * 4 + [1] * 4 and batch["geometry"].shape == (8, 7)


def test_canonical_view_spans_the_whole_video(video_list: str) -> None:
    views = CanonicalViews([(f"{video_list}/a.mp4", 0)], num_frames=4, crop_size=32, normalize=False)
    item = views[0]
    assert item["clips"].shape == (1, 3, 4, 32, 32) and item["valid"].tolist() == [True]
    # first to last frame, evenly: the frames shown at linspace(0, 89 / 30, 4) s
    assert frame_indices(item["clips"])[0].tolist() == np.floor(np.linspace(0, 89, 4) + 1e-6).astype(int).tolist()
