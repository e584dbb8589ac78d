"""Videos stored as folders of extracted frames (JPEG or PNG), read like the list-file video dataset.

Two list formats are read (the format is detected from the file):

- VideoMAE v2's rawframe lists: `folder start_index total_frames label` per line (its pretraining lists without
  the label, its fine-tuning lists without the start index: `folder total_frames label`, whose frames then
  start at `--frame_start_index`, 1 as in VideoMAE v2). Frame k of a folder is
  `folder/<--frame_template formatted with start_index + k>`, `img_{:05d}.jpg` by default (VideoMAE v2's
  `--fname_tmpl img_{:05}.jpg`, `--start_idx 1`).
- PySlowFast's frame lists: a header line `original_vido_id video_id frame_id path labels`, then one line per
  frame; the frames of a video are its lines in order, its label the `labels` field (one class per video).

A folder of N frames is a video of N frames at `--frame_fps` (the rate the frames were extracted at, 30 by
default): clip times become frame indices exactly as the decoder turns them into frames of a constant-rate
video, and every random draw is the video dataset's (same generator, same order), so a folder made from a
video gives that video's clips. A missing or undecodable frame makes its video a bad file: skipped, counted
and logged like an unreadable video (`--max_failure_rate`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from util.errors import DataFileError, MissingFileError

from .decode import _TIME_TOL, VideoInfo, check_bounds, check_regular_file
from .transforms import short_side_resize
from .video_dataset import _INT64, VideoDataset

FRAME_TEMPLATE = "img_{:05d}.jpg"  # VideoMAE v2 run_class_finetuning.py --fname_tmpl default img_{:05}.jpg
FRAME_START_INDEX = 1  # VideoMAE v2 run_class_finetuning.py --start_idx default 1
SLOWFAST_HEADER = "original_vido_id"  # PySlowFast slowfast/datasets/utils.py load_image_lists (sic)


@dataclass
class FrameSource:
    """The frames of one video: `count` files named by a template from `start`, or listed `paths`."""

    folder: str
    start: int
    count: int
    paths: tuple[str, ...] | None = None

    def path(self, k: int, template: str) -> str:
        """File of frame k (0-based)."""
        if self.paths is not None:
            return self.paths[k]
        return os.path.join(self.folder, template.format(self.start + k))


def decode_image_pillow(path: str) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3] (Pillow)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def decode_image_torchvision(path: str) -> np.ndarray:
    """A JPEG (or PNG) file as uint8 RGB [H, W, 3] (torchvision.io.decode_image, libjpeg-turbo)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    return decode_image(read_file(path), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it."""
    with Image.open(path) as img:
        return img.size


def _check_label(list_file: str, lineno: int, text: str, num_classes: int | None) -> int:
    """The integer label `text` of file:line, in [0, num_classes) when given."""
    if not text.lstrip("-").isdigit() or len(text) > 30:
        raise DataFileError(f"{list_file}:{lineno}: label {text[:30]!r} is not an integer class index")
    label = int(text)
    if num_classes is not None and not 0 <= label < num_classes:
        raise DataFileError(f"{list_file}:{lineno}: label {label} is outside [0, {num_classes}) (--num_classes "
                            f"{num_classes}); fix the list or --num_classes")
    if not -_INT64 <= label < _INT64:
        raise DataFileError(f"{list_file}:{lineno}: label {text} does not fit in 64 bits")
    return label


def _read_text(list_file: str) -> list[str]:
    """Lines of a UTF-8 list file (an optional BOM dropped)."""
    check_regular_file(list_file, "list file")
    with open(list_file, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{list_file}: not valid UTF-8 ({exc.reason} at byte {exc.start}); save the list as "
                            f"UTF-8") from None


def read_frame_list(list_file: str, data_root: str = "", num_classes: int | None = None,
                    start_index: int = FRAME_START_INDEX) -> tuple[list[tuple[str, int]], list[FrameSource]]:
    """(folder, label) per video and where its frames are, from a VideoMAE v2 or PySlowFast frame list."""
    lines = _read_text(list_file)
    first = next((line for line in lines if line.strip()), "")
    parse = _slowfast_list if first.split()[:1] == [SLOWFAST_HEADER] else _videomae_list
    samples, sources = parse(list_file, lines, data_root, num_classes, start_index)
    if not samples:
        raise DataFileError(f"{list_file}: list file holds no videos")
    return samples, sources


def _videomae_list(list_file: str, lines: list[str], data_root: str, num_classes: int | None,
                   start_index: int) -> tuple[list[tuple[str, int]], list[FrameSource]]:
    """`folder start_index total_frames label` (or `folder total_frames label`) lines."""
    samples, sources = [], []
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 4 and all(p.lstrip("-").isdigit() for p in parts[-3:]):
            folder, start, count = " ".join(parts[:-3]), int(parts[-3]), int(parts[-2])
        elif len(parts) >= 3 and all(p.lstrip("-").isdigit() for p in parts[-2:]):
            folder, start, count = " ".join(parts[:-2]), start_index, int(parts[-2])
        else:
            raise DataFileError(f"{list_file}:{lineno}: expected 'folder start_index total_frames label' or "
                                f"'folder total_frames label' (VideoMAE v2 rawframe lists), got {line.strip()[:200]!r}")
        if count < 1 or start < 0:
            raise DataFileError(f"{list_file}:{lineno}: {count} frames from index {start}: a folder needs at least "
                                f"one frame and a start index >= 0")
        label = _check_label(list_file, lineno, parts[-1], num_classes)
        folder = os.path.join(data_root, folder)
        samples.append((folder, label))
        sources.append(FrameSource(folder, start, count))
    return samples, sources


def _slowfast_list(list_file: str, lines: list[str], data_root: str, num_classes: int | None,
                   start_index: int) -> tuple[list[tuple[str, int]], list[FrameSource]]:
    """PySlowFast frame lists: a header, then `original_vido_id video_id frame_id path labels` per frame."""
    paths: dict[str, list[str]] = {}
    labels: dict[str, set[int]] = {}
    where: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or (lineno == 1 or not where) and parts[0] == SLOWFAST_HEADER:
            continue
        if len(parts) != 5:
            raise DataFileError(f"{list_file}:{lineno}: expected 'original_vido_id video_id frame_id path labels' "
                                f"(PySlowFast frame list), got {line.strip()[:200]!r}")
        video = parts[0]
        where.setdefault(video, lineno)
        paths.setdefault(video, []).append(os.path.join(data_root, parts[3]))
        found = [x for x in parts[4].replace('"', "").split(",") if x]
        labels.setdefault(video, set()).update(_check_label(list_file, lineno, x, num_classes) for x in found)
    samples, sources = [], []
    for video, frames in paths.items():
        if len(labels[video]) != 1:
            raise DataFileError(f"{list_file}:{where[video]}: video {video} has labels {sorted(labels[video])}; a "
                                f"classification list needs exactly one class per video")
        folder = os.path.dirname(frames[0]) or video
        samples.append((folder, next(iter(labels[video]))))
        sources.append(FrameSource(folder, 0, len(frames), tuple(frames)))
    return samples, sources


DECODERS = {"pillow": decode_image_pillow, "torchvision": decode_image_torchvision}
# torchvision's libjpeg-turbo decode: 13-27% faster than Pillow on small JPEGs, the same pixels
# (benchmarks/bench_frame_decode.py; numbers in docs/downstream.md)
DEFAULT_DECODER = "torchvision"


class FrameFolderDataset(VideoDataset):
    """Frame-folder videos from a VideoMAE v2 or PySlowFast frame list; items as `VideoDataset`'s."""

    def __init__(self, list_file: str, data_root: str = "", frame_fps: float = 30.0,
                 frame_template: str = FRAME_TEMPLATE, frame_start_index: int = FRAME_START_INDEX,
                 num_classes: int | None = None, decoder: str = DEFAULT_DECODER, **kwargs) -> None:
        if frame_fps <= 0:
            raise DataFileError(f"frame_fps must be > 0, got {frame_fps}")
        try:
            frame_template.format(frame_start_index)
        except (IndexError, KeyError, ValueError) as exc:
            raise DataFileError(f"frame template {frame_template!r} does not format a frame number ({exc}); use "
                                f"e.g. img_{{:05d}}.jpg") from None
        samples, self.sources = read_frame_list(list_file, data_root, num_classes, frame_start_index)
        super().__init__(list_file, data_root=data_root, samples=samples, num_classes=num_classes, **kwargs)
        self.frame_fps, self.frame_template, self.decode_image = frame_fps, frame_template, DECODERS[decoder]

    def _read(self, path: str, times, short_side: int | None = None, buffer: object = None,
              max_short_side: int | None = None) -> np.ndarray:
        """The frames shown at `times` of the folder of sample `self._video_index`: uint8 [N, H, W, 3]."""
        source, fps = self.sources[self._video_index], self.frame_fps
        first = source.path(0, self.frame_template)
        check_regular_file(first, "frame")
        width, height = image_size(first)
        check_bounds(path, width, height, source.count, self.bounds["max_pixels"], self.bounds["max_frames"])
        info = VideoInfo((source.count - 1) / fps, fps, width, height)
        wanted = np.asarray(times(info) if callable(times) else times, dtype=np.float64)
        # the frame shown at t: the last one starting at or before t (the decoder's rule, same tolerance)
        index = np.clip(np.floor((wanted + _TIME_TOL) * fps).astype(np.int64), 0, source.count - 1)
        unique, inverse = np.unique(index, return_inverse=True)
        frames = []
        for k in unique.tolist():
            file = source.path(k, self.frame_template)
            check_regular_file(file, "frame")
            img = self.decode_image(file)
            if img.shape != (height, width, 3):
                raise DataFileError(f"{file}: frame is {img.shape[1]}x{img.shape[0]}, the folder's first frame "
                                    f"{width}x{height}; all frames of a video must have one size")
            frames.append(img)
        out = torch.from_numpy(np.stack(frames)[inverse.reshape(-1)])
        if short_side is None and max_short_side and min(width, height) > max_short_side:
            out = short_side_resize(out, max_short_side)  # the video path's --max_decode_short_side
        return out.numpy()


def build_frame_dataset(data_path: str, split: str, **kwargs) -> FrameFolderDataset:
    """Frame-folder dataset for `split` from `<data_path>/<split>.csv` (or .txt)."""
    for ext in (".csv", ".txt"):
        list_file = os.path.join(data_path, split + ext)
        if os.path.lexists(list_file):
            kwargs.setdefault("data_root", data_path)
            return FrameFolderDataset(list_file, **kwargs)
    raise MissingFileError(f"no {split}.csv or {split}.txt in {data_path}")
