"""Tar shards in the video2dataset / webdataset layout, read by random access through an index of member offsets.

A shard is a tar file whose members are grouped by key (the member name up to the first dot of its base
name): `{key}.mp4` (or .webm/.mkv/.avi/.mov/.m4v) is the video, an optional `{key}.txt` its caption, `{key}.cls`
its integer label and `{key}.json` any metadata. An item is (shard, member): the sample's video bytes are read
with one `pread` (local) or one range request (URLs, datasets/storage.py) at the offset the index gives, and
decoded in memory; nothing else of the shard is read. So the map-style sampler, determinism by sample and
exact resume on any world size hold exactly as for list files.

The index is this project's own small JSON file per shard, `{shard}.index.json`: the writer puts it beside
the shard; for a shard without one (made by video2dataset, or a URL without an index beside it) it is built
once by reading the shard's headers (a sequential read for a URL) and cached beside the shard when that
folder is writable, else in the cache folder ($MAE_ST_CACHE/shard-index). Captions, labels and small JSON
members are stored in the index itself, so building a dataset reads no member. An index records its shard's
size; a shard whose size changed is indexed again.

Selecting shards: `--data_path` is a folder holding `train.shards` (one shard path or URL per line, relative
to that file, brace patterns allowed), or a shard pattern itself: `shards/{000000..000009}.tar`,
`https://host/data/{000..099}.tar`.

Bad members follow the bad-file policy (skipped, counted, --max_failure_rate): a key without a video member,
a member cut off by a truncated shard, or a member that is not a video all fail their read with an error
naming the shard and the key.

    python -m datasets.shards write --list train.csv --out DIR --shard_size 1GB   # pack a list into shards
    python -m datasets.shards index DIR/000000.tar ...                            # index existing shards
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import tempfile

import av
import numpy as np

from util.errors import ConfigError, DataFileError, MissingFileError

from .captions import CaptionList, CaptionVideoDataset
from .decode import decode_frames
from .storage import DEFAULT_CACHE_BYTES, DEFAULT_RETRIES, ByteReader, is_url, local_path
from .video_dataset import VideoDataset

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
INDEX_SUFFIX = ".index.json"
INDEX_FORMAT, INDEX_VERSION = "mae_st_shard_index", 1
INLINE_LIMIT = 1 << 16  # caption/label/json members up to this size are kept in the index
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a{000..002}b{x,y}` -> a000bx, a000by, ... (zero padding kept; the first brace varies slowest)."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise ConfigError(f"shard pattern {pattern}: range {{{body}}} counts down; write it low..high")
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [head + o + rest for o in options for rest in expand_braces(tail)]


def is_shard_spec(data_path: str) -> bool:
    """True when `data_path` names shards itself (a .tar path, pattern or URL) rather than a folder."""
    return data_path.rstrip("}").endswith(".tar") or (".tar" in data_path and "{" in data_path)


def read_shard_list(spec: str) -> list[str]:
    """Shard paths/URLs of `spec`: a `.shards` list file (one per line, relative to it, '#' comments) or a
    pattern; every entry brace-expanded."""
    if not is_url(spec) and spec.endswith(".shards"):
        if not os.path.isfile(spec):
            raise MissingFileError(f"shard list {spec} does not exist")
        folder = os.path.dirname(spec)
        shards = []
        with open(spec, encoding="utf-8-sig") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    shards += [s if is_url(s) or os.path.isabs(s) else os.path.join(folder, s)
                               for s in expand_braces(line)]
        if not shards:
            raise DataFileError(f"shard list {spec} names no shard")
        return shards
    return expand_braces(spec)


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member: the key ends at the first dot of the base name (webdataset's rule)."""
    folder, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (os.path.join(folder, key) if folder else key), ext.lower()


