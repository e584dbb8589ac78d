"""Keyframe-centred AVA clips from frame folders, with their person boxes and multi-hot action labels.

One item is one keyframe (video, second): `num_frames` frames `sampling_rate` apart centred on the
keyframe's frame (PySlowFast slowfast/datasets/utils.py `get_sequence`: frames
`range(center - num_frames * rate // 2, center + num_frames * rate // 2, rate)`, clamped to the video),
the boxes of that keyframe moved with the clip's resize and crop, and an 80-wide multi-hot label per box.

Boxes, as PySlowFast's AVA dataset (ava_dataset.py, its default cv2 path):
- training: ground-truth boxes, plus proposals scoring at least `proposal_threshold` (its
  TRAIN_PREDICT_BOX_LISTS + DETECTION_SCORE_THRESH); a proposal with exactly a ground-truth box's
  coordinates joins that box, any other is a box of its own labelled with its file's action (none: all
  zero, a negative). PySlowFast's box "jitter" is the clip's augmentation carried to the boxes: the short
  side scaled to a random size in `jitter_scales` (drawn as 1 / U(1/max, 1/min), cv2_transform
  `random_short_side_scale_jitter_list`), a random `crop_size` crop (`random_crop_list`) and a horizontal
  flip with probability 0.5 (`flip_boxes`: x1' = W - x2 - 1); no noise is added to box coordinates.
- evaluation: the proposals scoring at least `proposal_threshold` (TEST_PREDICT_BOX_LISTS), keyframes
  without any left out; the short side scaled to `crop_size` and the centre crop (its "val" split:
  `scale`, `scale_boxes`, `spatial_shift_crop_list(..., 1)`).
Pixel boxes are clipped to [0, size - 1] before and after (`clip_boxes_to_image`).

Determinism: each item draws from `np.random.default_rng([seed, epoch, index])`, so a resumed run reads
exactly what the uninterrupted one read. A frame that cannot be read is a bad file: in training the item
draws another keyframe (counted in `failures`, as the video dataset does); in evaluation the keyframe gives
no boxes and is counted (`failures`), never replaced.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasets.frame_folder import DECODERS, DEFAULT_DECODER
from datasets.transforms import normalize_clips
from util.errors import DataFileError

from .files import (
    ANNOTATIONS,
    CLIP_START_SECOND,
    PROPOSALS,
    Key,
    group_person_boxes,
    read_annotations,
    read_frame_list,
    read_proposals,
)

log = logging.getLogger(__name__)
NUM_CLASSES = 80  # AVA v2.2's action ids 1..80 (PySlowFast MODEL.NUM_CLASSES: 80); 60 of them are evaluated
MAX_RETRIES = 10  # replacement keyframes per training item before giving up


def clip_frame_indices(center: int, num_frames: int, sampling_rate: int, video_frames: int) -> list[int]:
    """Frame indices of the clip centred on frame `center` (PySlowFast `get_sequence`), clamped to the video."""
    half = num_frames * sampling_rate // 2
    return [min(max(k, 0), video_frames - 1) for k in range(center - half, center + half, sampling_rate)]


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel boxes [N, 4] clipped to [0, width - 1] x [0, height - 1] (PySlowFast `clip_boxes_to_image`)."""
    out = boxes.copy()
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0.0, width - 1.0)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0.0, height - 1.0)
    return out


def scaled_size(height: int, width: int, short: int) -> tuple[int, int, float]:
    """(new height, new width, box factor) of scaling the short side to `short` (cv2_transform `scale`)."""
    if (width <= height and width == short) or (height <= width and height == short):
        return height, width, 1.0
    if width < height:
        new_h = int(math.floor(height / width * short))
        return new_h, short, new_h / height
    new_w = int(math.floor(width / height * short))
    return short, new_w, new_w / width


def transform_boxes(boxes: np.ndarray, height: int, width: int, short: int, crop: int, top: int, left: int,
                    flip: bool) -> np.ndarray:
    """Normalised boxes [N, 4] -> pixel boxes in the crop: scale, clip, short side to `short`, crop, flip, clip."""
    px = boxes.astype(np.float64) * np.array([width, height, width, height], dtype=np.float64)
    px = clip_boxes(px, height, width)
    px = px * scaled_size(height, width, short)[2]
    px -= np.array([left, top, left, top], dtype=np.float64)
    if flip:
        px = np.stack([crop - px[:, 2] - 1, px[:, 1], crop - px[:, 0] - 1, px[:, 3]], axis=1)
    return clip_boxes(px, crop, crop)


