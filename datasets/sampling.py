"""Segment-based frame sampling (TSN style), the protocol of Something-Something v2 fine-tuning.

The video's N frames are split into T equal segments (segment i covers frames [i N / T, (i + 1) N / T));
one frame is taken from each. Training draws it uniformly inside its segment from the sample's own
generator; testing takes it at a fixed offset in every segment. Test view k of K uses the offset
(1/2 + k/K) mod 1 of a segment: one view is the middle frame of each segment (PySlowFast's SSv2 test),
and two views are the segment starts and middles, exactly VideoMAE's `--test_num_segment 2` (ssv2.py:240-245).
Frame indices become times `i / fps`, which the decoder turns back into exactly frame i (constant rate).
"""

from __future__ import annotations

import numpy as np

from .decode import VideoInfo

FRAME_SAMPLINGS = ("stride", "segment")  # stride: MAE-ST's clips of frames `sampling_rate` apart at 30 fps


def frame_count(info: VideoInfo) -> int:
    """Frames of a constant-rate stream: `duration` (first to last frame start) x fps, plus the first one."""
    return max(1, round(info.duration * info.fps) + 1)


def view_offset(view: int, num_views: int) -> float:
    """Where in each segment test view `view` of `num_views` takes its frame (share of a segment, in [0, 1))."""
    return (0.5 + view / num_views) % 1.0


def segment_frame_indices(num_video_frames: int, num_segments: int, rng: np.random.Generator | None = None,
                          view: int = 0, num_views: int = 1) -> np.ndarray:
    """One frame index per equal segment: drawn uniformly inside it (`rng` given: training) or at the test
    view's offset. Videos shorter than `num_segments` frames repeat frames (indices never decrease)."""
    if num_video_frames < 1 or num_segments < 1:
        raise ValueError(f"need at least one frame and one segment, got {num_video_frames} and {num_segments}")
    if rng is not None:
        offsets = rng.random(num_segments)
    else:
        offsets = np.full(num_segments, view_offset(view, num_views))
    # (i + offset) * N / T rather than i * (N / T): whole segment starts stay exact integers
    idx = np.floor((np.arange(num_segments) + offsets) * num_video_frames / num_segments).astype(np.int64)
    return np.minimum(idx, num_video_frames - 1)


def segment_times(info: VideoInfo, num_segments: int, rng: np.random.Generator | None = None, view: int = 0,
                  num_views: int = 1) -> np.ndarray:
    """The times (s) of `segment_frame_indices` of a stream: frame i is shown from i / fps."""
    return segment_frame_indices(frame_count(info), num_segments, rng, view, num_views) / info.fps
