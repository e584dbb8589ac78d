"""Clip transforms on uint8 frames, identical on every frame of a clip.

Every random choice takes an explicit numpy Generator (the sample's), never global state, so a
sample's augmentation depends only on (seed, epoch, index). timm's RandAugment and RandomErasing
draw from the global `random` / numpy / torch generators, so we run them inside `_seeded_global_rng`,
which seeds those from the sample generator and restores them afterwards; re-seeding identically
before every frame gives every frame the same ops and magnitudes.
"""

import contextlib
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)


def normalize_clips(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """uint8 clips [..., C, T, H, W] -> float, (x / 255 - mean) / std per channel (works on GPU).

    `inplace` normalises a float32 tensor of 0-255 values in place (no copy at all).
    """
    if inplace and x.dtype != torch.float32:
        raise ValueError(f"in-place normalisation needs float32 clips, got {x.dtype}")
    x = x if inplace else x.float()  # one float copy (or none), then in place
    # Python scalars when the channels share mean and std (ours do):
    # a per-channel table built on the device would copy from the host, a sync on every GPU step.
    if len(set(MEAN)) == 1 and len(set(STD)) == 1:
        return x.mul_(1 / (255 * STD[0])).sub_(MEAN[0] / STD[0])
    scale = torch.tensor([1 / (255 * s) for s in STD], device=x.device).view(3, 1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(MEAN, STD, strict=True)], device=x.device).view(3, 1, 1, 1)
    return x.mul_(scale).sub_(shift)


def random_resized_box(height: int, width: int, rng: np.random.Generator, scale=(0.5, 1.0),
                       aspect=(0.75, 1.3333), short_side_range=None, crop_size: int = 224):
    """Crop box (top, left, h, w) in source pixels for short-side jitter + random resized crop.

    The short-side rescale to s in `short_side_range` and the crop are composed into one box in source
    coordinates, so each clip is resampled once. With `scale=None` the crop is a plain
    crop_size x crop_size window of the rescaled frame (SlowFast jitter + random crop).
    """
    factor = 1.0
    if short_side_range is not None:
        s = rng.uniform(short_side_range[0], short_side_range[1])
        factor = s / min(height, width)  # source pixel -> jittered pixel
    h_s, w_s = height * factor, width * factor
    if scale is None:
        ch, cw = min(crop_size, h_s), min(crop_size, w_s)
    else:
        area = h_s * w_s
        log_ratio = (math.log(aspect[0]), math.log(aspect[1]))
        for _ in range(10):
            target = area * rng.uniform(scale[0], scale[1])
            ratio = math.exp(rng.uniform(*log_ratio))
            cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if cw <= w_s and ch <= h_s:
                break
        else:  # fall back to the largest centre-ish box within the aspect range (as torchvision does)
            in_ratio = w_s / h_s
            if in_ratio < aspect[0]:
                cw, ch = w_s, w_s / aspect[0]
            elif in_ratio > aspect[1]:
                ch, cw = h_s, h_s * aspect[1]
            else:
                cw, ch = w_s, h_s
    ch, cw = max(1, round(ch / factor)), max(1, round(cw / factor))
    ch, cw = min(ch, height), min(cw, width)
    top = int(rng.integers(0, height - ch + 1))
    left = int(rng.integers(0, width - cw + 1))
    return top, left, ch, cw