def draw_geometry(height: int, width: int, crop: int, jitter_scales: tuple[int, int] | None, hflip: bool,
                  rng: np.random.Generator) -> tuple[int, int, int, bool]:
    """(short side, crop top, crop left, flip): random as PySlowFast's training path, or its centre crop (None)."""
    if jitter_scales is None:
        short = crop
        h, w, _ = scaled_size(height, width, short)
        return short, int(math.ceil((h - crop) / 2)), int(math.ceil((w - crop) / 2)), False
    low, high = jitter_scales
    short = int(round(1.0 / rng.uniform(1.0 / high, 1.0 / low)))
    h, w, _ = scaled_size(height, width, short)
    top = int(rng.integers(0, h - crop)) if h > crop else 0  # np.random.randint(0, h - size): exclusive
    left = int(rng.integers(0, w - crop)) if w > crop else 0
    return short, top, left, bool(hflip and rng.uniform() < 0.5)


class AvaClips(torch.utils.data.Dataset):
    """AVA keyframes of one split as clips with boxes; items keyed by `index` or `(epoch, index)`."""

    def __init__(self, root: str, split: str, train: bool, num_frames: int = 16, sampling_rate: int = 4,
                 crop_size: int = 224, fps: float = 30.0, proposal_threshold: float = 0.9,
                 train_proposals: bool = True, jitter_scales: tuple[int, int] | None = None, hflip: bool = True,
                 seed: int = 0, normalize: bool = True, num_classes: int = NUM_CLASSES,
                 decoder: str = DEFAULT_DECODER) -> None:
        self.root, self.split, self.train = root, split, train
        self.num_frames, self.sampling_rate, self.crop_size, self.fps = num_frames, sampling_rate, crop_size, fps
        self.seed, self.normalize, self.num_classes, self.hflip = seed, normalize, num_classes, hflip
        # PySlowFast TRAIN_JITTER_SCALES [256, 320] for a 224 crop; smaller crops keep those ratios
        self.jitter_scales = jitter_scales or (round(crop_size * 256 / 224), round(crop_size * 320 / 224))
        self.decode_image = DECODERS[decoder]
        ann = os.path.join(root, "annotations")
        self.frames = read_frame_list(os.path.join(root, "frame_lists", f"{split}.csv"),
                                      os.path.join(root, "frames"))
        proposals = read_proposals(os.path.join(ann, PROPOSALS[split]), proposal_threshold)
        boxes: dict[Key, dict[tuple, set[int]]] = {}
        if train:
            for key, persons in group_person_boxes(read_annotations(os.path.join(ann, ANNOTATIONS[split]))).items():
                for p in persons:
                    boxes.setdefault(key, {}).setdefault(p.box, set()).update(p.actions)
        if not train or train_proposals:
            for p in proposals:
                labels = boxes.setdefault((p.video_id, p.timestamp), {}).setdefault(p.box, set())
                if p.action_id is not None and p.action_id > 0:
                    labels.add(p.action_id)
        missing = sorted({v for v, _ in boxes} - set(self.frames))
        if missing:
            raise DataFileError(f"{root}: videos {missing[:5]} have boxes but no frames in frame_lists/{split}.csv; "
                                f"extract their frames and list them (docs/ava.md)")
        for key, by_box in boxes.items():
            for labels in by_box.values():
                bad = [a for a in labels if not 1 <= a <= num_classes]
                if bad:
                    raise DataFileError(f"{root}: keyframe {key} has action ids {bad} outside 1..{num_classes}")
        self.keys: list[Key] = sorted(boxes)
        self.boxes = [np.array(list(boxes[k]), dtype=np.float64).reshape(-1, 4) for k in self.keys]
        self.labels = [np.array([[c + 1 in labels for c in range(num_classes)] for labels in boxes[k].values()],
                                dtype=np.float32).reshape(-1, num_classes) for k in self.keys]
        if not self.keys:
            raise DataFileError(f"{root}: split {split} has no keyframe with boxes (proposal threshold "
                                f"{proposal_threshold})")

    def __len__(self) -> int:
        """Keyframes of the split."""
        return len(self.keys)

    def frame_paths(self, index: int) -> list[str]:
        """The files of keyframe `index`'s clip."""
        video, second = self.keys[index]
        paths = self.frames[video]
        center = int(round((second - CLIP_START_SECOND) * self.fps))
        return [paths[k] for k in clip_frame_indices(center, self.num_frames, self.sampling_rate, len(paths))]

    def _clip(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
        """(clip [C, T, S, S] uint8 or normalised float, pixel boxes [N, 4] in the crop) of keyframe `index`."""
        cache: dict[str, np.ndarray] = {}
        imgs = []
        for path in self.frame_paths(index):
            if path not in cache:
                cache[path] = self.decode_image(path)
            imgs.append(cache[path])
        if len({img.shape for img in imgs}) != 1:
            raise DataFileError(f"{self.frame_paths(index)[0]}: the clip's frames differ in size")
        frames = torch.from_numpy(np.stack(imgs))  # [T, H, W, 3]
        _, height, width, _ = frames.shape
        s = self.crop_size
        short, top, left, flip = draw_geometry(height, width, s, self.jitter_scales if self.train else None,
                                               self.hflip, rng)
        new_h, new_w, _ = scaled_size(height, width, short)
        if new_h < s or new_w < s:
            raise DataFileError(f"{self.frame_paths(index)[0]}: frames of {width}x{height} scaled to short side "
                                f"{short} are smaller than the {s} crop")
        x = frames.permute(0, 3, 1, 2).float()
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
        x = x[:, :, top:top + s, left:left + s]
        if flip:
            x = x.flip(-1)
        clip = x.permute(1, 0, 2, 3).round_().clamp_(0, 255)  # [C, T, S, S], 0-255
        clip = normalize_clips(clip, inplace=True) if self.normalize else clip.to(torch.uint8)
        return clip, transform_boxes(self.boxes[index], height, width, short, s, top, left, flip)

    def __getitem__(self, key) -> dict:
        """Item: clips [1, C, T, S, S], boxes [N, 4] (crop pixels), labels [N, classes], orig_boxes, key ids."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        failures, failed = 0, []
        keyframe = int(index)
        for _ in range(MAX_RETRIES + 1):
            try:
                clip, boxes = self._clip(keyframe, rng)
                break
            except Exception as exc:  # noqa: BLE001 - an unreadable frame must not kill the worker
                failures += 1
                failed.append(self.frame_paths(keyframe)[0])
                log.warning("cannot read the clip of keyframe %s (%s: %s); %s", self.keys[keyframe],
                            type(exc).__name__, exc, "drawing another" if self.train else "it is not scored")
                if not self.train:
                    return self._empty(keyframe, failures, failed)
                keyframe = int(rng.integers(len(self.keys)))  # deterministic replacement
        else:
            raise RuntimeError(f"{MAX_RETRIES + 1} keyframes in a row could not be read, e.g. {failed[:5]}")
        n = len(boxes)
        return {"clips": clip.unsqueeze(0), "boxes": torch.from_numpy(boxes).float(),
                "labels": torch.from_numpy(self.labels[keyframe]), "orig_boxes": torch.from_numpy(self.boxes[keyframe]),
                "keyframe": torch.full((n,), keyframe, dtype=torch.long), "failures": failures,
                "attempts": failures + 1, "failed_paths": failed}

    def _empty(self, keyframe: int, failures: int, failed: list[str]) -> dict:
        """An evaluation item whose clip could not be read: a blank clip and no boxes."""
        s, dtype = self.crop_size, torch.float32 if self.normalize else torch.uint8
        return {"clips": torch.zeros((1, 3, self.num_frames, s, s), dtype=dtype), "boxes": torch.zeros((0, 4)),
                "labels": torch.zeros((0, self.num_classes)), "orig_boxes": torch.zeros((0, 4), dtype=torch.float64),
                "keyframe": torch.zeros((0,), dtype=torch.long), "failures": failures, "attempts": failures,
                "failed_paths": failed}

    @staticmethod
    def collate(batch: Sequence[dict]) -> dict:
        """Clips [B, C, T, S, S]; boxes [N, 5] (batch index, x1, y1, x2, y2) over all clips; labels [N, K]."""
        boxes = [torch.cat([torch.full((len(b["boxes"]), 1), float(i)), b["boxes"]], 1) for i, b in enumerate(batch)]
        return {"clips": torch.cat([b["clips"] for b in batch]), "boxes": torch.cat(boxes).reshape(-1, 5),
                "labels": torch.cat([b["labels"] for b in batch]),
                "orig_boxes": torch.cat([b["orig_boxes"] for b in batch]).reshape(-1, 4),
                "keyframe": torch.cat([b["keyframe"] for b in batch]),
                "failures": sum(b["failures"] for b in batch), "attempts": sum(b["attempts"] for b in batch),
                "failed_paths": [p for b in batch for p in b["failed_paths"]]}
