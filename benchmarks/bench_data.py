"""Data-loading throughput: clips/s of one worker process pinned to one core, decode + augment.

    python benchmarks/bench_data.py                # every source, R = 1, 2, 4, uint8 and float output
    python benchmarks/bench_data.py --quick        # fewer items, 568x320 only, R = 1, 4, uint8
    python benchmarks/bench_data.py --profile      # where one worker's CPU time goes, per stage
    python benchmarks/bench_data.py --gop-sweep    # datasets.resize settings: file size vs decode time
    python benchmarks/bench_data.py --decoder-sweep  # whole-file decode time: every frame, references only, ...
    python benchmarks/bench_data.py --shards       # the same video as a file, in a local tar shard, over HTTP

`--results DIR` also writes a result file (`benchmarks/common.py`, `write_result_file`).

Sources, generated once into --cache (default ~/.cache/mae_st_scale/bench_data):
  568x320               10 s H.264 at 30 fps, x264 veryfast crf 18, a keyframe every 250 frames and
                        x264's B-pyramid: Kinetics-style, the worst common case for seeking
  568x320-resized       that file re-encoded by `datasets.resize` (crf 23, a keyframe every 2 s,
                        no B-pyramid: B-frames are never references)
  568x320-resized-x264  the same re-encode with x264's own GOP (250) and B-pyramid, which is what
                        `datasets.resize` wrote before: the pair isolates what the two settings do
  1280x720              like the first, at 720p
Each item is what a DataLoader worker does for pretraining: 16 frames at stride 4, random resized
crop to 224x224, flip, R clips per decode. Output "uint8" is the GPU path (the device normalises);
"float" normalises in the worker (the CPU path). "ours" is `VideoDataset`; "baseline" decodes the
whole video and converts every frame to RGB before cutting the same kind of clips (what the official
MAE-ST code does), with the same output. Clips per CPU-second (process time) are what one worker
achieves with a core to itself, and do not depend on what else the machine runs; clips/s do.
"""

import argparse
import cProfile
import multiprocessing
import os
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_results_flag, moving_texture_video, recording  # noqa: E402
from benchmarks.range_server import RangeServer  # noqa: E402
from datasets.decode import clip_span, clip_times, decode_frames, probe, random_clip_start  # noqa: E402
from datasets.resize import resize_video  # noqa: E402
from datasets.shard_writer import write_shards  # noqa: E402
from datasets.shards import ShardDataset  # noqa: E402
from datasets.transforms import crop_resize, normalize_clips, random_resized_box  # noqa: E402
from datasets.video_dataset import VideoDataset  # noqa: E402

SOURCES = ("568x320", "568x320-resized", "568x320-resized-x264", "1280x720")
SIZES = {"568x320": (568, 320), "1280x720": (1280, 720)}

# cProfile entries (substrings of "file:line(function)") -> stage of the worker's work
STAGES = (
    ("demux + decode (FFmpeg)", ("'decode' of 'av.", "av.container.core.open", "_read_packets", "_send_planned",
                                 "_skipping", "_pick", "'demux' of", "_decode_everything")),
    ("YUV->RGB", ("to_ndarray", "reformat")),
    ("resize (crop box -> 224)", ("_upsample_bilinear2d_aa",)),
    ("flip, layout, cast", ("'flip'", "'copy_'", "'contiguous'", "'float'", "(_to_planar)")),
    ("normalise", ("'mul_'", "'sub_'")),
    ("packing (output arrays)", ("torch.stack", "torch.empty", "numpy.empty", "(take)", "(decode_frames)")),
)


def source_path(cache: str, name: str) -> str:
    """Path of source `name` (see the module doc), generated on first use."""
    if name in SIZES:
        return moving_texture_video(os.path.join(cache, f"src_{name}_gop250.mp4"), *SIZES[name])
    src = source_path(cache, "568x320")
    if name == "568x320-resized":
        dst, kw = os.path.join(cache, "src_568x320_resized_gop2s.mp4"), {}
    elif name == "568x320-resized-x264":
        dst, kw = os.path.join(cache, "src_568x320_resized_x264.mp4"), {"gop_seconds": 0, "b_pyramid": True}
    else:
        raise ValueError(f"unknown source {name!r}; choose from {SOURCES}")
    resize_video(src, dst, short_side=320, **kw)  # skipped when present
    return dst


def baseline_item(path: str, rng: np.random.Generator, repeat: int, frames: int = 16, rate: int = 4,
                  size: int = 224, normalize: bool = True) -> torch.Tensor:
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
        clip = crop_resize(clip, box, size, bool(rng.random() < 0.5))
        out.append(normalize_clips(clip) if normalize else clip)
    return torch.stack(out)