def index_tar(fileobj, total: int, name: str, stream: bool = False) -> dict:
    """The index of the tar `fileobj` (`total` bytes): samples by key in member order and problems found.

    A truncated shard keeps the members read so far; a member cut off at the end keeps its offsets (reading
    it fails, counted as a bad file)."""
    samples: dict[str, dict] = {}
    problems: list[str] = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r|" if stream else "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split_name(info.name)
                sample = samples.setdefault(key, {"key": key})
                if ext in VIDEO_EXTS and "video" not in sample:
                    sample["video"] = [info.offset_data, info.size, ext]
                    if info.offset_data + info.size > total:
                        problems.append(f"{key}.{ext}: cut off by the end of the shard")
                elif ext in ("txt", "cls", "json") and info.size <= INLINE_LIMIT:
                    data = tar.extractfile(info).read() if info.offset_data + info.size <= total else b""
                    text = data.decode("utf-8", errors="replace").strip()
                    if ext == "cls":
                        sample["cls"] = int(text) if re.fullmatch(r"-?\d{1,18}", text) else None
                    else:
                        sample[ext] = text
    except (tarfile.TarError, EOFError) as exc:  # a read error (network, disk) propagates: it is no truncation
        problems.append(f"stopped reading the shard: {type(exc).__name__}: {exc} (truncated or not a tar file)")
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shard_bytes": total,
            "samples": list(samples.values()), "problems": problems}


def _cache_index_path(shard: str, cache_dir: str | None) -> str:
    """Where the index of `shard` is cached when it cannot live beside it."""
    from .synthetic import default_cache_dir

    digest = hashlib.sha1(shard.encode()).hexdigest()[:16]
    return os.path.join(cache_dir or default_cache_dir(), "shard-index", digest + INDEX_SUFFIX)


def _valid(index: object, size: int) -> bool:
    """An index of this format and version for a shard of `size` bytes."""
    return (isinstance(index, dict) and index.get("format") == INDEX_FORMAT and index.get("version") == INDEX_VERSION
            and index.get("shard_bytes") == size and isinstance(index.get("samples"), list))


def _write_json(path: str, obj: dict) -> bool:
    """Write `obj` to `path` atomically (tmp + rename); False if the folder is not writable."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".idx-", dir=os.path.dirname(path) or ".")
    except OSError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)
    return True


def _read_json(path: str) -> object:
    """Parsed JSON of a local file, or None when missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_index(shard: str, reader: ByteReader, cache_dir: str | None = None) -> dict:
    """The index of `shard`: beside it (local or remote), else cached, else built once and cached."""
    size = reader.size(shard)
    cached = _cache_index_path(shard, cache_dir)
    if is_url(shard):
        candidates = [cached]
    else:
        candidates = [local_path(shard) + INDEX_SUFFIX, cached]
    for path in candidates:
        index = _read_json(path)
        if _valid(index, size):
            return index
    if is_url(shard):  # an index uploaded beside the shard saves reading the whole shard once
        try:
            beside = reader.size(shard + INDEX_SUFFIX)
            index = json.loads(reader.read(shard + INDEX_SUFFIX, 0, beside))
            if _valid(index, size):
                _write_json(cached, index)
                return index
        except (MissingFileError, DataFileError, ValueError):
            pass
    def build() -> dict:
        with reader.open(shard) as f:
            return index_tar(f, size, shard, stream=is_url(shard))

    index = reader.retrying(shard, "indexing", build)
    if is_url(shard) or not _write_json(candidates[0], index):
        _write_json(cached, index)
    return index


class ShardReading:
    """What a shard-backed dataset adds to VideoDataset: members by sample, read and decoded in memory."""

    shards: list[str]
    members: list[tuple[int, int, int] | None]  # (shard number, offset, size) of each sample's video
    reader: ByteReader

    def _read(self, path: str, times, **kw) -> np.ndarray:
        """The frames of the sample's video member shown at `times`, decoded from its bytes in memory."""
        member = self.members[self._video_index]
        if member is None:
            raise DataFileError(f"{path}: the shard has no video member ({', '.join(VIDEO_EXTS)}) for this key; "
                                f"rewrite the shard with its video or drop the key")
        shard, offset, size = member
        try:
            data = self.reader.read(self.shards[shard], offset, size)
        except DataFileError as exc:  # name the member, not only the shard
            raise type(exc)(f"{path}: {exc}") from None
        try:
            return decode_frames(data, times, threads=self.decode_threads, name=path, **self.bounds, **kw)[0]
        except av.FFmpegError as exc:
            raise DataFileError(f"{path}: the member is not a decodable video ({exc}); rewrite or drop it") from None


