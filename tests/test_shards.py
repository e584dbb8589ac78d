"""Tar shards (datasets/shards.py): the writer, random access through the index, bad members, URLs through
fsspec (a real Range-capable HTTP server on 127.0.0.1, fsspec's memory filesystem), mixtures of files and shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks.range_server import RangeServer
from datasets.mixture import load_mixture
from datasets.shard_writer import parse_size, write_shards
from datasets.shards import INDEX_SUFFIX, ShardDataset, expand_braces, load_index, read_shards, shard_spec
from datasets.storage import ByteReader
from datasets.synthetic import ensure_synthetic_dataset
from datasets.video_dataset import VideoDataset, build_video_dataset
from util.errors import ConfigError, DataFileError

GEOMETRY = dict(num_frames=4, sampling_rate=2, crop_size=32, short_side_range=None, repeat_aug=2, seed=3)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated set (8 videos, 32 px): 6 in train.csv."""
    return Path(ensure_synthetic_dataset(str(tmp_path_factory.mktemp("cache")), num_videos=8, size=32, frames=24,
                                         seed=1))


@pytest.fixture(scope="module")
def shards(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.csv packed into shards of ~100 KB (two or three videos each) with captions."""
    listed = tmp_path_factory.mktemp("list") / "train.txt"
    lines = (videos / "train.csv").read_text().split("\n")
    listed.write_text("".join(f"{videos / ln.split()[0]} {ln.split()[1]} a clip number {i}\n"
                              for i, ln in enumerate(ln for ln in lines if ln.strip())))
    out = tmp_path_factory.mktemp("shards")
    write_shards(str(listed), str(out), 100 << 10)
    return out


def test_shards_give_the_same_items_as_the_files(videos: Path, shards: Path) -> None:
    ds = build_video_dataset(str(shards), "train", **GEOMETRY)
    files = VideoDataset(str(videos / "train.csv"), data_root=str(videos), **GEOMETRY)
    assert isinstance(ds, ShardDataset) and len(ds) == len(files) == 6 and 2 <= len(ds.shards) <= 3
    for i in range(len(ds)):
        a, b = ds[(1, i)], files[(1, i)]
        assert torch.equal(a["clips"], b["clips"]) and torch.equal(a["label"], b["label"])
    assert [e["txt"] for e in ds.entries][:2] == ["a clip number 0", "a clip number 1"]
    # a brace pattern names the same shards
    pattern = str(shards / f"{{000000..00000{len(ds.shards) - 1}}}.tar")
    assert shard_spec(pattern, "train") == pattern and len(ShardDataset(pattern, **GEOMETRY)) == 6


def test_writer_resumes_and_never_takes_a_half_shard(videos: Path, shards: Path, tmp_path: Path) -> None:
    listed = next(shards.parent.glob("list*/train.txt"))
    out = tmp_path / "out"
    write_shards(str(listed), str(out), 100 << 10)
    first = (out / "000001.tar").read_bytes()
    os.remove(out / ("000001.tar" + INDEX_SUFFIX))  # killed between the rename and the index
    os.remove(out / "000002.tar")
    (out / "000002.tar.tmp").write_bytes(b"half a shard")  # killed while writing
    log: list[str] = []
    write_shards(str(listed), str(out), 100 << 10, log=log.append)
    assert "skipped" in log[0] and "indexed" in log[1] and "videos" in log[2]
    assert (out / "000001.tar").read_bytes() == first  # deterministic bytes
    assert (out / "000002.tar").read_bytes() == (shards / "000002.tar").read_bytes()
    other = tmp_path / "other.txt"
    other.write_text(listed.read_text().split("\n")[0] + "\n")
    with pytest.raises(ConfigError, match="another list"):
        write_shards(str(other), str(out), 100 << 10)
    assert parse_size("1GB") == 1 << 30 and parse_size("500MB") == 500 << 20
    assert expand_braces("a{08..10}{x,y}") == ["a08x", "a08y", "a09x", "a09y", "a10x", "a10y"]


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_video2dataset_layout_with_bad_members_counts_them_as_bad_files(videos: Path, tmp_path: Path) -> None:
    """Made by hand: a key without caption, a key without video, a non-video .mp4, and a truncated shard."""
    clips = sorted((videos / "videos").iterdir())
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        _member(tar, "k0.mp4", clips[0].read_bytes())
        _member(tar, "k0.txt", b"a caption")
        _member(tar, "k0.json", json.dumps({"url": "x"}).encode())
        _member(tar, "k1.mp4", clips[1].read_bytes())  # no caption
        _member(tar, "k2.txt", b"caption of nothing")  # no video
        _member(tar, "k3.mp4", b"this is text, not a video" * 40)
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        _member(tar, "k4.mp4", clips[2].read_bytes())
        _member(tar, "k5.mp4", clips[3].read_bytes())
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:1024 + len(clips[2].read_bytes()) + 600])  # cut inside k5's video
    (tmp_path / "train.shards").write_text("a.tar\nb.tar\n")
    ds = ShardDataset(str(tmp_path / "train.shards"), **GEOMETRY)
    assert [e["key"] for e in ds.entries] == ["k0", "k1", "k2", "k3", "k4", "k5"]
    assert ds.entries[0]["txt"] == "a caption" and "txt" not in ds.entries[1]
    assert any("cut off" in p for p in load_index(str(tmp_path / "b.tar"), ByteReader())["problems"])
    assert os.path.isfile(str(tmp_path / "a.tar") + INDEX_SUFFIX)  # cached beside the shard
    good = ds[(0, 0)]
    assert good["failures"] == 0 and good["clips"].shape == (2, 3, 4, 32, 32)
    for index, why in ((2, "no video member"), (3, "k3"), (5, "truncated")):
        ds._video_index = index
        with pytest.raises(Exception, match=why):
            ds._read(ds.samples[index][0], [0.0])
        item = ds[(0, index)]  # the bad-file policy: counted, another video drawn in its place
        assert item["failures"] >= 1 and ds.samples[index][0] in item["failed_paths"]
    assert ShardDataset(str(tmp_path / "train.shards"), **GEOMETRY).caption_list().videos[0].endswith("a.tar#k0")


def test_http_shards_are_read_by_range_requests_with_retries(shards: Path, videos: Path) -> None:
    files = VideoDataset(str(videos / "train.csv"), data_root=str(videos), **GEOMETRY)
    with RangeServer(str(shards)) as server:
        pattern = server.url("{000000..000001}.tar")
        ds = ShardDataset(pattern, cache_dir=str(shards / "cache"), **GEOMETRY)
        indexes = sum(os.path.getsize(shards / f"{n:06d}.tar{INDEX_SUFFIX}") for n in range(2))
        assert server.bytes_served == indexes  # the indexes beside the shards were read, not the shards
        before = server.bytes_served
        item = ds[(0, 3)]
        assert torch.equal(item["clips"], files[(0, 3)]["clips"]) and item["failures"] == 0
        total = sum(os.path.getsize(shards / f"{n:06d}.tar") for n in range(2))
        served = server.bytes_served - before
        assert 0 < served <= ds.members[3][2] and served < total / 4  # one member: a range, not the shard
        ds[(0, 3)]
        assert server.bytes_served - before == served  # the second read came from the worker's cache
    with RangeServer(str(shards), drop_first=2) as server:  # two dropped connections, then answers
        ds = ShardDataset(server.url("000000.tar"), cache_dir=str(shards / "cache"), **GEOMETRY)
        ds.reader.backoff = 0.01
        assert ds[(0, 0)]["failures"] == 0 and server.dropped == 2
    with RangeServer(str(shards)) as server:
        ds = ShardDataset(server.url("000000.tar"), cache_dir=str(shards / "cache"), retries=2, **GEOMETRY)
        ds.reader.backoff = 0.01
        server.drop_all = True  # from now on every connection drops
        ds._video_index = 0
        with pytest.raises(DataFileError, match="failed after 3 tries"):
            ds._read(ds.samples[0][0], [0.0])
        assert server.dropped == 3


def test_memory_filesystem_shards_are_indexed_once_and_cached(shards: Path, tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/s/000000.tar", (shards / "000000.tar").read_bytes())  # no index beside it: built by streaming
    found, samples, _ = read_shards("memory://s/000000.tar", cache_dir=str(tmp_path))
    assert len(samples) == 2 and samples[0]["txt"] == "a clip number 0"
    assert len(list((tmp_path / "shard-index").iterdir())) == 1
    ds = ShardDataset("memory://s/000000.tar", cache_dir=str(tmp_path), **GEOMETRY)
    assert ds[(0, 1)]["failures"] == 0
    with pytest.raises(ConfigError, match="fsspec"):
        ShardDataset("nosuchprotocol://x/000000.tar", **GEOMETRY)


def test_a_mixture_source_may_be_shards(videos: Path, shards: Path, tmp_path: Path) -> None:
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"block_size: 2\nsources:\n  - {{name: files, list_file: {videos}/train.csv, weight: 1}}\n"
                   f"  - {{name: sharded, shards: {shards}/train.shards, weight: 1}}\n")
    m = load_mixture(str(mix))
    assert m.sources[1].shards == f"{shards}/train.shards" and m.sources[0].shards is None
    mix.write_text(f"block_size: 2\nsources:\n  - {{name: x, list_file: {videos}/train.csv, shards: a.tar, "
                   f"weight: 1}}\n")
    with pytest.raises(ConfigError, match="exactly one of list_file"):
        load_mixture(str(mix))


def test_command_line_writes_and_indexes_shards(videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The docs' commands: `python -m datasets.shards write ...` then `... index SHARD`."""
    from datasets.shards import main

    rows = [ln for ln in (videos / "train.csv").read_text().split("\n") if ln.strip()][:2]
    (tmp_path / "train.csv").write_text("".join(f"{videos / ln.split()[0]} {ln.split()[1]}\n" for ln in rows))
    main(["write", "--list", str(tmp_path / "train.csv"), "--out", str(tmp_path / "shards"), "--shard_size", "1GB"])
    assert (tmp_path / "shards" / "train.shards").read_text() == "000000.tar\n"
    os.remove(tmp_path / "shards" / ("000000.tar" + INDEX_SUFFIX))
    main(["index", str(tmp_path / "shards" / "000000.tar")])
    assert "000000.tar: 2 samples, 0 problems" in capsys.readouterr().out
