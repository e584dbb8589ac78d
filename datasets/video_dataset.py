"""List-file video dataset: decode once, cut R augmented clips, survive bad files.

Randomness belongs to samples: every random choice of item (epoch, index) comes from
`np.random.default_rng([seed, epoch, index])`, so results do not depend on workers or ranks.
"""

import logging
import math
import os
import re

import numpy as np
import torch

from util.errors import DataFileError, MissingFileError

from .decode import (
    MAX_DECODE_SHORT_SIDE,
    MAX_FRAME_PIXELS,
    MAX_VIDEO_FRAMES,
    FrameBuffer,
    VideoInfo,
    check_regular_file,
    clip_span,
    clip_times,
    decode_frames,
    random_clip_start,
    uniform_clip_start,
)
from .sampling import FRAME_SAMPLINGS, segment_times
from .transforms import (
    build_rand_augment,
    build_random_erasing,
    clip_rand_augment,
    clip_random_erase,
    crop_resize,
    normalize_clips,
    random_resized_box,
    short_side_resize,
    spatial_crop,
)

logger = logging.getLogger(__name__)

MODES = ("pretrain", "finetune", "test")
_LINE = re.compile(r"^(.*?\S)[\s,]+(-?\d+)\s*$")
MAX_RETRIES = 10  # replacement draws per item before giving up on it


def _is_rank0() -> bool:
    """True on global rank 0 (also inside its data workers, where torch.distributed is not set up)."""
    return os.environ.get("RANK", "0") == "0"


_INT64 = 2**63


