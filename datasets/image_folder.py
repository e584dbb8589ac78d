"""Image MAE through the video code: an image folder served as one-frame clips.

`ImageFolderDataset` reads `root/<class>/<image>` (ImageNet layout; `root/<split>/` is used when it
exists) and returns the same item dict as `VideoDataset`: clips [R, C, 1, H, W], label [R],
index [R], noise [R, L], so `main_pretrain.py` trains the original image MAE recipe with
`num_frames 1, t_patch_size 1, pred_t_dim 1`. Randomness belongs to samples: crop and flip of item
(epoch, index) come from `np.random.default_rng([seed, epoch, index])`.

    python -m datasets.image_folder --out DIR   # write a small generated image folder
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image

from .synthetic import cached_build
from .transforms import crop_resize, normalize_clips, random_resized_box

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SHAPES = ("disc", "square", "triangle", "ring")


def find_images(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(sorted [(path, label)], class names) of an ImageNet-style folder of class subfolders."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    samples = [
        (os.path.join(root, c, f), label)
        for label, c in enumerate(classes)
        for f in sorted(os.listdir(os.path.join(root, c)))
        if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders of {root}")
    return samples, classes


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of class subfolders as one-frame clips with random resized crop + flip (MAE pretraining)."""

    def __init__(self, root: str, crop_size: int = 224, repeat_aug: int = 1, scale: tuple[float, float] = (0.2, 1.0),
                 aspect: tuple[float, float] = (0.75, 1.3333), hflip: bool = True, seed: int = 0,
                 normalize: bool = True, mask_noise_tokens: int | None = None) -> None:
        self.samples, self.classes = find_images(root)
        self.root, self.crop_size, self.repeat_aug = root, crop_size, repeat_aug
        self.scale, self.aspect, self.hflip = scale, aspect, hflip  # MAE's image recipe: scale (0.2, 1)
        self.seed, self.normalize, self.mask_noise_tokens = seed, normalize, mask_noise_tokens

    def __len__(self) -> int:
        """Number of images."""
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        """Item for `index` or `(epoch, index)`: clips [R, C, 1, H, W], label/index [R], noise [R, L]."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        path, label = self.samples[int(index)]
        with Image.open(path) as img:
            frame = torch.from_numpy(np.array(img.convert("RGB"))).unsqueeze(0)  # [1, H, W, 3] uint8
        _, h, w, _ = frame.shape
        clips = []
        for _ in range(self.repeat_aug):
            box = random_resized_box(h, w, rng, self.scale, self.aspect, None, self.crop_size)
            flip = bool(self.hflip and rng.random() < 0.5)
            clip = crop_resize(frame, box, self.crop_size, flip)  # [C, 1, S, S]
            clips.append(normalize_clips(clip) if self.normalize else clip)
        r = self.repeat_aug
        item = {"clips": torch.stack(clips), "label": torch.full((r,), label, dtype=torch.long),
                "index": torch.full((r,), int(index), dtype=torch.long),
                "failures": 0, "attempts": 1, "failed_paths": []}
        if self.mask_noise_tokens:
            item["noise"] = torch.from_numpy(rng.random((r, self.mask_noise_tokens), dtype=np.float32))
        return item


def build_image_folder_dataset(data_path: str, split: str = "train", **kwargs) -> ImageFolderDataset:
    """Dataset of `data_path/<split>/` when that folder exists, else of `data_path` itself."""
    sub = os.path.join(data_path, split)
    return ImageFolderDataset(sub if os.path.isdir(sub) else data_path, **kwargs)


def render_image(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """One uint8 [H, W, 3] image: a textured shape of class `label` on a smooth random background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(0, 2 * np.pi, 2)
    bg = 0.45 + 0.2 * np.sin(6 * xx + a)[..., None] * rng.uniform(0.2, 1, 3) + 0.15 * np.cos(5 * yy + b)[..., None]
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.28)
    u, v = xx - cx, yy - cy
    shape = SHAPES[label % len(SHAPES)]
    if shape == "disc":
        inside = u**2 + v**2 < r**2
    elif shape == "square":
        inside = (np.abs(u) < r * 0.85) & (np.abs(v) < r * 0.85)
    elif shape == "triangle":
        inside = (v < r * 0.6) & (v > -r + 1.7 * np.abs(u))
    else:
        inside = np.abs(np.hypot(u, v) - r * 0.75) < r * 0.25
    stripes = (np.sin(rng.uniform(20, 40) * (u + v)) > 0)[..., None]
    fg = np.where(stripes, rng.uniform(0.1, 1, 3), rng.uniform(0, 0.9, 3))
    img = np.where(inside[..., None], fg, bg)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def generate_image_folder(out: str, images_per_class: int = 16, size: int = 48, seed: int = 0) -> str:
    """Write `train/<class>/*.png` and `val/<class>/*.png` (a quarter as many) into `out`."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", images_per_class), ("val", max(1, images_per_class // 4))):
        for label, name in enumerate(SHAPES):
            folder = os.path.join(out, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                Image.fromarray(render_image(label, rng, size)).save(os.path.join(folder, f"{i:04d}.png"))
    return out


def ensure_synthetic_image_folder(cache_dir: str | None = None, images_per_class: int = 16, size: int = 48,
                                  seed: int = 0) -> str:
    """A generated image folder in a cache, created once (atomically, like the generated videos)."""
    params = dict(images_per_class=images_per_class, size=size, seed=seed, version=1)
    return cached_build("images", params, "val", lambda tmp: generate_image_folder(tmp, images_per_class, size, seed),
                        cache_dir)


def main() -> None:
    """Command-line entry point: write a generated image folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--images-per-class", type=int, default=16)
    p.add_argument("--size", type=int, default=48)
    a = p.parse_args()
    print(generate_image_folder(a.out, a.images_per_class, a.size))


if __name__ == "__main__":
    main()
