"""Pillow against torchvision.io.decode_jpeg on a few hundred small JPEG frames (one thread, one core).

    python benchmarks/bench_frame_decode.py --frames 300 --size 320x240 --rounds 5

Both read the file and return uint8 [H, W, 3]; the best of `--rounds` passes over all frames is printed in
ms per frame. datasets/frame_folder.py decodes with the faster of the two on the machine this was run on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from datasets.frame_folder import decode_image_pillow, decode_image_torchvision  # noqa: E402
from datasets.synthetic import render_video  # noqa: E402


def write_frames(folder: Path, n: int, width: int, height: int) -> list[str]:
    """`n` generated frames (the synthetic set's moving objects) as JPEG quality 95 files."""
    from PIL import Image

    frames, _ = render_video(0, np.random.default_rng(0), size=max(width, height), frames=n)
    paths = []
    for i, img in enumerate(frames):
        path = folder / f"img_{i + 1:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(img[:height, :width])).save(path, quality=95)
        paths.append(str(path))
    return paths


def best_ms(decode, paths: list[str], rounds: int) -> float:
    """Best pass over `paths`, in ms per frame."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for p in paths:
            decode(p)
        best = min(best, (time.perf_counter() - t0) / len(paths) * 1e3)
    return best


def main() -> None:
    """Measure and print both decoders."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--size", default="320x240", help="WIDTHxHEIGHT")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    width, height = (int(x) for x in a.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_frames(Path(tmp), a.frames, width, height)
        diff = np.abs(decode_image_pillow(paths[0]).astype(int) - decode_image_torchvision(paths[0]).astype(int))
        for name, fn in (("pillow", decode_image_pillow), ("torchvision", decode_image_torchvision)):
            print(f"{name:12s} {a.size} x {a.frames}: {best_ms(fn, paths, a.rounds):.3f} ms/frame")
        print(f"largest pixel difference between the two: {int(diff.max())}")


if __name__ == "__main__":
    main()
