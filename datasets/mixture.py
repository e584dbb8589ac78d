"""Weighted mixtures of list-file sources: an epoch's draw from (seed, epoch), every batch from one source.

A mixture file (YAML, `--data_mixture FILE`) lists sources, each a list file with its own weight and
temporal sampling. An epoch is a fixed number of *blocks* of `block_size` consecutive items, each block
from one source; the order of the blocks and the videos inside them are drawn from (seed, epoch) only.
The training sampler keeps these positions in order (no second shuffle), so its world-size-free
`consumed` count still says exactly where a run is, and a rank's batch (`--batch_size` divides
`block_size`) always holds clips of one source: one frame count, stride and repeat count per batch.

- `weight: once`: each video of the source once per epoch, in a new order every epoch; its last block is
  filled up with videos from the start of that order (fewer than `block_size` repeats).
- `weight: <number>`: the weighted sources share `weighted_items` items per epoch (default: their total
  size) in proportion to their weights (exact shares of whole blocks, largest remainder). Each source is
  read as an endless stream of permutations (pass p seeded by (seed, source, p)), epoch e taking its next
  slice: videos repeat only when a source's share is larger than the source, and over epochs every video
  is drawn equally often.

A source is a list of video files (`data_format: video`, the default) or a frame-folder list
(`data_format: frames`, datasets/frame_folder.py; `frame_fps`, `frame_template`, `frame_start_index` per source,
else the run's flags). `mixture_fingerprint` is what checkpoints record of a mixture, so that a resume with
another one is refused (util/trainer.py; `--allow_mixture_change` lets it through).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from util.config import read_config_file
from util.errors import ConfigError, short_repr

from .sampling import FRAME_SAMPLINGS
from .video_dataset import FailureTracker, VideoDataset

TOP_KEYS = ("sources", "block_size", "weighted_items")
SOURCE_KEYS = ("name", "list_file", "shards", "root", "weight", "sampling_rate", "target_fps", "frame_sampling",
               "repeat_aug", "max_failure_rate", "data_format", "frame_fps", "frame_template", "frame_start_index")
FRAME_KEYS = ("frame_fps", "frame_template", "frame_start_index")  # FrameFolderDataset arguments (data_format: frames)
SAMPLING_KEYS = ("sampling_rate", "target_fps", "frame_sampling", "repeat_aug")  # VideoDataset arguments
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# distinct first words of the generators' seeds, so the draws of orders, passes and blocks never coincide
_ONCE, _PASS, _BLOCKS = 1, 2, 3


@dataclass(frozen=True)
class MixtureSource:
    """One source of a mixture: its list file, share of the epoch and temporal sampling."""

    name: str
    list_file: str
    root: str
    weight: float | None  # None: each video once per epoch
    sampling: dict[str, Any]  # the VideoDataset arguments it sets (sampling_rate, target_fps, ...)
    max_failure_rate: float | None  # None: the run's --max_failure_rate
    shards: str | None = None  # tar shards instead of a list file: a .shards list or a pattern (datasets/shards.py)
    data_format: str = "video"  # video list files, or frame-folder lists (datasets/frame_folder.py): "frames"
    frames: dict[str, Any] = field(default_factory=dict)  # FRAME_KEYS it sets (default: the run's --frame_* flags)


@dataclass(frozen=True)
class Mixture:
    """A validated mixture file."""

    path: str
    sources: tuple[MixtureSource, ...]
    block_size: int
    weighted_items: int | None


def _is_int(value: Any) -> bool:
    """True for an int that is not a bool (YAML's `true` is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """True for an int or float that is not a bool and is finite."""
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _source(path: str, i: int, raw: Any, folder: str) -> MixtureSource:
    """Source `i` of mixture file `path`, checked; ConfigError names the file, the key and the fix."""
    where = f"{path}: sources[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping (name, list_file, weight, ...), got {short_repr(raw)}")
    unknown = sorted(str(k) for k in raw if k not in SOURCE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(SOURCE_KEYS)}")
    for key in ("name", "weight"):
        if key not in raw:
            raise ConfigError(f"{where}: missing key {key!r} (every source needs name, list_file or shards, and "
                              f"weight)")
    if ("list_file" in raw) == ("shards" in raw):
        raise ConfigError(f"{where}: give exactly one of list_file (a 'path label' list) and shards (a .shards "
                          f"list or a shard pattern such as shards/{{000000..000009}}.tar)")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name: expected 1-64 letters, digits, '_', '-' or '.', got {short_repr(name)}")
    where = f"{path}: source {name!r}"
    if "shards" in raw:
        return _shard_source(where, raw, name, folder)
    list_file = raw["list_file"]
    if not isinstance(list_file, str) or not list_file:
        raise ConfigError(f"{where}.list_file: expected a path, got {short_repr(list_file)}")
    list_file = os.path.join(folder, os.path.expanduser(list_file))  # relative to the mixture file
    if not os.path.isfile(list_file):
        raise ConfigError(f"{where}.list_file: {list_file} is not a file; give the path of a 'path label' list "
                          f"(absolute, or relative to the folder of {path})")
    root = raw.get("root", os.path.dirname(list_file))
    if not isinstance(root, str):
        raise ConfigError(f"{where}.root: expected a folder path, got {short_repr(root)}")
    root = os.path.join(folder, os.path.expanduser(root))
    if not os.path.isdir(root):
        raise ConfigError(f"{where}.root: {root} is not a folder; give the folder the list's paths are relative to "
                          f"(default: the list file's folder)")
    weight, sampling, rate = _weight_sampling(where, raw)
    data_format, frames = _source_format(where, raw)
    return MixtureSource(name, list_file, root, weight, sampling, rate, data_format=data_format, frames=frames)


