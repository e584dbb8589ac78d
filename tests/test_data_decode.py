"""Decoding real files: frame times at 30 fps reference, seeking, short videos, codecs and rates."""

import math

import av
import numpy as np
import pytest
from test_data_helpers import read_counter, write_counter_video

from datasets.decode import clip_span, clip_times, decode_frames, probe, uniform_clip_start

FORMATS = [  # codec, extension, fps, width, height
    ("libx264", "mp4", 30, 64, 48),
    ("mpeg4", "mp4", 24, 48, 64),  # portrait
    ("libvpx-vp9", "webm", 60, 64, 48),
    ("libx264", "mkv", 60, 48, 96),  # portrait
]


@pytest.mark.parametrize("codec,ext,fps,width,height", FORMATS)
def test_sampled_frames_follow_30fps_reference(tmp_path, codec, ext, fps, width, height):
    path = write_counter_video(str(tmp_path / f"v.{ext}"), 2 * fps, fps, codec, width, height, gop_size=12)
    times = clip_times(0.4, num_frames=8, sampling_rate=4)  # 4/30 s apart whatever the source fps
    frames, got, info = decode_frames(path, times)
    assert frames.dtype == np.uint8 and frames.shape == (8, height, width, 3)
    assert info.fps == pytest.approx(fps) and (info.width, info.height) == (width, height)
    expected = [math.floor(t * fps + 1e-6) for t in times]  # the frame on screen at time t
    assert [read_counter(f) for f in frames] == expected
    np.testing.assert_allclose(got, np.array(expected) / fps, atol=1e-3)  # webm/mkv stamp in ms


def test_seek_matches_full_decode(tmp_path):
    path = write_counter_video(str(tmp_path / "long.mp4"), 90, 30, gop_size=10)
    times = clip_times(2.0, 4, 2)
    seeked, t1, _ = decode_frames(path, times, seek=True)
    full, t2, _ = decode_frames(path, times, seek=False)
    np.testing.assert_array_equal(seeked, full)
    np.testing.assert_array_equal(t1, t2)
    assert [read_counter(f) for f in seeked] == [60, 62, 64, 66]


@pytest.mark.parametrize("codec,ext", [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("mpeg4", "mp4")])
def test_skipping_non_reference_frames_before_the_window_is_exact(tmp_path, codec, ext):
    # one keyframe for 3 s: the decoder runs through ~2 s of B/P-frames before the clip
    path = write_counter_video(str(tmp_path / f"v.{ext}"), 90, 30, codec=codec, gop_size=90)
    times = clip_times(2.1, 6, 2)
    fast, _, _ = decode_frames(path, times, skip_nonref=True)
    slow, _, _ = decode_frames(path, times, skip_nonref=False)
    np.testing.assert_array_equal(fast, slow)
    assert [read_counter(f) for f in fast] == [63 + 2 * i for i in range(6)]


def test_unsorted_and_repeated_times_keep_order(tmp_path):
    path = write_counter_video(str(tmp_path / "v.mp4"), 30, 30)
    frames, _, _ = decode_frames(path, [0.5, 0.1, 0.5, 0.0])
    assert [read_counter(f) for f in frames] == [15, 3, 15, 0]


def test_short_videos_clamp_to_last_frame(tmp_path):
    one = write_counter_video(str(tmp_path / "one.mp4"), 1, 30)
    frames, _, info = decode_frames(one, clip_times(0.0, 16, 4))
    assert info.duration == pytest.approx(0.0) and frames.shape[0] == 16
    assert {read_counter(f) for f in frames} == {0}
    sec = write_counter_video(str(tmp_path / "sec.mp4"), 30, 30)  # 1 s, shorter than a 2.1 s clip
    frames, _, _ = decode_frames(sec, clip_times(0.0, 16, 4))
    assert [read_counter(f) for f in frames] == [min(4 * i, 29) for i in range(16)]


def test_short_side_scaling_while_converting(tmp_path):
    path = write_counter_video(str(tmp_path / "p.mp4"), 10, 30, width=48, height=96)
    frames, _, _ = decode_frames(path, [0.0], short_side=32)
    assert frames.shape == (1, 64, 32, 3)


def test_uniform_views_evenly_spaced():
    span = clip_span(16, 4)
    starts = [uniform_clip_start(10.0, span, k, 5) for k in range(5)]
    np.testing.assert_allclose(np.diff(starts), (10.0 - span) / 4)
    assert starts[0] == 0 and starts[-1] + span == pytest.approx(10.0)
    assert uniform_clip_start(1.0, span, 2, 3) == 0.0  # shorter than a clip: all views at the start


def test_probe_rejects_non_video(tmp_path):
    bad = tmp_path / "text.mp4"
    bad.write_text("not a video")
    with pytest.raises(av.error.FFmpegError):
        probe(str(bad))