def measure(fn: Callable[[int], object], items: int) -> tuple[float, float]:
    """Items per wall second and per CPU second of this process, after one warm-up call.

    On a shared machine the wall rate drops when other processes take turns on our core; the
    CPU-time rate is what the worker achieves when it has the core to itself (nearly: neighbours
    still share the caches, which is why `main` keeps the best of several rounds).
    """
    fn(10_000)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(items):
        fn(i)
    return items / (time.perf_counter() - wall), items / (time.process_time() - cpu)


def best_of(rounds: int, *fns: tuple[Callable[[int], object], int]) -> list[tuple[float, float]]:
    """Run each (fn, items) in turn, `rounds` times interleaved; keep each one's best rates."""
    best = [(0.0, 0.0)] * len(fns)
    for _ in range(rounds):
        for k, (fn, items) in enumerate(fns):
            wall, cpu = measure(fn, items)
            best[k] = (max(best[k][0], wall), max(best[k][1], cpu))
    return best


def dataset(path: str, repeat: int, normalize: bool, tmp: str) -> VideoDataset:
    """The pretraining dataset over one video (every index decodes it; the epoch varies the draws)."""
    lst = os.path.join(tmp, f"list_{abs(hash(path))}.csv")
    with open(lst, "w") as f:
        f.write(f"{path} 0\n")
    return VideoDataset(lst, mode="pretrain", num_frames=16, sampling_rate=4, crop_size=224, repeat_aug=repeat,
                        normalize=normalize)


def profile(path: str, repeat: int, normalize: bool, items: int, tmp: str) -> dict:
    """Print the share of one worker's CPU time per stage (cProfile, process time); returns the figures."""
    ds = dataset(path, repeat, normalize, tmp)
    ds[(10_000, 0)]
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    for i in range(items):
        ds[(i, 0)]
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())
    spent = dict.fromkeys([name for name, _ in STAGES] + ["other (Python, sampling, IPC-free rest)"], 0.0)
    for (file, line, func), v in stats.items():
        key = f"{os.path.basename(file)}:{line}({func})"
        stage = next((name for name, pats in STAGES if any(p in key for p in pats)), None)
        spent[stage or "other (Python, sampling, IPC-free rest)"] += v[2]
    print(f"\nprofile: {os.path.basename(path)}, R = {repeat}, {'float' if normalize else 'uint8'} output, "
          f"{items} items, {1e3 * total / items:.1f} ms CPU per item (profiler overhead included)")
    print("| stage | ms per item | share |")
    print("| --- | ---: | ---: |")
    for name, sec in spent.items():
        print(f"| {name} | {1e3 * sec / items:.1f} | {sec / total:.0%} |")
    ffmpeg = spent[STAGES[0][0]]
    print(f"FFmpeg alone caps this worker at {repeat * items / ffmpeg:.1f} clips per CPU-second: the rate if all "
          f"else ({1e3 * (total - ffmpeg) / items:.1f} ms per item) cost nothing")
    return {"source": os.path.basename(path), "repeat": repeat, "output": "float" if normalize else "uint8",
            "items": items, "cpu_ms_per_item": 1e3 * total / items,
            "stage_ms_per_item": {name: 1e3 * sec / items for name, sec in spent.items()},
            "ffmpeg_cap_clips_per_cpu_s": repeat * items / ffmpeg}


def decoder_sweep(path: str, rounds: int = 3) -> list[dict]:
    """CPU ms for one pass over the whole file per FFmpeg setting: the decoding left and what approximations buy."""
    import av

    settings = [("every frame", "DEFAULT", {}), ("reference frames only", "NONREF", {}),
                ("reference frames only, no deblocking (approximate)", "NONREF", {"skip_loop_filter": "all"}),
                ("every frame, no deblocking (approximate)", "DEFAULT", {"skip_loop_filter": "all"})]
    best, count = [float("inf")] * len(settings), [0] * len(settings)
    for _ in range(rounds):  # settings interleaved, so a slow spell of the machine hits all of them
        for k, (_, skip, options) in enumerate(settings):
            cpu = time.process_time()
            with av.open(path) as c:
                s = c.streams.video[0]
                s.thread_type, s.codec_context.skip_frame, s.codec_context.options = "NONE", skip, options
                count[k] = sum(1 for _ in c.decode(s))
            best[k] = min(best[k], time.process_time() - cpu)
    print(f"\n{os.path.basename(path)}: one pass over the whole file, best of {rounds} interleaved rounds")
    print("| frames decoded | count | CPU ms | ms per frame |")
    print("| --- | ---: | ---: | ---: |")
    rows = []
    for (label, _, _), sec, n in zip(settings, best, count, strict=True):
        print(f"| {label} | {n} | {1e3 * sec:.1f} | {1e3 * sec / n:.2f} |")
        rows.append({"source": os.path.basename(path), "setting": label, "frames": n, "cpu_ms": 1e3 * sec})
    return rows


