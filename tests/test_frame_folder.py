"""Frame-folder datasets (VideoMAE v2 rawframe lists, PySlowFast frame lists) give the clips of the video the
frames came from, with the same draws, and treat a missing or corrupt frame as a bad video; a 2-step fine-tuning
run on frame folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import VideoDataset
from datasets.decode import decode_frames
from datasets.frame_folder import (
    FrameFolderDataset,
    decode_image_pillow,
    decode_image_torchvision,
    read_frame_list,
)
from datasets.synthetic import render_video, write_video
from util.errors import DataFileError

ROOT = Path(__file__).resolve().parents[1]
N, SIZE = 40, 40


def make_release(root: Path, fps: int) -> None:
    """Two H.264 videos at `fps`, each also as a JPEG (quality 100, 4:4:4) and a PNG folder of its decoded
    frames, and the lists: videos.csv, VideoMAE v2 rawframe lists jpg.csv/png.csv, PySlowFast list slowfast.csv."""
    rng = np.random.default_rng(fps)
    lines: dict[str, list[str]] = {"videos": [], "jpg": [], "png": [], "slowfast": ["original_vido_id video_id "
                                                                                  "frame_id path labels"]}
    for v in range(2):
        frames, _ = render_video(v, rng, size=SIZE, frames=N)
        # mp4 (x264): its time base holds i / fps exactly; matroska rounds frame times to 1 ms, so a clip time
        # within 1 ms of a frame boundary could pick the neighbouring frame there
        write_video(str(root / f"v{v}.mp4"), frames, fps=fps)
        decoded, _, _ = decode_frames(str(root / f"v{v}.mp4"), np.arange(N) / fps)  # the project's decoder
        for ext in ("jpg", "png"):
            folder = root / f"{ext}{v}"
            folder.mkdir()
            for i, img in enumerate(decoded):  # numbered from 1 (VideoMAE v2's --start_idx 1)
                Image.fromarray(img).save(folder / f"img_{i + 1:05d}.{ext}",
                                          **({"quality": 100, "subsampling": 0} if ext == "jpg" else {}))
        lines["videos"].append(f"v{v}.mp4 {v}")
        lines["jpg"].append(f"jpg{v} {N} {v}")  # VideoMAE v2's fine-tuning form: folder total_frames label
        lines["png"].append(f"png{v} 1 {N} {v}")  # its 4-field form: folder start_index total_frames label
        lines["slowfast"] += [f"clip{v} {v} {i} png{v}/img_{i + 1:05d}.png {v}" for i in range(N)]
    for name, text in lines.items():
        (root / f"{name}.csv").write_text("\n".join(text) + "\n")


@pytest.fixture(scope="module", params=[30, 25])
def release(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp(f"frames{request.param}")
    make_release(root, request.param)
    return root, request.param


def dataset(root: Path, kind: str, fps: int, **kw) -> VideoDataset:
    """The video dataset (kind "videos") or a frame-folder one over the same two videos."""
    args = {**dict(data_root=str(root), num_frames=4, sampling_rate=4, crop_size=32, short_side_range=None,
                   normalize=False, seed=3), **kw}
    if kind == "videos":
        return VideoDataset(str(root / "videos.csv"), **args)
    template = "img_{:05d}.png" if kind in ("png", "slowfast") else "img_{:05d}.jpg"
    return FrameFolderDataset(str(root / f"{kind}.csv"), frame_fps=fps, frame_template=template, **args)


MODES = {"stride-finetune": dict(mode="finetune", repeat_aug=2),
         "segment-finetune": dict(mode="finetune", repeat_aug=2, frame_sampling="segment"),
         "pretrain-noise": dict(mode="pretrain", repeat_aug=2, mask_noise_tokens=8),
         "test-views": dict(mode="test", crop_size=SIZE, num_temporal_views=2, num_spatial_crops=3)}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_frame_folders_give_the_videos_clips_with_the_same_draws(release: tuple[Path, int], mode: str) -> None:
    root, fps = release
    video = dataset(root, "videos", fps, **MODES[mode])
    folders = {k: dataset(root, k, fps, **MODES[mode]) for k in ("png", "slowfast", "jpg")}
    for key in [(0, 0), (0, 1), (1, 0), (2, 1), (0, len(video) - 1)]:
        want = video[key]
        for kind, ds in folders.items():
            got = ds[key]
            assert got["label"].tolist() == want["label"].tolist() and got["index"].tolist() == want["index"].tolist()
            for k in ("noise", "view"):
                if k in want:
                    assert torch.equal(got[k], want[k]), (kind, key, k)
            if "geometry" in want:
                assert torch.allclose(got["geometry"], want["geometry"], atol=1e-6), (kind, key)
            diff = (got["clips"].int() - want["clips"].int()).abs()
            if kind == "jpg":  # JPEG at quality 100, 4:4:4: a few levels off at most, not another frame
                assert diff.float().mean() < 1.0 and diff.max() <= 8, (key, diff.float().mean(), diff.max())
            else:  # PNG frames are the decoded frames: the clip is the video's, bit for bit
                assert torch.equal(got["clips"], want["clips"]), (kind, key, diff.max())


def test_a_wrong_frame_rate_gives_other_frames(release: tuple[Path, int]) -> None:
    root, fps = release
    video = dataset(root, "videos", fps, mode="finetune")
    wrong = dataset(root, "png", 2 * fps, mode="finetune")  # frames taken as twice as fast: other indices
    assert not torch.equal(video[(0, 0)]["clips"], wrong[(0, 0)]["clips"])


def test_a_missing_or_corrupt_frame_is_a_bad_video_like_a_missing_file(tmp_path: Path) -> None:
    make_release(tmp_path, 30)
    for f in sorted((tmp_path / "png0").iterdir())[1:]:  # folder png0 keeps only its first frame
        f.unlink()
    frames = dataset(tmp_path, "png", 30, mode="finetune")
    item = frames[(0, 0)]  # skipped, counted, another video drawn from the sample's generator: the same each time
    assert item["failures"] >= 1 and item["index"].tolist() == [1] and set(item["failed_paths"]) == {
        str(tmp_path / "png0")}
    assert torch.equal(frames[(0, 0)]["clips"], item["clips"])
    shutil.rmtree(tmp_path / "png0")  # a folder that is not there draws its replacement as a missing video does
    (tmp_path / "videos.csv").write_text("missing.mp4 0\nv1.mp4 1\n")
    bad = dataset(tmp_path, "videos", 30, mode="finetune")
    for key in [(0, 0), (1, 0), (0, 1)]:
        item, want = frames[key], bad[key]
        assert item["failures"] == want["failures"] and item["index"].tolist() == want["index"].tolist(), key
        assert torch.equal(item["clips"], want["clips"]), key
    for f in (tmp_path / "png1").iterdir():  # every frame of png1 cut short: a corrupt image
        f.write_bytes(f.read_bytes()[:100])
    test = dataset(tmp_path, "png", 30, mode="test", crop_size=SIZE)
    views = [test[i] for i in range(len(test))]
    assert [bool(v["valid"].item()) for v in views] == [False, False], "a test view is never replaced"
    assert [v["failed_paths"] for v in views] == [[str(tmp_path / "png0")], [str(tmp_path / "png1")]]


def test_frame_lists_are_read_and_refused_with_file_and_line(tmp_path: Path) -> None:
    lst = tmp_path / "a.csv"
    lst.write_text("f/a 5 1\nf/b 0 7 2\n")
    samples, sources = read_frame_list(str(lst), "R", num_classes=3)
    assert samples == [("R/f/a", 1), ("R/f/b", 2)] and [(s.start, s.count) for s in sources] == [(1, 5), (0, 7)]
    assert sources[0].path(0, "img_{:05d}.jpg") == "R/f/a/img_00001.jpg"
    for text, where in (("f/a 5 x\n", "a.csv:1"), ("f/a 5 1\nf/b 0 0 1\n", "a.csv:2"), ("f/a 5 7\n", "a.csv:1")):
        lst.write_text(text)
        with pytest.raises(DataFileError, match=where):
            read_frame_list(str(lst), num_classes=3)
    lst.write_text("original_vido_id video_id frame_id path labels\nv 0 0 v/1.jpg \"1,2\"\nv 0 1 v/2.jpg 1\n")
    with pytest.raises(DataFileError, match="one class per video"):
        read_frame_list(str(lst))


def test_both_decoders_give_the_same_pixels(tmp_path: Path) -> None:
    img = (np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8)
    for ext in ("jpg", "png"):
        Image.fromarray(img).save(tmp_path / f"a.{ext}")
        assert np.array_equal(decode_image_pillow(str(tmp_path / f"a.{ext}")),
                              decode_image_torchvision(str(tmp_path / f"a.{ext}")))


@pytest.mark.slow  # end-to-end subprocess runs (10-60 s on 2 cores): .ci/run's slow step runs it
def test_finetune_runs_two_steps_on_frame_folders(tmp_path: Path) -> None:
    make_release(tmp_path, 30)
    for split in ("train", "val"):
        (tmp_path / f"{split}.csv").write_text((tmp_path / "jpg.csv").read_text() * 2)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "main_finetune.py"), "--data_path", str(tmp_path), "--data_format", "frames",
           "--frame_fps", "30", "--output_dir", str(out), "--model", "vit_micro_patch8", "--num_classes", "2",
           "--input_size", "32", "--num_frames", "4", "--batch_size", "2", "--repeat_aug", "1", "--num_workers", "0",
           "--epochs", "1", "--warmup_epochs", "0", "--precision", "fp32", "--log_every", "1",
           "--test_num_temporal_views", "1", "--test_num_spatial_crops", "1", "--eval_every", "0", "--eval_split", "val"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in log) == 2, log
    assert "val: 4 of 4 videos scored" in proc.stdout + proc.stderr
