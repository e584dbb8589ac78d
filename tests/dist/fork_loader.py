"""Fork-safety check: the parent uses PyAV (encode + decode), then a 2-worker loader decodes real files.

usage: python tests/dist/fork_loader.py DIR MP_CONTEXT
Prints `context=<start method> batches=<n>`. With `fork` this deadlocks on PyAV 19 / Python >= 3.12
(FFmpeg thread pools live in the parent at fork time); the project's default, forkserver, must not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from datasets import ResumableDistributedSampler, collate_clips, decode_frames  # noqa: E402
from datasets.loader import build_loader  # noqa: E402
from datasets.synthetic import render_video, write_video  # noqa: E402
from datasets.video_dataset import VideoDataset  # noqa: E402


def main(folder: str, mp_context: str) -> None:
    root = Path(folder)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):  # the parent encodes (FFmpeg's encoder threads) ...
        frames, _ = render_video(i % 8, rng, size=32, frames=24)
        write_video(str(root / "videos" / f"{i}.mp4"), frames)
        lines.append(f"videos/{i}.mp4 {i % 8}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    decode_frames(str(root / "videos" / "0.mp4"), [0.1], threads=4)  # ... and decodes with a thread pool
    ds = VideoDataset(str(root / "train.csv"), str(root), num_frames=4, sampling_rate=2, crop_size=32,
                      short_side_range=None, repeat_aug=1)
    sampler = ResumableDistributedSampler(len(ds), batch_size=2)
    loader = build_loader(ds, sampler, 2, collate_clips, num_workers=2, mp_context=mp_context,
                          persistent_workers=False)
    n = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in loader:
            assert batch["clips"].shape == (2, 1, 3, 4, 32, 32) or batch["clips"].shape[0] == 2
            n += 1
    print(f"context={loader.multiprocessing_context.get_start_method()} batches={n}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