def gop_sweep(cache: str, items: int) -> list[dict]:
    """File size and decode time (decode only, best of 5) of `datasets.resize` copies per GOP setting."""
    src = source_path(cache, "568x320")
    duration = probe(src).duration
    windows = {r: [np.concatenate([clip_times(random_clip_start(duration, clip_span(16, 4), rng), 16, 4)
                                   for _ in range(r)]) for rng in map(np.random.default_rng, range(items))]
               for r in (1, 4)}
    settings = [("x264 default (250 frames)", 0, True), ("250 frames", 0, False), ("4 s", 4, False),
                ("2 s (default)", 2, False), ("1 s", 1, False), ("0.5 s", 0.5, False)]
    print("| keyframe every | B-pyramid | MB | decode ms/item R=1 | decode ms/item R=4 |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for label, gop, pyramid in settings:
        path = os.path.join(cache, f"sweep_gop{gop}_{'pyr' if pyramid else 'nopyr'}.mp4")
        resize_video(src, path, short_side=320, gop_seconds=gop, b_pyramid=pyramid)
        ms = {}
        for r, sets in windows.items():
            best = float("inf")
            for _ in range(5):
                cpu = time.process_time()
                for times in sets:
                    decode_frames(path, times)
                best = min(best, (time.process_time() - cpu) / len(sets))
            ms[r] = 1e3 * best
        print(f"| {label} | {'yes' if pyramid else 'no'} | {os.path.getsize(path) / 1e6:.2f} | {ms[1]:.1f} | {ms[4]:.1f} |",
              flush=True)
        rows.append({"keyframe_every": label, "b_pyramid": pyramid, "mb": os.path.getsize(path) / 1e6,
                     "decode_ms_per_item": {str(r): v for r, v in ms.items()}})
    return rows


def _serve(root: str, port: multiprocessing.Queue) -> None:
    """A loopback range server in its own process (its CPU time is not the reader's); runs until killed."""
    with RangeServer(root) as server:
        port.put(server.url(""))
        threading.Event().wait()


def shard_rows(path: str, repeat: int, a: argparse.Namespace) -> list[dict]:
    """Clips/s of the pretraining item of `path` read as a file, from a local shard and from one over HTTP."""
    with tempfile.TemporaryDirectory() as tmp:
        listed = os.path.join(tmp, "list.txt")
        with open(listed, "w") as f:
            f.write(f"{path} 0\n")
        write_shards(listed, os.path.join(tmp, "shards"), 1 << 30, log=lambda _: None)
        queue = multiprocessing.get_context("fork").Queue()
        server = multiprocessing.get_context("fork").Process(target=_serve, args=(os.path.join(tmp, "shards"), queue),
                                                              daemon=True)
        server.start()
        try:
            base = queue.get(timeout=30)
            geometry = dict(mode="pretrain", num_frames=16, sampling_rate=4, crop_size=224, repeat_aug=repeat,
                            normalize=False)
            sets = {"file": dataset(path, repeat, False, tmp),
                    "local shard": ShardDataset(os.path.join(tmp, "shards", "000000.tar"), **geometry),
                    "http shard": ShardDataset(base + "000000.tar", cache_bytes=0, cache_dir=tmp, **geometry)}
            fns = [(lambda i, ds=ds: ds[(i, 0)], a.items) for ds in sets.values()]
            rates = best_of(a.rounds, *fns)
        finally:
            server.kill()
    rows = []
    for kind, (wall, cpu) in zip(sets, rates, strict=True):
        rows.append({"source": os.path.basename(path), "read": kind, "repeat": repeat, "clips_per_s": repeat * wall,
                     "clips_per_cpu_s": repeat * cpu})
        print(f"| {os.path.basename(path)} | {repeat} | {kind} | {repeat * wall:.1f} | {repeat * cpu:.1f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print a markdown table; returns the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "mae_st_scale", "bench_data"))
    p.add_argument("--items", type=int, default=24, help="items (decodes) timed per row")
    p.add_argument("--repeats", default="1,2,4")
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--outputs", default="uint8,float", help="uint8 (GPU path), float (CPU path) or both")
    p.add_argument("--core", type=int, default=0, help="CPU core the process is pinned to")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row; the best is kept")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--quick", action="store_true", help="8 items, 568x320 only, R = 1 and 4, uint8")
    p.add_argument("--profile", action="store_true", help="per-stage split of one worker instead of the table")
    p.add_argument("--gop-sweep", action="store_true", help="file size and decode time per datasets.resize GOP")
    p.add_argument("--shards", action="store_true", help="rows for the video as a file, as a member of a local "
                   "tar shard and of a shard served over loopback HTTP (range reads, no cache)")
    p.add_argument("--decoder-sweep", action="store_true",
                   help="whole-file decode time per FFmpeg setting (every frame, references only, no deblocking)")
    add_results_flag(p)
    a = p.parse_args(argv)
    if a.quick:
        a.items, a.sources, a.repeats, a.outputs, a.rounds = 8, "568x320", "1,4", "uint8", 1
    mode = next((m for m in ("profile", "gop_sweep", "decoder_sweep", "shards") if getattr(a, m)), "")
    with recording(a.results, "bench_data" + (f"-{mode.replace('_', '-')}" if mode else ""), __file__, argv) as rec:
        rec.data = {"args": vars(a), **run_benchmark(a)}
    return rec.data


def run_benchmark(a: argparse.Namespace) -> dict:
    """Time what the flags ask for and print the table; returns the figures."""
    os.sched_setaffinity(0, {a.core})  # one DataLoader worker = one process on one core
    torch.set_num_threads(1)  # as in DataLoader workers
    os.makedirs(a.cache, exist_ok=True)
    if a.gop_sweep:
        return {"gop_sweep": gop_sweep(a.cache, max(4, a.items // 3))}
    names = a.sources.split(",")
    paths = {name: source_path(a.cache, name) for name in names}
    if a.decoder_sweep:
        return {"decoder_sweep": [row for name in names for row in decoder_sweep(paths[name], a.rounds)]}
    repeats = [int(x) for x in a.repeats.split(",")]
    outputs = a.outputs.split(",")
    if a.shards:
        print(f"one process pinned to core {a.core}; 16 frames x stride 4 -> 224x224 uint8; {a.items} items per row, "
              f"best of {a.rounds} interleaved rounds; the HTTP server runs in another process")
        print("| source | R | read | clips/s | clips/CPU-s |\n| --- | --- | --- | --- | --- |")
        return {"shards": [row for name in names for r in repeats for row in shard_rows(paths[name], r, a)]}
    with tempfile.TemporaryDirectory() as tmp:
        if a.profile:
            return {"profile": [profile(paths[name], r, out == "float", a.items, tmp)
                                for name in names for r in repeats for out in outputs]}
        print(f"one process pinned to core {a.core}; 16 frames x stride 4 -> 224x224; {a.items} decodes per row, "
              f"best of {a.rounds} interleaved rounds")
        load_before = os.getloadavg()[0]
        print(f"load average before: {load_before:.1f} (CPU-s rate = clips/s with the core to itself)")
        print("| source | MB | R | output | ours clips/s | ours clips/CPU-s | baseline clips/s | baseline clips/CPU-s "
              "| speed-up (CPU) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        rows = []
        for name in names:
            src, mb = paths[name], os.path.getsize(paths[name]) / 1e6
            for r in repeats:
                for out in outputs:
                    norm = out == "float"
                    ds = dataset(src, r, norm, tmp)
                    ours_fn = (lambda i, ds=ds: ds[(i, 0)], a.items)  # new epoch: new windows and crops
                    base_fn = (lambda i, r=r, src=src, norm=norm: baseline_item(src, np.random.default_rng(i), r,
                                                                                normalize=norm), max(4, a.items // 3))
                    rates = best_of(a.rounds, ours_fn, *([] if a.no_baseline else [base_fn]))
                    ours = [r * x for x in rates[0]]
                    row = f"| {name} | {mb:.2f} | {r} | {out} | {ours[0]:.1f} | {ours[1]:.1f} |"
                    rows.append({"source": name, "mb": mb, "repeat": r, "output": out, "ours_clips_per_s": ours[0],
                                 "ours_clips_per_cpu_s": ours[1]})
                    if a.no_baseline:
                        print(row + " - | - | - |", flush=True)
                        continue
                    base = [r * x for x in rates[1]]
                    rows[-1].update(baseline_clips_per_s=base[0], baseline_clips_per_cpu_s=base[1])
                    print(row + f" {base[0]:.1f} | {base[1]:.1f} | {ours[1] / base[1]:.1f}x |", flush=True)
        load_after = os.getloadavg()[0]
        print(f"load average after: {load_after:.1f}")
    return {"rows": rows, "load_before": load_before, "load_after": load_after}


if __name__ == "__main__":
    main()
