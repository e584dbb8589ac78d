"""Canonical views for AMT's attention pass: each training video once, whole, without augmentation.

The released AMT code takes the attention of the whole image (resized to the input size, no crop)
and crops the stored map with each training crop. For video the whole input is the whole video:
`num_frames` frames spread evenly over its full duration, the full frame resized to the square
input. A training clip (any start, crop and flip) then finds its tokens in that view
(models/amt.py, `clip_attention_weights`). Nothing here is random, so every rank computes the same map.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .decode import VideoInfo, decode_frames
from .transforms import crop_resize, normalize_clips

logger = logging.getLogger(__name__)


def canonical_times(info: VideoInfo, num_frames: int) -> np.ndarray:
    """Times (s) of the canonical view's frames: evenly from the first to the last frame of the video."""
    return np.linspace(0.0, info.duration, num_frames)


class CanonicalViews(torch.utils.data.Dataset):
    """Items {"clips" [1, C, T, S, S], "index" [1], "valid" [1]} for each (path, label) of `samples`."""

    def __init__(self, samples: list[tuple[str, int]], num_frames: int = 16, crop_size: int = 224,
                 normalize: bool = True, decode_threads: int = 1):
        self.samples = list(samples)
        self.num_frames, self.crop_size, self.normalize = num_frames, crop_size, normalize
        self.decode_threads = decode_threads

    def __len__(self) -> int:
        """Number of videos."""
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        """The canonical view of video `index`; an unreadable video gives a blank clip with valid False."""
        path = self.samples[index][0]
        valid = True
        try:
            frames, _, _ = decode_frames(path, lambda info: canonical_times(info, self.num_frames),
                                         threads=self.decode_threads)
            frames = torch.from_numpy(frames)
            _, h, w, _ = frames.shape
            clip = crop_resize(frames, (0, 0, h, w), self.crop_size)  # the whole frame, squeezed to a square
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the pass: its video keeps uniform weights
            logger.warning("AMT attention pass: cannot decode %s (%s: %s)", path, type(e).__name__, e)
            clip, valid = torch.zeros(3, self.num_frames, self.crop_size, self.crop_size, dtype=torch.uint8), False
        clip = clip.unsqueeze(0)
        return {"clips": normalize_clips(clip) if self.normalize else clip, "index": torch.tensor([index]),
                "valid": torch.tensor([valid]), "failures": int(not valid), "attempts": 1,
                "failed_paths": [] if valid else [path]}