def _shard_source(where: str, raw: dict, name: str, folder: str) -> MixtureSource:
    """A source of tar shards: `shards` is a .shards list file or a pattern, relative to the mixture file."""
    from .shards import is_shard_spec, read_shard_list
    from .storage import is_url

    spec = raw["shards"]
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{where}.shards: expected a .shards list file or a shard pattern, got {short_repr(spec)}")
    if "root" in raw:
        raise ConfigError(f"{where}.root: a shard source has no root (its list and patterns name the shards)")
    if _source_format(where, raw) != ("video", {}):
        raise ConfigError(f"{where}: shards hold videos: data_format and frame_* keys apply to frame-folder list "
                          f"files only; remove them")
    if not is_url(spec):
        spec = os.path.join(folder, os.path.expanduser(spec))
    if not (spec.endswith(".shards") or is_shard_spec(spec)):
        raise ConfigError(f"{where}.shards: {spec} is neither a .shards list file nor a .tar pattern")
    if spec.endswith(".shards") and not os.path.isfile(spec):
        raise ConfigError(f"{where}.shards: {spec} is not a file; give the .shards list the writer made (python -m "
                          f"datasets.shards write) or a pattern")
    read_shard_list(spec)  # a bad pattern fails now
    weight, sampling, rate = _weight_sampling(where, raw)
    return MixtureSource(name, "", "", weight, sampling, rate, shards=spec)


def _weight_sampling(where: str, raw: dict) -> tuple[float | None, dict[str, Any], float | None]:
    """(weight, sampling, max_failure_rate) of a source, checked."""
    weight = raw["weight"]
    if weight == "once":
        weight = None
    elif not _is_number(weight) or weight <= 0:
        raise ConfigError(f"{where}.weight: expected a positive number or 'once' (each video once per epoch), "
                          f"got {short_repr(weight)}")
    sampling = {k: raw[k] for k in SAMPLING_KEYS if k in raw}
    for key in ("sampling_rate", "repeat_aug"):
        if key in sampling and (not _is_int(sampling[key]) or sampling[key] < 1):
            raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {short_repr(sampling[key])}")
    if "target_fps" in sampling and (not _is_number(sampling["target_fps"]) or sampling["target_fps"] <= 0):
        raise ConfigError(f"{where}.target_fps: expected a number > 0, got {short_repr(sampling['target_fps'])}")
    if "frame_sampling" in sampling and sampling["frame_sampling"] not in FRAME_SAMPLINGS:
        raise ConfigError(f"{where}.frame_sampling: expected one of {', '.join(FRAME_SAMPLINGS)}, got "
                          f"{short_repr(sampling['frame_sampling'])}")
    rate = raw.get("max_failure_rate")
    if rate is not None and (not _is_number(rate) or not 0 <= rate <= 1):
        raise ConfigError(f"{where}.max_failure_rate: expected a number in [0, 1], got {short_repr(rate)}")
    return None if weight is None else float(weight), sampling, None if rate is None else float(rate)


