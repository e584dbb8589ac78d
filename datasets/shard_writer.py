"""Pack a list file of videos into tar shards of a target size, each with its index (datasets/shards.py).

    python -m datasets.shards write --list train.csv --out DIR --shard_size 1GB [--root FOLDER] [--split train]
    python -m datasets.shards index SHARD.tar ...

List lines are `path label` or `path label caption` (space or comma separated): a line whose second field is an
integer is `path label caption` (the caption may hold spaces, that path may not), else `path label`. Sample i becomes `{i:08d}.{ext}` (the video), `.cls` (the label), `.txt` (the caption,
if any) and `.json` (the source path, label and caption) in shard `{n:06d}.tar`; DIR/<split>.shards lists the
shards for `--data_path DIR`.

Resumable: which videos go to which shard is planned from the list and the files' sizes before anything is
written (a shard closes when the next video would pass --shard_size), and recorded in DIR/writer.json; a
rerun with the same list skips every shard whose tar and index are complete. A shard is written to a
temporary name and renamed when complete, its index after it, so a killed writer never leaves a half shard
under a final name; a different list for the same DIR is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import tarfile

from util.errors import ConfigError, DataFileError

from .decode import check_regular_file
from .shards import INDEX_SUFFIX, index_tar, load_index
from .storage import ByteReader

_PLAIN = re.compile(r"^(.*?\S)[\s,]+(-?\d+)\s*$")
_CAPTIONED = re.compile(r"^([^\s,]+)[\s,]+(-?\d+)[\s,]+(.*\S)\s*$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of '1GB', '500MB', '64KiB' or a plain number."""
    m = _SIZE.match(text.strip())
    if m is None:
        raise ConfigError(f"--shard_size {text!r}: expected a size such as 1GB, 500MB or 1048576")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def read_video_list(path: str, root: str) -> list[tuple[str, int, str | None]]:
    """(path, label, caption or None) per line of a `path label [caption]` list; paths joined to `root`."""
    check_regular_file(path, "list file")
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            m = _CAPTIONED.match(line)  # a second field that is an integer: `path label caption`
            caption = m.group(3) if m else None
            m = m or _PLAIN.match(line)
            if m is None:
                raise DataFileError(f"{path}:{lineno}: expected 'path label' or 'path label caption', got "
                                    f"{line[:200]!r}")
            out.append((os.path.join(root, m.group(1)), int(m.group(2)), caption))
    if not out:
        raise DataFileError(f"{path}: list file holds no samples")
    return out


def plan_shards(sizes: list[int], shard_size: int) -> list[list[int]]:
    """Sample numbers per shard, in order: a shard closes when the next video would take it past `shard_size`."""
    plan: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if plan[-1] and used + n > shard_size:
            plan.append([])
            used = 0
        plan[-1].append(i)
        used += n + 2048  # headers of the video and its small members
    return plan


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member `name` holding `data` (fixed mtime and owner: the same list gives the same bytes)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, items: list[tuple[int, str, int, str | None]], root: str) -> None:
    """Write shard `path` (tmp name, then renamed) and its index from (number, video, label, caption) items."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, video, label, caption in items:
                key = f"{i:08d}"
                ext = os.path.splitext(video)[1].lstrip(".").lower() or "mp4"
                with open(video, "rb") as v:
                    _add(tar, f"{key}.{ext}", v.read())
                _add(tar, f"{key}.cls", str(label).encode())
                if caption is not None:
                    _add(tar, f"{key}.txt", caption.encode())
                meta = {"path": os.path.relpath(video, root), "label": label, "caption": caption}
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    write_index(path)


def write_index(path: str) -> dict:
    """Index the local shard `path` and write `{path}.index.json` beside it (atomically)."""
    reader = ByteReader()
    with open(path, "rb") as f:
        index = index_tar(f, os.path.getsize(path), path)
    tmp = path + INDEX_SUFFIX + ".tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, separators=(",", ":"))
    os.replace(tmp, path + INDEX_SUFFIX)
    return load_index(path, reader)


def write_shards(list_file: str, out: str, shard_size: int, root: str | None = None, split: str = "train",
                 log=print) -> list[str]:
    """Pack `list_file` into shards in `out` (resumable); returns the shard paths and writes `<split>.shards`."""
    root = root if root is not None else os.path.dirname(os.path.abspath(list_file))
    items = read_video_list(list_file, root)
    for video, _, _ in items:
        check_regular_file(video, "video")
    plan = plan_shards([os.path.getsize(v) for v, _, _ in items], shard_size)
    with open(list_file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    record = {"list": os.path.abspath(list_file), "list_sha256": digest, "shard_size": shard_size,
              "shards": len(plan)}
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, "writer.json")
    if os.path.exists(marker):
        with open(marker) as f:
            old = json.load(f)
        if (old.get("list_sha256"), old.get("shard_size")) != (digest, shard_size):
            raise ConfigError(f"{out} holds shards of another list or --shard_size ({old.get('list')}, "
                              f"{old.get('shard_size')} bytes); write to a new folder or delete it")
    else:
        with open(marker + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(marker + ".tmp", marker)
    paths = []
    for n, members in enumerate(plan):
        path = os.path.join(out, f"{n:06d}.tar")
        paths.append(path)
        if os.path.exists(path) and os.path.exists(path + INDEX_SUFFIX):
            log(f"{path}: done before, skipped")
            continue
        if os.path.exists(path):  # renamed complete, killed before its index
            write_index(path)
            log(f"{path}: indexed")
            continue
        write_shard(path, [(i, *items[i]) for i in members], root)
        log(f"{path}: {len(members)} videos, {os.path.getsize(path)} bytes")
    with open(os.path.join(out, f"{split}.shards.tmp"), "w") as f:
        f.write("".join(os.path.basename(p) + "\n" for p in paths))
    os.replace(os.path.join(out, f"{split}.shards.tmp"), os.path.join(out, f"{split}.shards"))
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: `write` (pack a list into shards) or `index` (index existing local shards)."""
    p = argparse.ArgumentParser(prog="python -m datasets.shards", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="pack a 'path label [caption]' list into tar shards with their index")
    w.add_argument("--list", required=True, help="list file: 'path label [caption]' per line")
    w.add_argument("--out", required=True, help="folder for the shards, their indexes and <split>.shards")
    w.add_argument("--shard_size", default="1GB", help="target bytes per shard (e.g. 1GB, 500MB)")
    w.add_argument("--root", default=None, help="folder the list's paths are relative to (default: the list's)")
    w.add_argument("--split", default="train", help="name of the shard list written: <split>.shards")
    i = sub.add_parser("index", help="write {shard}.index.json beside existing local shards")
    i.add_argument("shards", nargs="+")
    a = p.parse_args(argv)
    if a.command == "write":
        paths = write_shards(a.list, a.out, parse_size(a.shard_size), a.root, a.split)
        print(f"{len(paths)} shards in {a.out}; train with --data_path {a.out}")
    else:
        for path in a.shards:
            index = write_index(path)
            print(f"{path}: {len(index['samples'])} samples, {len(index['problems'])} problems {index['problems']}")