def crop_resize(frames: torch.Tensor, box, size: int, flip: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [T, H, W, C] -> crop `box` (top, left, h, w), resize to size x size, flip -> [C, T, S, S].

    With `out` (a [C, T, S, S] tensor of any dtype, e.g. a slice of the item's [R, C, T, S, S]) the
    clip is written there, cast on the way: one pass instead of a copy, a cast and a stack.
    """
    top, left, h, w = box
    x = frames[:, top:top + h, left:left + w].permute(0, 3, 1, 2)  # channels-last view, no copy
    if (h, w) != (size, size):
        # antialias: downscaling 320p->224 without it aliases the fine textures the MAE must rebuild
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if flip:
        x = x.flip(-1)
    if out is None:
        out = torch.empty((x.shape[1], x.shape[0], size, size), dtype=x.dtype, device=x.device)
    return _to_planar(x, out)


def _to_planar(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write frames [T, C, H, W] (any strides) into `out` [C, T, H, W], casting to out's dtype.

    On the CPU numpy copies one channel at a time: for interleaved uint8 RGB that is ~3x faster than
    torch's copy through a permuted view, and this copy runs for every clip in every worker.
    """
    if x.device.type != "cpu" or out.device.type != "cpu":
        return out.copy_(x.permute(1, 0, 2, 3))
    src, dst = x.permute(0, 2, 3, 1).numpy(), out.numpy()
    for c in range(src.shape[-1]):
        dst[c] = src[..., c]
    return out


def short_side_resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [T, H, W, C] -> [T, H', W', C] with the short side equal to `size`."""
    t, h, w, _ = frames.shape
    if min(h, w) == size:
        return frames
    nh, nw = (size, max(size, round(w * size / h))) if h <= w else (max(size, round(h * size / w)), size)
    x = F.interpolate(frames.permute(0, 3, 1, 2), size=(nh, nw), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.permute(0, 2, 3, 1)


def spatial_crop(frames: torch.Tensor, size: int, index: int, num_crops: int) -> torch.Tensor:
    """Test crop `index` of `num_crops` along the long side ([T, H, W, C] -> [C, T, S, S]).

    With 3 crops: left/centre/right for landscape, top/centre/bottom for portrait; 1 crop is centred.
    """
    _, h, w, _ = frames.shape
    size_h, size_w = min(size, h), min(size, w)
    pos = 0.5 if num_crops == 1 else index / (num_crops - 1)
    top, left = (h - size_h) // 2, (w - size_w) // 2
    if h > w:
        top = round(pos * (h - size_h))
    else:
        left = round(pos * (w - size_w))
    return crop_resize(frames, (top, left, size_h, size_w), size)


@contextlib.contextmanager
def _seeded_global_rng(seed: int):
    """Seed python/numpy/torch global RNGs for a third-party op, restoring their state afterwards."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.random.default_generator.manual_seed(seed)  # CPU only: leave CUDA RNGs alone
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def clip_rand_augment(clip: torch.Tensor, transform, seed: int) -> torch.Tensor:
    """Apply a timm RandAugment transform with the same ops and magnitudes to every frame of [C, T, H, W]."""
    frames = clip.permute(1, 2, 3, 0).numpy()
    out = []
    for img in frames:
        with _seeded_global_rng(seed):  # same seed per frame: same ops, magnitudes, fill
            out.append(np.asarray(transform(Image.fromarray(img))))
    return torch.from_numpy(np.stack(out)).permute(3, 0, 1, 2).contiguous()


def clip_random_erase(clip: torch.Tensor, eraser, seed: int) -> torch.Tensor:
    """Apply timm RandomErasing to a normalised clip [C, T, H, W] with one box for all frames."""
    c, t, h, w = clip.shape
    with _seeded_global_rng(seed):
        # frames folded into channels: timm erases one box over all "channels", i.e. all frames
        eraser(clip.reshape(c * t, h, w))
    return clip


def build_rand_augment(config: str, crop_size: int):
    """timm RandAugment for a config string such as 'rand-m7-n4-mstd0.5-inc1'."""
    from timm.data.auto_augment import rand_augment_transform

    hparams = dict(translate_const=int(crop_size * 0.45), img_mean=tuple(round(255 * m) for m in MEAN))
    return rand_augment_transform(config, hparams)


def build_random_erasing(prob: float):
    """timm RandomErasing in per-pixel mode (MAE-ST fine-tuning setting), on CPU tensors."""
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=prob, mode="pixel", max_count=1, device="cpu")
