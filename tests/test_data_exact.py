"""The planned decoder returns exactly the frames of a reference decode (decode all, pick by time).

Real H.264 files with B-frames (and a B-pyramid, so some B-frames are references), odd sizes,
25/30/60 fps, variable frame rate, open GOPs, matroska (no stored decode times), frame threads.
"""

import pickle

import av
import numpy as np
import pytest
import torch
from test_data_helpers import panning_frames, reference_decode, write_h264

from datasets import VideoDataset
from datasets.decode import FrameBuffer, clip_span, clip_times, decode_frames, probe, random_clip_start
from datasets.transforms import crop_resize, normalize_clips, random_resized_box


def _cfr(fps, n):
    return [round(1000 * i / fps) for i in range(n)]


def _vfr(n, seed=0):
    gaps = np.random.default_rng(seed).integers(12, 70, n - 1)  # 14 to 83 fps
    return [0] + np.cumsum(gaps).tolist()


SOURCES = {  # name: (width, height, times_ms, keyint, pix_fmt, x264 params, extension)
    "30fps-bframes": (96, 64, _cfr(30, 150), 40, "yuv420p", None, "mp4"),
    "25fps-odd-size": (67, 45, _cfr(25, 125), 50, "yuv444p", None, "mp4"),
    "60fps-mkv": (64, 48, _cfr(60, 240), 90, "yuv420p", None, "mkv"),
    "vfr": (80, 48, _vfr(150), 30, "yuv420p", None, "mp4"),
    "open-gop": (64, 48, _cfr(30, 150), 30, "yuv420p", "open-gop=1", "mp4"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    out = {}
    for name, (w, h, times_ms, keyint, pix_fmt, params, ext) in SOURCES.items():
        frames = panning_frames(len(times_ms), w, h)
        out[name] = write_h264(str(root / f"{name}.{ext}"), frames, times_ms, keyint, pix_fmt, params)
    return out


def _wanted_times(duration: float, seed: int) -> np.ndarray:
    """Four random 16 x stride-4 windows (as the dataset draws them), plus edge times."""
    rng = np.random.default_rng(seed)
    span = clip_span(16, 4)
    windows = [clip_times(random_clip_start(duration, span, rng), 16, 4) for _ in range(4)]
    return np.concatenate(windows + [[duration + 1.0, 0.0, windows[0][3]]])  # past the end, first, repeat


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("threads", [1, 2])
def test_planned_decode_equals_reference_decode(sources, name, threads):
    path = sources[name]
    info = probe(path)
    for seed in range(4):
        times = _wanted_times(info.duration, seed)
        stats = {}
        frames, got, _ = decode_frames(path, times, threads=threads, stats=stats)
        ref, ref_t = reference_decode(path, times)
        assert stats["path"] == "planned"  # the fast path, not the decode-everything fallback
        np.testing.assert_array_equal(frames, ref)
        np.testing.assert_allclose(got, ref_t, atol=1e-9)


def test_plan_skips_work_and_still_matches(sources):
    path = sources["30fps-bframes"]  # 150 frames, keyframes every 40
    with av.open(path) as c:
        total = sum(1 for p in c.demux(c.streams.video[0]) if p.size)
    times = np.concatenate([clip_times(0.1, 4, 4), clip_times(3.6, 4, 4)])  # two windows, keyframes between
    stats = {}
    frames, _, _ = decode_frames(path, times, stats=stats)
    np.testing.assert_array_equal(frames, reference_decode(path, times)[0])
    assert stats["sent"] < total * 0.6  # the packets between the windows were not sent
    assert stats["decoded"] < stats["sent"]  # unreferenced B-frames nobody wants were skipped
    nothing_skipped = {}
    decode_frames(path, times, skip_nonref=False, stats=nothing_skipped)
    assert nothing_skipped["decoded"] == nothing_skipped["sent"] > stats["decoded"]


def test_open_gop_leading_frame_with_its_keyframe(sources):
    # a frame shown just before a keyframe but decoded after it refers to the GOP before that keyframe
    path = sources["open-gop"]
    with av.open(path) as c:
        s = c.streams.video[0]
        packets = [(p.pts * float(s.time_base), p.is_keyframe) for p in c.demux(s) if p.size]
    k = next(i for i, (_, key) in enumerate(packets) if key and i > 0)
    leading = [t for t, _ in packets[k + 1:k + 6] if t < packets[k][0]]
    assert leading, "the encoder wrote no leading frame: the case is not exercised"
    times = [packets[k][0] + 0.001, leading[0] + 0.001]  # the keyframe first: decode order tempts a jump
    stats = {}
    frames, _, _ = decode_frames(path, times, stats=stats)
    assert stats["path"] == "planned"
    np.testing.assert_array_equal(frames, reference_decode(path, times)[0])


@pytest.mark.parametrize("normalize", [False, True])
def test_dataset_items_are_the_reference_frames_with_the_same_draws(sources, tmp_path, normalize):
    # speed must not change what is sampled: replay the item's draws in their order on reference frames
    path = sources["30fps-bframes"]
    (tmp_path / "list.csv").write_text(f"{path} 0\n")
    ds = VideoDataset(str(tmp_path / "list.csv"), num_frames=8, sampling_rate=4, crop_size=32, repeat_aug=3,
                      normalize=normalize, seed=5, mask_noise_tokens=4)
    duration = probe(path).duration
    for epoch in range(3):
        item = ds[(epoch, 0)]
        rng = np.random.default_rng([5, epoch, 0])
        starts = [random_clip_start(duration, clip_span(8, 4), rng) for _ in range(3)]
        frames = torch.from_numpy(reference_decode(path, np.concatenate([clip_times(s, 8, 4) for s in starts]))[0])
        for r in range(3):
            box = random_resized_box(64, 96, rng, (0.5, 1.0), (0.75, 1.3333), (256, 320), 32)
            clip = crop_resize(frames[r * 8:(r + 1) * 8], box, 32, flip=bool(rng.random() < 0.5))
            assert torch.equal(item["clips"][r], normalize_clips(clip) if normalize else clip)
        assert torch.equal(item["noise"], torch.from_numpy(rng.random((3, 4), dtype=np.float32)))


def test_frame_buffer_is_reused_and_pickles_empty(sources):
    path = sources["30fps-bframes"]
    buffer = FrameBuffer()
    first_times, second_times = clip_times(0.5, 8, 4), clip_times(2.5, 8, 4)
    first, _, _ = decode_frames(path, first_times, buffer=buffer)
    np.testing.assert_array_equal(first, reference_decode(path, first_times)[0])
    kept = first.copy()
    second, _, _ = decode_frames(path, second_times, buffer=buffer)
    np.testing.assert_array_equal(second, reference_decode(path, second_times)[0])
    assert np.shares_memory(first, second) and not np.array_equal(first, kept)  # same pages, overwritten
    assert len(pickle.dumps(buffer)) < 200