def read_shards(spec: str, retries: int = DEFAULT_RETRIES, cache_bytes: int = DEFAULT_CACHE_BYTES,
                cache_dir: str | None = None) -> tuple[list[str], list[dict], ByteReader]:
    """Shards of `spec`, their samples (index entries with "shard" numbers added) and the reader."""
    reader = ByteReader(retries=retries, cache_bytes=cache_bytes)
    shards = read_shard_list(spec)
    samples = []
    for s, shard in enumerate(shards):
        for entry in load_index(shard, reader, cache_dir)["samples"]:
            samples.append({**entry, "shard": s})
    if not samples:
        raise DataFileError(f"{spec}: the shards ({len(shards)}) hold no samples; check the paths and the layout "
                            f"({{key}}.mp4 members)")
    return shards, samples, reader


def _members(samples: list[dict]) -> list[tuple[int, int, int] | None]:
    """(shard, offset, size) of each sample's video member, None where it has none."""
    return [(e["shard"], int(e["video"][0]), int(e["video"][1])) if "video" in e else None for e in samples]


def _name(shards: list[str], entry: dict) -> str:
    """How a sample is named in logs and errors: `shard#key`."""
    return f"{shards[entry['shard']]}#{entry['key']}"


class ShardDataset(ShardReading, VideoDataset):
    """Videos of tar shards (see the module doc); items as VideoDataset's, labels from `{key}.cls` (-1 without)."""

    def __init__(self, spec: str, retries: int = DEFAULT_RETRIES, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 cache_dir: str | None = None, num_classes: int | None = None, data_root: str = "", **kwargs) -> None:
        self.shards, entries, self.reader = read_shards(spec, retries, cache_bytes, cache_dir)
        samples = []
        for e in entries:
            label = e.get("cls")
            label = -1 if label is None else label
            if num_classes is not None and not 0 <= label < num_classes:
                raise DataFileError(f"{_name(self.shards, e)}: label {label} is outside [0, {num_classes}) "
                                    f"(--num_classes {num_classes}); fix its .cls member or --num_classes")
            samples.append((_name(self.shards, e), label))
        self.members = _members(entries)
        self.entries = entries
        super().__init__(spec, samples=samples, num_classes=num_classes, **kwargs)

    def caption_list(self) -> CaptionList:
        """Captions from the `{key}.txt` members (samples without one are left out: DataFileError if none)."""
        return shard_captions(self.shards, self.entries, spec=self.list_file)


def shard_captions(shards: list[str], entries: list[dict], spec: str) -> CaptionList:
    """The caption list of shard samples with a `.txt` member (names `shard#key`)."""
    kept = [e for e in entries if e.get("txt")]
    if not kept:
        raise DataFileError(f"{spec}: no sample of the shards has a {{key}}.txt caption; the video-text objective "
                            f"needs captioned shards (python -m datasets.shards write --list LIST with a caption "
                            f"column)")
    return CaptionList(spec, [_name(shards, e) for e in kept], [[e["txt"]] for e in kept])


class ShardCaptionDataset(ShardReading, CaptionVideoDataset):
    """Captioned shard samples for the video-text objective: a clip and one of its `.txt` captions as ids."""

    def __init__(self, spec: str, tokenizer, context_length: int, retries: int = DEFAULT_RETRIES,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, cache_dir: str | None = None, **kwargs) -> None:
        self.shards, entries, self.reader = read_shards(spec, retries, cache_bytes, cache_dir)
        kept = [e for e in entries if e.get("txt")]
        self.members = _members(kept)
        super().__init__(shard_captions(self.shards, entries, spec), tokenizer, context_length, **kwargs)


def shard_spec(data_path: str, split: str) -> str | None:
    """The shard spec a --data_path names for `split`: `<data_path>/<split>.shards` or the pattern itself;
    None for list-file data."""
    if is_shard_spec(data_path):
        return data_path
    listed = os.path.join(data_path, split + ".shards")
    return listed if not is_url(data_path) and os.path.isfile(listed) else None


def main(argv: list[str] | None = None) -> None:
    """`write` packs a list file into shards; `index` writes the index of existing shards."""
    from .shard_writer import main as writer_main

    writer_main(argv)


if __name__ == "__main__":
    main()
