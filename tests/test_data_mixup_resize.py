"""Video mixup/cutmix soft targets, and the resumable dataset resizer."""

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from test_data_helpers import panning_frames, write_counter_video, write_h264

from datasets import VideoMixup, probe
from datasets.resize import resize_dataset, resize_video


def test_mixup_targets_sum_to_one_and_cutmix_box_spans_frames():
    torch.manual_seed(0)
    clips = torch.randn(4, 3, 5, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    for cutmix_only in (False, True):
        mix = VideoMixup(mixup_alpha=0.0 if cutmix_only else 0.8, cutmix_alpha=1.0, prob=1.0,
                         switch_prob=0.0 if not cutmix_only else 0.5, label_smoothing=0.1, num_classes=5)
        x, y = mix(clips.clone(), labels)
        assert x.shape == clips.shape and y.shape == (4, 5)
        torch.testing.assert_close(y.sum(1), torch.ones(4))
        assert (y > 0).all()  # label smoothing leaves mass on every class
        if cutmix_only:
            changed = (x != clips).any(dim=1)  # [B, T, H, W]
            assert torch.equal(changed, changed[:, :1].expand_as(changed))  # same box on every frame


def test_resize_dataset_resumes_and_copies_lists(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "a").mkdir(parents=True)
    write_counter_video(str(src / "a" / "land.mp4"), 6, 24, width=96, height=64)
    write_counter_video(str(src / "port.webm"), 6, 30, codec="libvpx-vp9", width=64, height=96)
    (src / "broken.mp4").write_bytes(b"")
    (src / "train.csv").write_text("a/land.mp4 0\nport.webm 1\n")
    summary = resize_dataset(str(src), str(dst), short_side=32, workers=2)
    assert summary["done"] == 2 and len(summary["failed"]) == 1 and "broken" in summary["failed"][0][0]
    land, port = probe(str(dst / "a" / "land.mp4")), probe(str(dst / "port.webm"))
    assert (land.width, land.height, land.fps) == (48, 32, 24)
    assert (port.width, port.height, port.fps) == (32, 48, 30)
    assert (dst / "train.csv").read_text() == (src / "train.csv").read_text()
    assert not [n for n in os.listdir(dst) if ".tmp-" in n]
    stamp = os.path.getmtime(dst / "port.webm")
    again = resize_dataset(str(src), str(dst), short_side=32, workers=1)
    assert again["skipped"] == 2 and again["done"] == 0
    assert os.path.getmtime(dst / "port.webm") == stamp


def test_resize_dataset_after_the_parent_used_ffmpeg_finishes(tmp_path):
    """The re-encoder's worker pool starts like the loaders' (forkserver): a parent that used FFmpeg cannot hang it.

    With a forked pool this deadlocked on Python 3.13 / PyAV 19 (run by `.ci/run`'s newest-Python step);
    the subprocess keeps the hang bounded and the test's own process clean.
    """
    script = Path(__file__).resolve().parent / "dist" / "fork_resize.py"
    try:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("resize_dataset hung for 180 s after its process used FFmpeg (workers forked after FFmpeg)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done=4 failed=0" in proc.stdout
    with pytest.raises(ValueError, match="mp_context must be one of"):
        resize_dataset(str(tmp_path / "src"), str(tmp_path / "dst"), mp_context="thread")


def test_resized_copies_have_short_gops_and_unreferenced_b_frames(tmp_path):
    src = write_h264(str(tmp_path / "long_gop.mp4"), panning_frames(90, 96, 64), [round(1000 * i / 30) for i in range(90)],
                     keyint=250)
    dst = str(tmp_path / "out.mp4")
    assert resize_video(src, dst, short_side=48, gop_seconds=0.5) == "done"
    with av.open(dst) as c:
        keys = [i for i, p in enumerate(p for p in c.demux(c.streams.video[0]) if p.size) if p.is_keyframe]
    assert keys[0] == 0 and max(np.diff(keys + [90])) <= 15  # a keyframe at least every 0.5 s
    with av.open(dst) as c:
        types = [f.pict_type for f in c.decode(video=0)]
    with av.open(dst) as c:
        c.streams.video[0].codec_context.skip_frame = "NONREF"
        kept = sum(1 for _ in c.decode(video=0))
    b_frames = sum(t == av.video.frame.PictureType.B for t in types)
    assert b_frames > 0 and kept == len(types) - b_frames  # no B-frame is a reference: all can be skipped