def _source_format(where: str, raw: dict) -> tuple[str, dict[str, Any]]:
    """(data_format, frame-folder arguments) of a source, checked."""
    fmt = raw.get("data_format", "video")
    if fmt not in ("video", "frames"):
        raise ConfigError(f"{where}.data_format: expected video (a list of video files) or frames (a frame-folder "
                          f"list, docs/downstream.md), got {short_repr(fmt)}")
    frames = {k: raw[k] for k in FRAME_KEYS if k in raw}
    if frames and fmt != "frames":
        raise ConfigError(f"{where}: {sorted(frames)[0]} applies to frame folders only; add data_format: frames or "
                          f"remove it")
    if "frame_fps" in frames and (not _is_number(frames["frame_fps"]) or frames["frame_fps"] <= 0):
        raise ConfigError(f"{where}.frame_fps: expected a number > 0, got {short_repr(frames['frame_fps'])}")
    if "frame_template" in frames and not isinstance(frames["frame_template"], str):
        raise ConfigError(f"{where}.frame_template: expected a file name such as img_{{:05d}}.jpg, got "
                          f"{short_repr(frames['frame_template'])}")
    if "frame_start_index" in frames and (not _is_int(frames["frame_start_index"]) or frames["frame_start_index"] < 0):
        raise ConfigError(f"{where}.frame_start_index: expected an integer >= 0, got "
                          f"{short_repr(frames['frame_start_index'])}")
    return fmt, frames


