"""Generated demo set: byte-reproducible lossless files, lists, boxes, motion-defined labels, atomic cache."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np

import datasets.synthetic as synthetic
from datasets import build_video_dataset, ensure_synthetic_dataset, probe, read_list_file
from datasets.decode import decode_frames
from datasets.synthetic import CLASS_NAMES, dataset_fingerprint, generate_dataset, render_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_writes_decodable_videos_and_lists(tmp_path):
    out = tmp_path / "syn"
    subprocess.run([sys.executable, "-m", "datasets.synthetic", "--out", str(out), "--num-videos", "10",
                    "--size", "32", "--frames", "12"], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    rows = [r for split in ("train", "val", "test") for r in read_list_file(str(out / f"{split}.csv"), str(out))]
    assert len(rows) == 10 and len({p for p, _ in rows}) == 10  # splits are disjoint and complete
    assert {label for _, label in rows} <= set(range(len(CLASS_NAMES)))
    info = probe(rows[0][0])
    assert (info.width, info.height, info.fps) == (32, 32, 30)
    ds = build_video_dataset(str(out), "train", num_frames=4, sampling_rate=2, crop_size=16)
    assert ds[0]["clips"].shape == (1, 3, 4, 16, 16)


def test_cache_is_reused_and_single_object_boxes(tmp_path):
    path = ensure_synthetic_dataset(str(tmp_path), num_videos=4, size=32, frames=8, single_object=True)
    stamp = os.path.getmtime(os.path.join(path, "train.csv"))
    assert ensure_synthetic_dataset(str(tmp_path), num_videos=4, size=32, frames=8, single_object=True) == path
    assert os.path.getmtime(os.path.join(path, "train.csv")) == stamp
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no tmp folder left behind
    boxes = json.load(open(os.path.join(path, "boxes.json")))
    assert len(boxes) == 4
    for per_frame in boxes.values():
        assert len(per_frame) == 8 and all(len(objs) == 1 for objs in per_frame)
        x0, y0, x1, y1 = per_frame[0][0]
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32


def test_motion_defines_the_class():
    # the object centre moves along the class direction; single-frame statistics do not depend on it
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASS_NAMES):
        _, boxes = render_video(label, rng, size=48, frames=10, num_objects=1)
        c0 = np.array(boxes[0][0], float).reshape(2, 2).mean(0)
        c1 = np.array(boxes[-1][0], float).reshape(2, 2).mean(0)
        dx, dy = c1 - c0
        expected = {"right": dx > 2, "left": dx < -2, "down": dy > 2, "up": dy < -2}
        assert expected[name.split("-")[0]], (name, dx, dy)
    means = [render_video(label, rng, size=32, frames=1)[0].mean() for label in range(8) for _ in range(4)]
    per_class = np.array(means).reshape(8, 4).mean(1)
    assert per_class.std() < 10  # appearance is drawn independently of the label


def test_object_and_speed_scale():
    # same seed, same random draws: only the radius or the step per frame changes, by the asked factor
    def single(object_scale=1.0, speed_scale=1.0):
        _, boxes = render_video(0, np.random.default_rng(3), size=64, frames=6, num_objects=1,
                                object_scale=object_scale, speed_scale=speed_scale)
        b = np.array([f[0] for f in boxes], float)
        return (b[:, 2:] - b[:, :2]).mean(), (b[-1, :2] + b[-1, 2:] - b[0, :2] - b[0, 2:])[0] / 2

    (w1, d1), (w2, _), (_, d3) = single(), single(object_scale=1.5), single(speed_scale=2.0)
    assert d1 > 2 and abs(d3 / d1 - 2.0) < 0.3, (d1, d3)  # class 0 moves right, twice as far
    assert abs(w2 / w1 - 1.5) < 0.25, (w1, w2)


def _file_hashes(folder) -> dict:
    return {n: hashlib.sha256(open(os.path.join(folder, "videos", n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(os.path.join(folder, "videos")))}


def test_two_generations_are_byte_identical(tmp_path):
    # one in this process, one in a fresh interpreter with other thread settings: the same bytes
    kw = dict(num_videos=6, size=32, frames=12, background="plain", object_scale=2.0, speed_scale=2.0)
    here = generate_dataset(str(tmp_path / "a"), **kw)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-m", "datasets.synthetic", "--out", str(tmp_path / "b"), "--num-videos", "6",
                    "--size", "32", "--frames", "12", "--background", "plain", "--object-scale", "2",
                    "--speed-scale", "2"], check=True, cwd=REPO, env=env)
    there = str(tmp_path / "b")
    assert _file_hashes(here) == _file_hashes(there) and len(_file_hashes(here)) == 6
    for name in ("train.csv", "val.csv", "test.csv", "boxes.json"):
        assert open(os.path.join(here, name), "rb").read() == open(os.path.join(there, name), "rb").read()
    assert dataset_fingerprint(here) == dataset_fingerprint(there)
    # the fingerprint sees the content: another seed gives other videos and another fingerprint
    other = generate_dataset(str(tmp_path / "c"), seed=1, **kw)
    assert dataset_fingerprint(other) != dataset_fingerprint(here)


def test_videos_decode_to_exactly_the_rendered_pixels(tmp_path):
    out = generate_dataset(str(tmp_path), num_videos=2, size=32, frames=12, background="texture")
    rng = np.random.default_rng(0)  # generate_dataset's draws: video 0 (class 0) comes first
    rendered, _ = render_video(0, rng, size=32, frames=12)
    decoded, times, _ = decode_frames(os.path.join(out, "videos", f"00000_{CLASS_NAMES[0]}.mkv"), np.arange(12) / 30)
    assert np.array_equal(times, np.round(np.arange(12) / 30, 3))  # every frame found at its time
    assert np.array_equal(decoded, rendered)  # lossless: no codec noise, same pixels on every machine


def test_cache_folder_names_every_setting_and_the_generator_version(tmp_path, monkeypatch):
    kw = dict(num_videos=2, size=32, frames=4)
    base = ensure_synthetic_dataset(str(tmp_path), **kw)
    others = [ensure_synthetic_dataset(str(tmp_path), **kw, background="plain"),
              ensure_synthetic_dataset(str(tmp_path), **kw, object_scale=2.0),
              ensure_synthetic_dataset(str(tmp_path), **kw, speed_scale=2.0)]
    # a set written by another generator version (e.g. the old H.264 one) is never reused
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION - 1)
    others.append(ensure_synthetic_dataset(str(tmp_path), **kw))
    assert len({base, *others}) == 5
