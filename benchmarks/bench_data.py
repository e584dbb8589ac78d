"""Data-loading throughput: clips/s of one worker process pinned to one core, decode + augment.

    python benchmarks/bench_data.py            # 568x320 and 1280x720 sources, R = 1, 2, 4
    python benchmarks/bench_data.py --quick    # fewer items, 568x320 only

Sources: generated once into --cache (default ~/.cache/mae_st_scale/bench_data): 10 s H.264 at
30 fps with a keyframe every 250 frames (the worst common case for seeking). Each item is what a
DataLoader worker does for pretraining: 16 frames at stride 4, random resized crop to 224x224, flip,
normalisation, R clips per decode. "ours" is `VideoDataset` (seek to the window, decode only up to
the last needed frame, convert only sampled frames); "baseline" decodes the whole video and converts
every frame to RGB before cutting the same clips (what the official MAE-ST code does).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.decode import clip_span, clip_times, random_clip_start  # noqa: E402
from datasets.synthetic import write_video  # noqa: E402
from datasets.transforms import crop_resize, normalize_clips, random_resized_box  # noqa: E402
from datasets.video_dataset import VideoDataset  # noqa: E402

SOURCES = {"568x320": (568, 320), "1280x720": (1280, 720)}


def make_source(path: str, width: int, height: int, seconds: int = 10, fps: int = 30, gop: int = 250) -> str:
    """Write a textured, moving test video once (H.264, fixed GOP); reuse it if present."""
    if os.path.isfile(path):
        return path
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    texture = np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width]
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((seconds * fps, height, width, 3), np.uint8)
    for t in range(len(frames)):
        # panning texture plus a moving bright disc: motion everywhere, like real footage
        f = np.roll(texture, (t * 2, t * 3), axis=(0, 1))
        disc = (xx - (t * 7) % width) ** 2 + (yy - height / 2) ** 2 < (height / 6) ** 2
        f[disc] = 255
        frames[t] = f
    tmp = path + ".tmp.mp4"
    write_video(tmp, frames, fps, gop_size=gop)
    os.replace(tmp, path)
    return path


def baseline_item(path: str, rng: np.random.Generator, repeat: int, frames: int = 16, rate: int = 4,
                  size: int = 224) -> torch.Tensor:
    """Official-style: decode all frames to RGB, then cut `repeat` clips and augment them."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "NONE"
        fps = float(s.average_rate)
        video = torch.from_numpy(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)]))
    duration = (len(video) - 1) / fps
    out = []
    for _ in range(repeat):
        start = random_clip_start(duration, clip_span(frames, rate), rng)
        idx = np.minimum((clip_times(start, frames, rate) * fps + 1e-6).astype(int), len(video) - 1)
        clip = video[idx]
        box = random_resized_box(clip.shape[1], clip.shape[2], rng, (0.5, 1.0), (0.75, 1.3333), (256, 320), size)
        out.append(normalize_clips(crop_resize(clip, box, size, bool(rng.random() < 0.5))))
    return torch.stack(out)


def measure(fn, items: int) -> tuple[float, float]:
    """Items per wall second and per CPU second of this process, after one warm-up call.

    On a shared machine the wall rate drops when other processes take turns on our core; the
    CPU-time rate is what the worker achieves when it has the core to itself.
    """
    fn(10_000)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(items):
        fn(i)
    return items / (time.perf_counter() - wall), items / (time.process_time() - cpu)


def main() -> None:
    """Run the benchmark and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "mae_st_scale", "bench_data"))
    p.add_argument("--items", type=int, default=24, help="items (decodes) timed per row")
    p.add_argument("--repeats", default="1,2,4")
    p.add_argument("--sources", default="568x320,1280x720")
    p.add_argument("--core", type=int, default=0, help="CPU core the process is pinned to")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--quick", action="store_true", help="8 items, 568x320 only")
    a = p.parse_args()
    if a.quick:
        a.items, a.sources = 8, "568x320"
    os.sched_setaffinity(0, {a.core})  # one DataLoader worker = one process on one core
    torch.set_num_threads(1)  # as in DataLoader workers
    os.makedirs(a.cache, exist_ok=True)
    print(f"one process pinned to core {a.core}; 16 frames x stride 4 -> 224x224; {a.items} decodes per row")
    print(f"load average before: {os.getloadavg()[0]:.1f} (CPU-s rate = clips/s with the core to itself)")
    print("| source | R | ours clips/s | ours clips/CPU-s | baseline clips/s | baseline clips/CPU-s | speed-up (CPU) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in a.sources.split(","):
        w, h = SOURCES[name]
        src = make_source(os.path.join(a.cache, f"src_{name}_gop250.mp4"), w, h)
        with tempfile.TemporaryDirectory() as tmp:
            lst = os.path.join(tmp, "list.csv")
            with open(lst, "w") as f:
                f.write(f"{src} 0\n")
            for r in (int(x) for x in a.repeats.split(",")):
                ds = VideoDataset(lst, mode="pretrain", num_frames=16, sampling_rate=4, crop_size=224, repeat_aug=r)
                ours = [r * x for x in measure(lambda i, ds=ds: ds[(i, 0)], a.items)]  # new epoch: new window
                row = f"| {name} | {r} | {ours[0]:.1f} | {ours[1]:.1f} |"
                if a.no_baseline:
                    print(row + " - | - | - |", flush=True)
                    continue
                base = [r * x for x in measure(lambda i, r=r, src=src: baseline_item(src, np.random.default_rng(i), r),
                                               max(4, a.items // 3))]
                print(row + f" {base[0]:.1f} | {base[1]:.1f} | {ours[1] / base[1]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