def load_mixture(path: str) -> Mixture:
    """The mixture in YAML file `path`, checked strictly: unknown keys, bad values and missing files are
    ConfigErrors naming the file, the key and the fix (before any work)."""
    raw = read_config_file(path)
    unknown = sorted(str(k) for k in raw if k not in TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_KEYS)}")
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"{path}: sources: expected a non-empty list of sources (name, list_file, weight, ...), "
                          f"got {short_repr(sources)}")
    folder = os.path.dirname(os.path.abspath(path))
    parsed = tuple(_source(path, i, s, folder) for i, s in enumerate(sources))
    names = [s.name for s in parsed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: source name {twice[0]!r} appears twice; give every source its own name")
    if "block_size" not in raw:
        raise ConfigError(f"{path}: missing key 'block_size' (items in a row from one source; a multiple of "
                          f"--batch_size, e.g. 64)")
    block = raw["block_size"]
    if not _is_int(block) or block < 1:
        raise ConfigError(f"{path}: block_size: expected an integer >= 1, got {short_repr(block)}")
    items = raw.get("weighted_items")
    if items is not None:
        if not _is_int(items) or items < 1:
            raise ConfigError(f"{path}: weighted_items: expected an integer >= 1, got {short_repr(items)}")
        if all(s.weight is None for s in parsed):
            raise ConfigError(f"{path}: weighted_items: no source has a numeric weight (all are 'once'); remove "
                              f"the key or weight a source")
    return Mixture(path, parsed, block, items)


def blocks_per_source(lengths: Sequence[int], weights: Sequence[float | None], block: int,
                      weighted_items: int | None) -> list[int]:
    """Blocks each source fills per epoch (the same every epoch): whole sources for 'once', exact shares
    (largest remainder, ties to the earlier source) of the weighted items for the others."""
    counts = [math.ceil(n / block) if w is None else 0 for n, w in zip(lengths, weights, strict=True)]
    weighted = [i for i, w in enumerate(weights) if w is not None]
    if weighted:
        total_items = weighted_items if weighted_items is not None else sum(lengths[i] for i in weighted)
        total = math.ceil(total_items / block)
        wsum = sum(weights[i] for i in weighted)
        exact = {i: total * weights[i] / wsum for i in weighted}
        for i in weighted:
            counts[i] = math.floor(exact[i])
        by_remainder = sorted(weighted, key=lambda i: (-(exact[i] - counts[i]), i))
        for i in by_remainder[:total - sum(counts[i] for i in weighted)]:
            counts[i] += 1
    return counts


def _once_stream(seed: int, epoch: int, source: int, n: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Videos and pass numbers of a 'once' source in `epoch`: a permutation, padded by its own start."""
    order = np.random.default_rng([_ONCE, seed, epoch, source]).permutation(n)
    videos = np.resize(order, count)  # np.resize repeats the order from its start
    return videos, np.arange(count) // n


def _weighted_stream(seed: int, epoch: int, source: int, n: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Videos and pass numbers of items [epoch*count, (epoch+1)*count) of a source's endless permutations."""
    positions = np.arange(epoch * count, (epoch + 1) * count, dtype=np.int64)
    passes = positions // n
    videos = np.empty(count, dtype=np.int64)
    for p in np.unique(passes):
        here = passes == p
        videos[here] = np.random.default_rng([_PASS, seed, source, int(p)]).permutation(n)[positions[here] % n]
    return videos, passes


def draw_epoch(seed: int, epoch: int, lengths: Sequence[int], weights: Sequence[float | None], block: int,
               weighted_items: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The epoch's items in order, a function of (seed, epoch) and the mixture only: (source, video, pass)
    arrays; positions [k*block, (k+1)*block) come from one source."""
    counts = blocks_per_source(lengths, weights, block, weighted_items)
    block_source = np.repeat(np.arange(len(counts)), counts)
    block_source = block_source[np.random.default_rng([_BLOCKS, seed, epoch]).permutation(len(block_source))]
    source = np.repeat(block_source, block)
    video = np.empty(len(source), dtype=np.int64)
    passes = np.empty(len(source), dtype=np.int64)
    for s, (n, w, c) in enumerate(zip(lengths, weights, counts, strict=True)):
        if not c:
            continue
        stream = _once_stream if w is None else _weighted_stream
        v, p = stream(seed, epoch, s, n, c * block)
        here = source == s  # the source's blocks take its stream in order
        video[here], passes[here] = v, p
    return source, video, passes


class SourceFailures:
    """One FailureTracker per source (each with its own limit); a batch is attributed by its `source`."""

    def __init__(self, names: Sequence[str], rates: Sequence[float], mixture_path: str) -> None:
        self.names = list(names)
        self.trackers = [FailureTracker(rate, label=f"source {name!r} of {mixture_path}: ",
                                        limit=f"the source's max_failure_rate ({mixture_path})")
                         for name, rate in zip(names, rates, strict=True)]

    def update_from_batch(self, batch: dict) -> None:
        """Add a batch's counts to its source's tracker; a batch of several sources is a bug, refused."""
        sources = torch.unique(batch["source"]).tolist()
        if len(sources) != 1:
            raise RuntimeError(f"a batch holds clips of several mixture sources {sources}: --batch_size must divide "
                               f"the mixture's block_size and the position must be a multiple of --batch_size")
        self.trackers[sources[0]].update_from_batch(batch)

    def rates(self) -> dict[str, float]:
        """Decode-failure rate per source so far (this rank's batches)."""
        return {n: t.rate for n, t in zip(self.names, self.trackers, strict=True)}


class MixtureDataset(torch.utils.data.Dataset):
    """Items of a mixture by (epoch, position in the epoch's draw); `draws_epochs` tells the sampler not to
    shuffle again. Items are the sources' VideoDataset items plus "source" [R]."""

    draws_epochs = True

    def __init__(self, mixture: Mixture, datasets: Sequence[VideoDataset], seed: int) -> None:
        self.mixture, self.datasets, self.seed = mixture, list(datasets), seed
        self.names = [s.name for s in mixture.sources]
        self.lengths = [len(d) for d in datasets]
        self.weights = [s.weight for s in mixture.sources]
        self.block_size = mixture.block_size
        self.blocks = blocks_per_source(self.lengths, self.weights, self.block_size, mixture.weighted_items)
        self._drawn: tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        first = self.datasets[0]
        # what the loader's shared-memory check and the trainer read: the largest batch any source makes
        self.crop_size, self.normalize, self.num_frames = first.crop_size, first.normalize, first.num_frames
        self.repeat_aug = max(d.repeat_aug for d in self.datasets)

    def __len__(self) -> int:
        """Items per epoch (the same every epoch)."""
        return sum(self.blocks) * self.block_size

    def draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, video, pass) of every position of `epoch` (cached for the last epoch asked)."""
        if self._drawn is None or self._drawn[0] != epoch:
            self._drawn = (epoch, draw_epoch(self.seed, epoch, self.lengths, self.weights, self.block_size,
                                             self.mixture.weighted_items))
        return self._drawn[1]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        """The item at position `index` of `epoch`'s draw: its source's item plus "source" [R]."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        source, video, passes = self.draw(int(epoch))
        s = int(source[index])
        # (source, pass) join the item's seed: sources share video numbers, and a repeat is another sample
        item = self.datasets[s][(int(epoch), int(video[index]), s, int(passes[index]))]
        item["source"] = torch.full((item["clips"].shape[0],), s, dtype=torch.long)
        return item

    def counts(self, epoch: int, consumed: int) -> dict[str, int]:
        """Items of each source among the first `consumed` positions of `epoch` (all ranks together)."""
        drawn = np.bincount(self.draw(epoch)[0][:consumed], minlength=len(self.names))
        return dict(zip(self.names, (int(c) for c in drawn), strict=True))

    def failure_tracker(self, default_rate: float) -> SourceFailures:
        """Per-source failure policy: each source's max_failure_rate, else `default_rate` (--max_failure_rate)."""
        rates = [default_rate if s.max_failure_rate is None else s.max_failure_rate for s in self.mixture.sources]
        return SourceFailures(self.names, rates, self.mixture.path)

    def log_metrics(self, epoch: int, consumed: int, tracker: SourceFailures) -> dict[str, float]:
        """Per-source items drawn so far in the epoch (global) and decode-failure rates (this rank)."""
        out: dict[str, float] = {f"items/{n}": c for n, c in self.counts(epoch, consumed).items()}
        out.update({f"bad_rate/{n}": r for n, r in tracker.rates().items()})
        return out

    def describe(self) -> str:
        """One line per source: size, share of the epoch, sampling."""
        return "; ".join(f"{s.name}: {n} {'frame folders' if s.data_format == 'frames' else 'videos'}, "
                         f"{b * self.block_size} items/epoch"
                         f"{' (each once)' if s.weight is None else f' (weight {s.weight:g})'}"
                         f"{''.join(f', {k} {v}' for k, v in s.sampling.items())}"
                         for s, n, b in zip(self.mixture.sources, self.lengths, self.blocks, strict=True))


def mixture_fingerprint(mixture: Mixture) -> dict[str, Any]:
    """What a run's draw depends on, as plain values for checkpoints: block size, weighted items, and per source
    its name, weight, format, sampling and frame options, failure limit, and its list file's SHA-256 and line
    count (contents, not paths: a mixture whose files moved is the same mixture; for shards, their names)."""
    sources = []
    for s in mixture.sources:
        if s.shards is not None:  # the shards' names in order (an index is rebuilt when its shard changes size)
            from .shards import read_shard_list

            data = "\n".join(os.path.basename(u) for u in read_shard_list(s.shards)).encode()
        else:
            with open(s.list_file, "rb") as f:
                data = f.read()
        sources.append({"name": s.name, "weight": s.weight, "data_format": s.data_format, "sampling": dict(s.sampling),
                        "frames": dict(s.frames), "max_failure_rate": s.max_failure_rate,
                        "list_sha256": hashlib.sha256(data).hexdigest(),
                        "list_lines": sum(1 for line in data.splitlines() if line.strip())})
    return {"block_size": mixture.block_size, "weighted_items": mixture.weighted_items, "sources": sources}


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How mixture fingerprint `now` differs from `saved`, one phrase per difference (empty: the same mixture)."""
    out = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in ("block_size", "weighted_items") if saved.get(k) != now.get(k)]
    old = {s["name"]: s for s in saved.get("sources", [])}
    new = {s["name"]: s for s in now.get("sources", [])}
    out += [f"source {n!r} removed" for n in old if n not in new] + [f"source {n!r} added" for n in new if n not in old]
    if [n for n in old if n in new] != [n for n in new if n in old]:
        out.append(f"source order {list(old)} -> {list(new)}")
    for name in (n for n in new if n in old):
        a, b = old[name], new[name]
        if a.get("list_sha256") != b.get("list_sha256"):
            out.append(f"source {name!r}: list file contents changed ({a.get('list_lines')} -> {b.get('list_lines')} "
                       f"lines)")
        out += [f"source {name!r}: {k} {a.get(k)!r} -> {b.get(k)!r}" for k in
                ("weight", "data_format", "sampling", "frames", "max_failure_rate") if a.get(k) != b.get(k)]
    return out
