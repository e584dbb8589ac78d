"""VideoDataset on real files: shapes, per-clip consistency, views, repeats, determinism, bad files."""

import os
import shutil

import numpy as np
import pytest
import torch
from test_data_helpers import read_counter, write_audio_only, write_counter_video, write_mjpeg

from datasets import (
    FailureTracker,
    ResumableDistributedSampler,
    VideoDataset,
    build_video_dataset,
    collate_clips,
    normalize_clips,
)
from datasets.decode import (
    MAX_DECODE_SHORT_SIDE,
    MAX_FRAME_PIXELS,
    MAX_VIDEO_FRAMES,
    VideoTooLarge,
    decode_frames,
    probe,
)
from datasets.transforms import crop_resize
from util.config import DataConfig
from util.errors import DataFileError, MaeError


def _list(tmp_path, rows, name="train.csv", sep=" "):
    path = tmp_path / name
    path.write_text("".join(f"{p}{sep}{label}\n" for p, label in rows))
    return str(path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    write_counter_video(str(root / "land.mp4"), 60, 30, width=64, height=48, gop_size=15)
    write_counter_video(str(root / "port.mp4"), 48, 24, codec="mpeg4", width=48, height=64)
    write_counter_video(str(root / "static.mp4"), 20, 30, width=64, height=48, static=True)
    return root


def test_train_item_shapes_and_collate(videos, tmp_path):
    lst = _list(tmp_path, [("land.mp4", 3), ("port.mp4", 5)], sep=",")
    ds = VideoDataset(lst, str(videos), mode="pretrain", num_frames=4, sampling_rate=2, crop_size=32,
                      repeat_aug=2, mask_noise_tokens=6)
    item = ds[(1, 1)]
    assert item["clips"].shape == (2, 3, 4, 32, 32) and item["clips"].dtype == torch.float32
    assert item["label"].tolist() == [5, 5] and item["index"].tolist() == [1, 1]
    assert item["noise"].shape == (2, 6) and 0 <= item["noise"].min() and item["noise"].max() < 1
    batch = collate_clips([ds[0], item])
    assert batch["clips"].shape == (4, 3, 4, 32, 32) and batch["noise"].shape == (4, 6)
    assert batch["label"].tolist() == [3, 3, 5, 5] and batch["failures"] == 0 and batch["attempts"] == 2
    raw = VideoDataset(lst, str(videos), mode="pretrain", num_frames=4, sampling_rate=2, crop_size=32,
                       repeat_aug=2, normalize=False)[(1, 1)]["clips"]
    assert raw.dtype == torch.uint8
    torch.testing.assert_close(normalize_clips(raw), item["clips"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode,extra", [("pretrain", {}),
                                        ("finetune", {"rand_aug": "rand-m9-n4-mstd0.5-inc1", "reprob": 1.0})])
def test_augmentation_identical_on_every_frame(videos, tmp_path, mode, extra):
    # every input frame is the same image: any per-frame difference in the output is an inconsistency
    lst = _list(tmp_path, [("static.mp4", 0)])
    ds = VideoDataset(lst, str(videos), mode=mode, num_frames=6, sampling_rate=1, crop_size=32,
                      repeat_aug=4, normalize=True, **extra)
    for epoch in range(3):
        clips = ds[(epoch, 0)]["clips"]
        ref = clips[:, :, :1]
        if mode == "finetune":
            # erasing noise differs per frame by design; compare outside the erased box
            same = (clips - ref).abs().amax(dim=(1, 2)) < 0.1
            assert same.float().mean() > 0.5
        else:
            assert (clips - ref).abs().max() < 0.1  # H.264 noise only


def test_flip_and_crop_are_applied(videos, tmp_path):
    lst = _list(tmp_path, [("static.mp4", 0)])
    kw = dict(num_frames=2, sampling_rate=1, crop_size=32, normalize=False, short_side_range=None)
    crops = [VideoDataset(lst, str(videos), seed=s, scale=(0.3, 0.5), **kw)[0]["clips"] for s in range(6)]
    assert len({c.float().mean().item() for c in crops}) > 1  # different boxes
    plain = VideoDataset(lst, str(videos), hflip=False, scale=(1.0, 1.0), aspect=(1.33, 1.34), **kw)[0]
    assert plain["clips"].shape == (1, 3, 2, 32, 32)


@pytest.mark.parametrize("box", [(3, 5, 29, 41), (2, 4, 32, 32)])  # resized, and a crop already at size
def test_crop_resize_flip_is_a_horizontal_mirror_of_the_unflipped_clip(box):
    # the flip is applied after the resize: a mirror of the unflipped clip, also when cast into `out`
    frames = torch.randint(0, 256, (3, 40, 50, 3), dtype=torch.uint8)
    plain = crop_resize(frames, box, 32)
    assert torch.equal(crop_resize(frames, box, 32, flip=True), plain.flip(-1))
    into = torch.empty((3, 3, 32, 32), dtype=torch.float32)  # the float path casts during the same copy
    crop_resize(frames, box, 32, flip=True, out=into)
    assert torch.equal(into, plain.flip(-1).float())


def test_repeated_augmentation_gives_different_clips(videos, tmp_path):
    lst = _list(tmp_path, [("land.mp4", 0)])
    ds = VideoDataset(lst, str(videos), num_frames=4, sampling_rate=2, crop_size=32, repeat_aug=4,
                      normalize=False)
    clips = ds[0]["clips"]
    assert clips.shape[0] == 4
    for i in range(4):
        for j in range(i):
            assert not torch.equal(clips[i], clips[j])


def test_test_views_evenly_spaced(videos, tmp_path):
    _list(tmp_path, [("land.mp4", 1), ("port.mp4", 2)], name="test.txt")
    ds = build_video_dataset(str(tmp_path), "test", data_root=str(videos), mode="test", num_frames=4,
                             sampling_rate=4, crop_size=48, num_temporal_views=3, num_spatial_crops=3,
                             normalize=False)
    assert len(ds) == 2 * 9
    firsts = {}
    for i in range(9):  # video 0: 60 frames at 30 fps, clip span 12 frames
        item = ds[i]
        assert item["clips"].shape == (1, 3, 4, 48, 48) and item["index"].item() == 0
        assert item["view"].item() == i and item["label"].item() == 1
        frame = item["clips"][0, :, 0].permute(1, 2, 0).numpy()
        firsts.setdefault(i // 3, read_counter(frame))
    room = 59 - 12  # last frame start minus clip span, in frames at 30 fps
    assert [firsts[k] for k in range(3)] == [0, int(room / 2), room]
    # portrait video: 3 crops are top/centre/bottom; green grows with y in the untouched right quarter
    greens = [ds[9 + i]["clips"][0, 1, 0, :, 40:].float().mean() for i in range(3)]
    assert greens[0] < greens[1] < greens[2]


def test_same_sample_same_tensors_with_0_and_2_workers(videos, tmp_path):
    lst = _list(tmp_path, [("land.mp4", 0), ("port.mp4", 1)] * 3)
    ds = VideoDataset(lst, str(videos), num_frames=4, sampling_rate=2, crop_size=32, repeat_aug=2,
                      mask_noise_tokens=8)
    outs = []
    for workers in (0, 2):
        sampler = ResumableDistributedSampler(len(ds), batch_size=2, seed=1)
        sampler.set_epoch(1)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers,
                                             collate_fn=collate_clips)
        outs.append(list(loader))
    assert len(outs[0]) == 3
    for a, b in zip(*outs, strict=True):
        for k in ("clips", "label", "index", "noise"):
            assert torch.equal(a[k], b[k])
    assert not torch.equal(ds[(1, 0)]["clips"], ds[(2, 0)]["clips"])  # epochs differ


def _bad_files(root):
    good = str(root / "land.mp4")
    bad = {"missing": str(root / "missing.mp4")}
    (root / "empty.mp4").write_bytes(b"")
    bad["empty"] = str(root / "empty.mp4")
    data = open(good, "rb").read()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    bad["truncated"] = str(root / "truncated.mp4")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    bad["text"] = str(root / "text.mp4")
    bad["audio"] = write_audio_only(str(root / "audio.mp4"))
    # valid container and index, zeroed media payload: opens fine, no frame decodes
    broken = bytearray(data)
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")
    broken[at + 4:at - 4 + size] = bytes(size - 8)
    (root / "garbage.mp4").write_bytes(bytes(broken))
    bad["undecodable"] = str(root / "garbage.mp4")
    return good, bad


def test_bad_files_skipped_and_counted_through_workers(videos, tmp_path):
    shutil.copy(videos / "land.mp4", tmp_path / "land.mp4")
    good, bad = _bad_files(tmp_path)
    rows = [(good, 0)] * 18 + [(p, 1) for p in bad.values()]
    ds = VideoDataset(_list(tmp_path, rows, "list.csv"), num_frames=2, sampling_rate=2, crop_size=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_clips)
    tracker = FailureTracker(max_failure_rate=0.5)
    seen, failed = 0, []
    for batch in loader:
        tracker.update_from_batch(batch)
        seen += len(batch["label"])
        failed += batch["failed_paths"]
        assert batch["failures"] == len(batch["failed_paths"])
    assert seen == len(rows)
    # every bad file was tried once as itself (maybe again as a replacement draw) and counted; the good
    # file is never blamed (the count is taken in the main process, outside any decode's error handling)
    assert set(failed) == set(bad.values()) and tracker.failures == len(failed) and good not in tracker.examples
    assert tracker.attempts == len(rows) + tracker.failures


def test_mostly_bad_dataset_stops_with_clear_error(videos, tmp_path):
    """Half the files empty: the main process's tracker stops the run, naming only bad files."""
    rows = [(str(videos / "land.mp4"), 0)] * 20
    for i in range(20):
        (tmp_path / f"empty{i}.mp4").write_bytes(b"")
        rows.append((str(tmp_path / f"empty{i}.mp4"), 0))
    ds = VideoDataset(_list(tmp_path, rows, "list.csv"), num_frames=2, crop_size=16)
    sampler = ResumableDistributedSampler(len(ds), batch_size=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2,
                                         collate_fn=collate_clips)
    tracker = FailureTracker(max_failure_rate=0.1)
    with pytest.raises(RuntimeError, match=r"failure rate .* exceeds --max_failure_rate 10.0%.*empty\d+\.mp4") as exc:
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for batch in loader:
                tracker.update_from_batch(batch)
    assert "land.mp4" not in str(exc.value) and "99% confidence" in str(exc.value)


def test_test_mode_never_scores_another_video_for_a_broken_one(videos, tmp_path):
    """A test view that cannot be decoded stays its own video's view, marked not valid."""
    (tmp_path / "empty.mp4").write_bytes(b"")
    rows = [(str(videos / "land.mp4"), 0), (str(tmp_path / "empty.mp4"), 1), (str(videos / "port.mp4"), 2)]
    ds = VideoDataset(_list(tmp_path, rows, "test.csv"), mode="test", num_frames=2, crop_size=16,
                      num_temporal_views=2, num_spatial_crops=1)
    items = [ds[i] for i in range(len(ds))]
    assert [int(it["index"]) for it in items] == [0, 0, 1, 1, 2, 2]
    assert [bool(it["valid"]) for it in items] == [True, True, False, False, True, True]
    assert items[2]["failures"] == 1 and items[2]["clips"].shape == items[0]["clips"].shape
    batch = collate_clips(items)
    assert batch["valid"].tolist() == [True, True, False, False, True, True] and batch["failures"] == 2


def test_list_file_errors(tmp_path):
    lst = tmp_path / "bad.csv"
    lst.write_text("a.mp4 1\nb.mp4,2\n\nc.mp4\n")
    with pytest.raises(ValueError, match=r"bad\.csv:4"):
        VideoDataset(str(lst))
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(ValueError, match="no samples"):
        VideoDataset(str(tmp_path / "empty.csv"))
    with pytest.raises(FileNotFoundError, match="val"):
        build_video_dataset(str(tmp_path), "val")
    with pytest.raises(ValueError, match="mode"):
        VideoDataset(str(lst), mode="train")


def test_failure_tracker_needs_evidence_before_stopping():
    """A run stops only when the failure rate is above the limit with 99% confidence, after enough decodes."""
    early = FailureTracker(max_failure_rate=0.1)
    early.update(29, 3, ["a.mp4"])  # 10.3% of 29: the case that stopped a run with 8% bad files
    early.update(10, 0)
    rng = np.random.default_rng(0)
    near = FailureTracker(max_failure_rate=0.1)
    for _ in range(200):  # 8.5% bad files, 10% allowed: never stops
        near.update(10, int((rng.random(10) < 0.085).sum()))
    assert 0.07 < near.rate < 0.10
    bad = FailureTracker(max_failure_rate=0.1, max_examples=2)
    with pytest.raises(RuntimeError, match=r"decode failure rate 30\.0% \(\d+ of \d+ decodes; at least .* with 99% "
                                           r"confidence\) exceeds --max_failure_rate 10\.0%.*x0\.mp4"):
        for i in range(100):  # 30% bad: stops once the evidence is in
            bad.update(10, 3, [f"x{i}.mp4"])
    assert bad.attempts <= 200 and bad.examples == ["x0.mp4", "x1.mp4"]


def test_list_labels_are_range_checked_when_read_naming_file_and_line(videos, tmp_path):
    """A label outside [0, num_classes) or past int64 fails at read time with file:line, not at a step."""
    good = str(videos / "land.mp4")
    for bad, line in (("400", 2), ("-1", 2), ("12345678901234567890", 2)):
        lst = tmp_path / "train.csv"
        lst.write_text(f"{good} 3\n{good} {bad}\n")
        with pytest.raises(ValueError, match=rf"train\.csv:{line}: label {bad} is outside \[0, 400\)"):
            VideoDataset(str(lst), num_classes=400)
    # pretraining ignores labels but still refuses one no tensor can hold (an OverflowError in a worker)
    with pytest.raises(ValueError, match=r"train\.csv:2: label 12345678901234567890 does not fit"):
        VideoDataset(str(lst))
    # past Python's 4300-digit int() limit: still the project's error naming file:line, with or without classes
    lst.write_text(f"{good} 3\n{good} {'9' * 5000}\n")
    for classes in (None, 400):
        with pytest.raises(DataFileError, match=r"train\.csv:2: label 9{30}\.\.\. \(5000 characters\) does not fit"):
            VideoDataset(str(lst), num_classes=classes)
    lst.write_text(f"{good} 0\n{good} 399\n")
    assert [label for _, label in VideoDataset(str(lst), num_classes=400).samples] == [0, 399]


def test_list_with_bom_keeps_its_first_video_and_bad_utf8_names_the_line(videos, tmp_path):
    lst = tmp_path / "train.csv"
    lst.write_bytes(b"\xef\xbb\xbfland.mp4 1\nport.mp4 2\n")
    ds = VideoDataset(str(lst), str(videos))
    assert ds.samples == [(str(videos / "land.mp4"), 1), (str(videos / "port.mp4"), 2)]
    assert ds[0]["failures"] == 0  # the first path is the real file, not '\ufeffland.mp4'
    lst.write_bytes("land.mp4 1\nport.mp4 2\nvid\u00e9o.mp4 3\n".encode() + b"caf\xe9.mp4 4\n")
    with pytest.raises(ValueError, match=r"train\.csv:4: not valid UTF-8"):
        VideoDataset(str(lst), str(videos))


def test_list_that_is_a_directory_or_fifo_is_reported_as_such(tmp_path):
    """Not 'missing', and a FIFO is never opened (that would wait for a writer forever)."""
    (tmp_path / "train.csv").mkdir()
    with pytest.raises(OSError, match=r"train\.csv is a directory, not a regular file"):
        build_video_dataset(str(tmp_path), "train")
    os.mkfifo(tmp_path / "val.csv")
    with pytest.raises(OSError, match=r"val\.csv is a FIFO \(named pipe\), not a regular file"):
        build_video_dataset(str(tmp_path), "val")
    with pytest.raises(OSError, match=r"val\.csv is a FIFO"):
        VideoDataset(str(tmp_path / "val.csv"))


@pytest.fixture(scope="module")
def oversized(tmp_path_factory):
    """A real two-frame 7744x4320 MJPEG (33.5 Mpixel, just over the 8K default bound): ~0.4 MB on disk."""
    return write_mjpeg(str(tmp_path_factory.mktemp("big") / "big.mkv"), [(7744, 4320)] * 2)


def test_oversized_video_is_skipped_and_counted_before_any_frame_is_decoded(videos, oversized, tmp_path, caplog):
    assert DataConfig().max_frame_pixels == MAX_FRAME_PIXELS and DataConfig().max_video_frames == MAX_VIDEO_FRAMES
    stats = {}
    with pytest.raises(VideoTooLarge, match=r"big\.mkv: 7744x4320 frames \(33\.5 Mpixel\) exceed --max_frame_pixels"):
        decode_frames(oversized, [0.0, 0.1], stats=stats)
    assert stats == {}  # refused from the stream's metadata: nothing was sent to the decoder
    rows = [(oversized, 0), (str(videos / "land.mp4"), 1)]
    ds = VideoDataset(_list(tmp_path, rows), num_frames=2, crop_size=16, seed=3)
    with caplog.at_level("WARNING"):
        item = ds[0]
    assert item["failures"] == 1 and item["failed_paths"] == [oversized] and int(item["index"][0]) == 1
    assert "big.mkv" in caplog.text and "--max_frame_pixels" in caplog.text
    # the flag raises the bound: the same file then reads (scaled while converting, so memory stays small)
    frames, _, _ = decode_frames(oversized, [0.0, 0.1], short_side=16, max_pixels=8192 * 8192)
    assert frames.shape == (2, 16, 29, 3)


def test_training_clips_of_a_large_source_are_decoded_at_the_short_side_limit(videos, oversized, tmp_path):
    """--max_decode_short_side: a source over it is scaled while converting (the 7744x4320 file, admitted by a
    raised --max_frame_pixels, decodes to 1936x1080 frames); a source at or under it decodes exactly as before."""
    assert DataConfig().max_decode_short_side == MAX_DECODE_SHORT_SIDE == 1080
    ds = VideoDataset(_list(tmp_path, [(oversized, 0)]), num_frames=2, crop_size=16, seed=3,
                      max_frame_pixels=8192 * 8192)
    item = ds[0]
    assert item["failures"] == 0 and item["clips"].shape == (1, 3, 2, 16, 16)
    assert ds.frame_buffer._memory.size == 2 * 1080 * 1936 * 3  # 12.5 MB, not 2 x 100 MB of RGB
    land = str(videos / "land.mp4")  # 64x48
    times = [0.0, 0.5, 1.0]
    full, _, _ = decode_frames(land, times)
    same, _, _ = decode_frames(land, times, max_short_side=48)
    assert np.array_equal(same, full)  # normal data: nothing changes
    small, _, _ = decode_frames(land, times, max_short_side=24)
    assert small.shape == (3, 24, 32, 3)
    limited = VideoDataset(_list(tmp_path, [(land, 0)]), num_frames=2, crop_size=16, max_decode_short_side=24)
    assert limited[0]["clips"].shape == (1, 3, 2, 16, 16) and limited.frame_buffer._memory.size == 2 * 24 * 32 * 3
    unlimited = VideoDataset(_list(tmp_path, [(land, 0)]), num_frames=2, crop_size=16, max_decode_short_side=0)
    assert torch.equal(unlimited[0]["clips"], VideoDataset(_list(tmp_path, [(land, 0)]), num_frames=2,
                                                           crop_size=16)[0]["clips"])


def test_video_over_the_frame_count_bound_is_skipped_and_counted(videos, tmp_path):
    rows = [(str(videos / "land.mp4"), 0), (str(videos / "static.mp4"), 1)]  # 60 and 20 frames
    ds = VideoDataset(_list(tmp_path, rows), num_frames=2, crop_size=16, max_video_frames=30)
    item = ds[0]
    assert item["failed_paths"] == [str(videos / "land.mp4")] and int(item["index"][0]) == 1
    with pytest.raises(VideoTooLarge, match=r"land\.mp4: 60 frames exceed --max_video_frames 30"):
        decode_frames(str(videos / "land.mp4"), [0.0], max_frames=30)


def test_frame_larger_than_its_header_says_is_refused_before_conversion(tmp_path):
    """The header states 64x64; the second frame is 2000x2000: refused when decoded, before RGB conversion."""
    path = write_mjpeg(str(tmp_path / "liar.mkv"), [(64, 64), (2000, 2000)])
    assert probe(path).width == 64
    with pytest.raises(VideoTooLarge, match=r"liar\.mkv: 2000x2000 frames \(4\.0 Mpixel\) exceed --max_frame_pixels"):
        decode_frames(path, [0.0, 0.1], max_pixels=1_000_000)


def test_mutated_list_files_fail_only_with_errors_naming_the_file(videos, tmp_path):
    """A few hundred truncations, byte flips and insertions of a real list: each either reads (labels in
    range) or fails with one of the project's errors (MaeError) naming the list file; nothing else, nothing hangs."""
    base = "".join(f"{name} {label}\n" for name, label in
                   [("land.mp4", 0), ("port.mp4", 3), ("static.mp4", 9), ("sub/dir/clip one.mp4", 5)]).encode()
    rng = np.random.default_rng(0)
    path = tmp_path / "train.csv"
    outcomes = {"read": 0, "refused": 0}
    for i in range(300):
        data = bytearray(base)
        kind = i % 3
        if kind == 0:
            data = data[:int(rng.integers(len(data)))]
        elif kind == 1:
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
        else:
            at = int(rng.integers(len(data)))
            data[at:at] = bytes(rng.choice([b"\xef\xbb\xbf", b"\x00", b"99999999999999999999", b"-", b"\xff\xfe",
                                            b",", b"\r\n"]))
        path.write_bytes(bytes(data))
        try:
            samples = VideoDataset(str(path), str(videos), num_classes=10).samples
        except MaeError as exc:
            assert str(path) in str(exc), (bytes(data), exc)
            outcomes["refused"] += 1
        else:
            assert samples and all(0 <= label < 10 for _, label in samples)
            outcomes["read"] += 1
    assert outcomes["read"] > 20 and outcomes["refused"] > 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv"]  # nothing else written