def read_list_file(list_file: str, data_root: str = "", num_classes: int | None = None) -> list[tuple[str, int]]:
    """Parse `path label` lines (space- or comma-separated, UTF-8, an optional BOM); paths are joined to `data_root`.

    Every error names file:line. Labels must lie in [0, num_classes) when `num_classes` is given (a bad one
    would fail only at the first step that draws it) and fit in int64 otherwise.
    """
    check_regular_file(list_file, "list file")
    with open(list_file, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM (spreadsheet exports) would glue onto the first path
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataFileError(f"{list_file}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start}); save the list as "
                         f"UTF-8") from None
    samples = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        m = _LINE.match(line.strip())
        if m is None:
            raise DataFileError(f"{list_file}:{lineno}: expected 'path label' (space or comma separated, "
                             f"integer label), got {line.strip()[:200]!r}")
        if len(m.group(2).lstrip("-").lstrip("0")) > 100:  # int() of over 4300 digits is a bare ValueError
            raise DataFileError(f"{list_file}:{lineno}: label {m.group(2)[:30]}... ({len(m.group(2))} characters) "
                                f"does not fit in 64 bits")
        label = int(m.group(2))
        if num_classes is not None and not 0 <= label < num_classes:
            raise DataFileError(f"{list_file}:{lineno}: label {m.group(2)[:30]} is outside [0, {num_classes}) "
                             f"(--num_classes {num_classes}); fix the list or --num_classes")
        if not -_INT64 <= label < _INT64:
            raise DataFileError(f"{list_file}:{lineno}: label {m.group(2)[:30]} does not fit in 64 bits")
        samples.append((os.path.join(data_root, m.group(1)), label))
    if not samples:
        raise DataFileError(f"{list_file}: list file holds no samples")
    return samples


class FailureTracker:
    """Counts decode attempts and failures (from the batches, in the main process) and stops a run whose
    files are too often unreadable.

    Stopping needs evidence, not a lucky streak: at least `min_attempts` decodes, and the lower end of
    the 99% Wilson interval of the failure rate above `max_failure_rate`. With 8% bad files and a 10%
    limit a run therefore goes on (the rate is within chance of 8%), while 30% bad files stop it
    within the first hundred decodes.
    """

    Z = 2.576  # two-sided 99% normal quantile

    def __init__(self, max_failure_rate: float = 0.1, min_attempts: int = 50, max_examples: int = 5,
                 log: bool = True, label: str = "", limit: str = "--max_failure_rate"):
        # `label` starts the error (e.g. a mixture source's name), `limit` names the setting to raise
        self.max_failure_rate, self.min_attempts, self.max_examples = max_failure_rate, min_attempts, max_examples
        self.log, self.label, self.limit = log, label, limit
        self.attempts, self.failures, self.examples = 0, 0, []

    def update(self, attempts: int, failures: int, paths=()) -> None:
        """Add counts (e.g. a batch's "attempts"/"failures"/"failed_paths"); raise if the rate is too high."""
        self.attempts += int(attempts)
        self.failures += int(failures)
        for p in paths:
            if p not in self.examples and len(self.examples) < self.max_examples:
                self.examples.append(p)
        if failures and self.log and _is_rank0():
            logger.warning("%sskipped %d unreadable video(s) (total %d of %d decodes), e.g. %s",
                           self.label, failures, self.failures, self.attempts, list(paths)[:3])
        self.check()

    def update_from_batch(self, batch: dict) -> None:
        """Add the counts carried by a collated batch."""
        self.update(batch["attempts"], batch["failures"], batch.get("failed_paths", ()))

    @property
    def rate(self) -> float:
        """Failures per attempted decode so far."""
        return self.failures / max(1, self.attempts)

    def lower_bound(self) -> float:
        """Lower end of the 99% Wilson score interval of the failure rate."""
        n, z = self.attempts, self.Z
        if n == 0:
            return 0.0
        p = self.failures / n
        centre = p + z * z / (2 * n)
        spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return max(0.0, (centre - spread) / (1 + z * z / n))

    def check(self) -> None:
        """Raise RuntimeError once the failure rate is above the threshold beyond reasonable doubt."""
        if self.attempts >= self.min_attempts and self.lower_bound() > self.max_failure_rate:
            raise RuntimeError(
                f"{self.label}video decode failure rate {self.rate:.1%} ({self.failures} of {self.attempts} decodes; at least "
                f"{self.lower_bound():.1%} with 99% confidence) exceeds {self.limit} "
                f"{self.max_failure_rate:.1%}; example files: {self.examples}. Fix or remove them (or re-encode with "
                f"python -m datasets.resize), or raise {self.limit}")


class VideoDataset(torch.utils.data.Dataset):
    """Videos from a `path label` list; items are dicts of R augmented clips (see `__getitem__`)."""

    def __init__(self, list_file: str, data_root: str = "", mode: str = "pretrain", num_frames: int = 16,
                 sampling_rate: int = 4, target_fps: float = 30, crop_size: int = 224, repeat_aug: int = 1,
                 scale: tuple[float, float] | None = None, aspect: tuple[float, float] = (0.75, 1.3333),
                 hflip: bool = True, short_side_range: tuple[int, int] | None = (256, 320),
                 rand_aug: str | None = None, reprob: float = 0.0, num_temporal_views: int = 1,
                 num_spatial_crops: int = 1, seed: int = 0, normalize: bool = True,
                 mask_noise_tokens: int | None = None, decode_threads: int = 1,
                 clip_timespan: float | None = None, samples: list[tuple[str, int]] | None = None,
                 num_classes: int | None = None, max_frame_pixels: int = MAX_FRAME_PIXELS,
                 max_video_frames: int = MAX_VIDEO_FRAMES, max_decode_short_side: int = MAX_DECODE_SHORT_SIDE,
                 frame_sampling: str = "stride"):
        # `samples` ((path, label) pairs) stands in for a list file, e.g. the videos of a caption list.
        # `num_classes`: labels of the list must index that many classes (checked when it is read).
        # `frame_sampling`: "stride" (num_frames frames sampling_rate apart at target_fps, MAE-ST) or "segment"
        # (one frame per equal segment of the whole video, SSv2's protocol: datasets/sampling.py)
        if mode not in MODES:
            raise DataFileError(f"mode must be one of {MODES}, got {mode!r}")
        if frame_sampling not in FRAME_SAMPLINGS:
            raise DataFileError(f"frame_sampling must be one of {FRAME_SAMPLINGS}, got {frame_sampling!r}")
        self.frame_sampling = frame_sampling
        if reprob > 0 and not normalize:
            raise DataFileError("reprob > 0 erases with normal noise in normalised space: needs normalize=True")
        self.samples = samples if samples is not None else read_list_file(list_file, data_root, num_classes)
        self.list_file, self.mode = list_file, mode
        self.num_frames, self.sampling_rate, self.target_fps = num_frames, sampling_rate, target_fps
        self.crop_size, self.repeat_aug = crop_size, (1 if mode == "test" else repeat_aug)
        self.scale = scale if scale is not None else ((0.5, 1.0) if mode == "pretrain" else (0.08, 1.0))
        self.aspect, self.hflip, self.short_side_range = aspect, hflip, short_side_range
        self.num_temporal_views, self.num_spatial_crops = num_temporal_views, num_spatial_crops
        self.views = num_temporal_views * num_spatial_crops if mode == "test" else 1
        self.seed, self.normalize, self.mask_noise_tokens = seed, normalize, mask_noise_tokens
        self.decode_threads = decode_threads  # FFmpeg threads per decode (datasets.loader.decode_threads_for)
        self.frame_buffer = FrameBuffer()  # decoded frames reuse one process-local array (pickles empty)
        # pretrain: the R clips start within this many seconds of each other (rho objectives); None: anywhere
        self.clip_timespan = clip_timespan
        self.bounds = {"max_pixels": max_frame_pixels, "max_frames": max_video_frames}  # checked before decoding
        # training clips of larger sources are decoded scaled down to this short side (0: full size)
        self.max_decode_short_side = max_decode_short_side or None
        # which video each data worker is on (shared memory, set up by datasets.loader.build_loader), so a
        # worker stuck in a read can be reported with its file; None: not tracked
        self.reading: torch.Tensor | None = None
        self.rand_aug = build_rand_augment(rand_aug, crop_size) if rand_aug and mode != "test" else None
        self.eraser = build_random_erasing(reprob) if reprob > 0 and mode != "test" else None
        # failures are counted in the main process (FailureTracker over the batches), once

    def __len__(self) -> int:
        """Number of items: videos, times views per video in test mode."""
        return len(self.samples) * self.views

    def track_workers(self, num_workers: int) -> None:
        """Let `num_workers` DataLoader workers record the video each is reading (read by `paths_being_read`)."""
        self.reading = torch.full((max(1, num_workers),), -1, dtype=torch.int64).share_memory_()

    def paths_being_read(self) -> list[str]:
        """The files the data workers are on now (from any process; empty when not tracked)."""
        if self.reading is None:
            return []
        return [self.samples[i][0] for i in self.reading.tolist() if 0 <= i < len(self.samples)]

    def _mark(self, video_index: int) -> None:
        """Record (in a worker) the video it is reading, -1 for none."""
        info = torch.utils.data.get_worker_info()
        if self.reading is not None and info is not None and info.id < len(self.reading):
            self.reading[info.id] = video_index

    def __getitem__(self, key) -> dict:
        """Item for `index` or `(epoch, index, *salt)`: clips [R, C, T, H, W], label/index [R], noise [R, L].

        `salt` (ints, e.g. a mixture's source and pass) joins the item's seed, so one video drawn twice in an
        epoch is two samples."""
        epoch, index, *salt = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, int(epoch), int(index), *(int(x) for x in salt)])
        video_index, view = divmod(int(index), self.views)
        failures, failed_paths = 0, []
        try:
            for _ in range(MAX_RETRIES + 1):
                path, label = self.samples[video_index]
                self._mark(video_index)
                try:
                    self._video_index = video_index  # read by _read (one item at a time)
                    clips = self._clips(path, rng, view)
                    break
                except Exception as e:  # noqa: BLE001 - any undecodable input must not kill the worker
                    failures += 1
                    failed_paths.append(path)
                    if _is_rank0():
                        logger.warning("cannot decode %s (%s: %s); %s", path, type(e).__name__, e,
                                       "its view is not scored" if self.mode == "test" else "drawing another video")
                    if self.mode == "test":  # a test view stands for its own video: never score another in its place
                        return self._failed_view(video_index, view, label, path)
                    video_index = int(rng.integers(len(self.samples)))  # deterministic replacement
            else:
                raise RuntimeError(f"{MAX_RETRIES + 1} videos in a row failed to decode, e.g. {failed_paths[:5]}")
        finally:
            self._mark(-1)
        r = clips.shape[0]
        item = {"clips": clips, "label": torch.full((r,), label, dtype=torch.long),
                "index": torch.full((r,), video_index, dtype=torch.long),
                "failures": failures, "attempts": failures + 1, "failed_paths": failed_paths}
        if self.mode == "test":
            item["view"] = torch.tensor([view], dtype=torch.long)
            item["valid"] = torch.ones(1, dtype=torch.bool)
        if self.mask_noise_tokens:
            item["noise"] = torch.from_numpy(rng.random((r, self.mask_noise_tokens), dtype=np.float32))
        if self.mode == "pretrain":  # where each clip was cut (models/amt.py reads its attention through it)
            item["geometry"] = self._geometry
        return item

    def _failed_view(self, video_index: int, view: int, label: int, path: str) -> dict:
        """A test item for a view that could not be decoded: blank clip, `valid` False (evaluation skips it)."""
        s = self.crop_size
        clips = torch.zeros(1, 3, self.num_frames, s, s, dtype=torch.float32 if self.normalize else torch.uint8)
        return {"clips": clips, "label": torch.tensor([label]), "index": torch.tensor([video_index]),
                "view": torch.tensor([view]), "valid": torch.zeros(1, dtype=torch.bool),
                "failures": 1, "attempts": 1, "failed_paths": [path]}

    def _read(self, path: str, times, **kw) -> np.ndarray:
        """The frames of video `path` shown at `times` (see decode_frames): uint8 [N, H, W, 3]; a frame-folder
        dataset reads images here instead (for sample `self._video_index`)."""
        return decode_frames(path, times, threads=self.decode_threads, **self.bounds, **kw)[0]

    def _clips(self, path: str, rng: np.random.Generator, view: int) -> torch.Tensor:
        """Decode once and cut the item's clips: [R, C, T, H, W]."""
        span = clip_span(self.num_frames, self.sampling_rate, self.target_fps)
        if self.mode == "test":
            t_view, s_view = divmod(view, self.num_spatial_crops)

            def times(info: VideoInfo) -> np.ndarray:
                if self.frame_sampling == "segment":
                    return segment_times(info, self.num_frames, view=t_view, num_views=self.num_temporal_views)
                start = uniform_clip_start(info.duration, span, t_view, self.num_temporal_views)
                return clip_times(start, self.num_frames, self.sampling_rate, self.target_fps)

            frames = self._read(path, times, short_side=self.crop_size)
            frames = short_side_resize(torch.from_numpy(frames), self.crop_size)  # exact size after swscale
            clip = spatial_crop(frames, self.crop_size, s_view, self.num_spatial_crops)
            clip = clip.unsqueeze(0)
            return normalize_clips(clip) if self.normalize else clip

        # R temporal windows, decoded in one pass: the repeats differ in time and in crop
        placed = {}

        def times(info: VideoInfo) -> np.ndarray:
            if self.frame_sampling == "segment":  # each repeat draws its own frame in every segment
                clips = [segment_times(info, self.num_frames, rng) for _ in range(self.repeat_aug)]
                placed.update(starts=[float(c[0]) for c in clips], duration=info.duration)
                return np.concatenate(clips)
            if self.clip_timespan is None:
                starts = [random_clip_start(info.duration, span, rng) for _ in range(self.repeat_aug)]
            else:
                starts = timespan_clip_starts(info.duration, span, self.clip_timespan, self.repeat_aug, rng)
            placed.update(starts=starts, duration=info.duration)
            return np.concatenate([clip_times(s, self.num_frames, self.sampling_rate, self.target_fps)
                                   for s in starts])

        frames = self._read(path, times, buffer=self.frame_buffer,
                            max_short_side=self.max_decode_short_side)
        frames = torch.from_numpy(frames)
        _, h, w, _ = frames.shape
        t, s = self.num_frames, self.crop_size
        # without RandAugment / erasing each clip goes straight into the item's tensor
        plain = self.rand_aug is None and self.eraser is None
        if plain:
            clips = torch.empty((self.repeat_aug, 3, t, s, s), dtype=torch.float32 if self.normalize else torch.uint8)
        out, geometry = [], []
        for r in range(self.repeat_aug):
            box = random_resized_box(h, w, rng, self.scale, self.aspect, self.short_side_range, s)
            flip = bool(self.hflip and rng.random() < 0.5)
            geometry.append((placed["starts"][r], placed["duration"], box[0] / h, box[1] / w, box[2] / h, box[3] / w,
                             float(flip)))
            if plain:
                crop_resize(frames[r * t:(r + 1) * t], box, s, flip, out=clips[r])
                continue
            clip = crop_resize(frames[r * t:(r + 1) * t], box, s, flip)
            if self.rand_aug is not None:
                clip = clip_rand_augment(clip, self.rand_aug, int(rng.integers(2**31)))
            if self.normalize:
                clip = normalize_clips(clip)
            if self.eraser is not None:
                clip = clip_random_erase(clip, self.eraser, int(rng.integers(2**31)))
            out.append(clip)
        self._geometry = torch.tensor(geometry, dtype=torch.float32)  # read by __getitem__ (one item at a time)
        if not plain:
            return torch.stack(out)
        return normalize_clips(clips, inplace=True) if self.normalize else clips


def timespan_clip_starts(duration: float, span: float, timespan: float, count: int,
                         rng: np.random.Generator) -> list[float]:
    """`count` clip starts drawn uniformly in a window of `timespan` s placed uniformly in the video.

    So no two clips start more than `timespan` apart (the rho-persistency study's timespan limit);
    a window longer than the room for starts is the whole video.
    """
    room = max(0.0, duration - span)
    width = min(room, max(0.0, timespan))
    low = float(rng.uniform(0.0, room - width))
    return [low + float(rng.uniform(0.0, width)) for _ in range(count)]


def collate_clips(batch: list[dict]) -> dict:
    """Concatenate items along R: clips [B*R, C, T, H, W], label/index/view/source [B*R], noise [B*R, L], geometry [B*R, 7],
    tokens [B*R, N]."""
    keys = ("clips", "label", "index", "view", "valid", "noise", "geometry", "tokens", "source")
    out = {k: torch.cat([b[k] for b in batch]) for k in keys if k in batch[0]}
    out["failures"] = sum(b["failures"] for b in batch)
    out["attempts"] = sum(b["attempts"] for b in batch)
    out["failed_paths"] = [p for b in batch for p in b["failed_paths"]]
    return out


def build_video_dataset(data_path: str, split: str, **kwargs) -> VideoDataset:
    """Dataset for `split` ('train', 'val', 'test') from `<data_path>/<split>.csv` (or .txt), or from tar shards:
    `<data_path>/<split>.shards` or a shard pattern (datasets/shards.py; `shard_*` kwargs go there)."""
    from .shards import ShardDataset, shard_spec  # shards build on this module

    spec = shard_spec(data_path, split)
    shard_args = {k: kwargs.pop(k) for k in ("retries", "cache_bytes", "cache_dir") if k in kwargs}
    if spec is not None:
        kwargs.pop("data_root", None)
        return ShardDataset(spec, **shard_args, **kwargs)
    for ext in (".csv", ".txt"):
        list_file = os.path.join(data_path, split + ext)
        if os.path.lexists(list_file):  # present but a directory or FIFO: say so (read_list_file does)
            kwargs.setdefault("data_root", data_path)
            return VideoDataset(list_file, **kwargs)
    raise MissingFileError(f"no {split}.csv or {split}.txt in {data_path}")
