"""Re-encode a video dataset to a short side of 320 px (H.264), in parallel and resumable.

    python -m datasets.resize --src DIR --dst DIR --short-side 320 --workers 8

Every video file under --src is written to the same relative path under --dst (extension .mp4 kept
for mp4 inputs; other containers keep their name too, holding H.264 in a container that accepts it).
A file is written to a temporary name and renamed when complete, so an interrupted run is resumed by
running the same command again: finished outputs are skipped. List files (*.csv, *.txt) are copied.
Decoding 320p is about 3x faster than 720p, which is why MAE-ST and VideoMAE train on resized copies.
The worker processes start with `forkserver` by default, like the DataLoader's (`datasets.loader`):
forking a process that has used FFmpeg deadlocks the forked workers (PyAV 19, Python >= 3.12).

The copies are written for clip sampling (`datasets.decode` decodes only what a clip needs):
a keyframe every --gop-seconds (default 2 s; x264's default is every 250 frames) so a clip's decode
starts near the clip, and B-frames that are never references (x264 `b-pyramid=none`) so the decoder
skips every B-frame a clip does not show. Shorter GOPs cost more than they save: keyframes are the
most expensive frames to store and to decode (README "Data": file size and decode time per setting).
"""

import argparse
import logging
import multiprocessing
import os
import shutil

import av

from datasets.loader import MP_CONTEXTS

logger = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
LIST_EXTS = (".csv", ".txt")


def _even(x: float) -> int:
    """Round to an even number (yuv420p needs even sides)."""
    return max(2, int(round(x / 2)) * 2)


def x264_params(fps: float, gop_seconds: float = 2.0, b_pyramid: bool = False) -> str:
    """x264 settings for clip sampling: keyframe every `gop_seconds` (0: x264's default), B-pyramid off."""
    params = [f"b-pyramid={'normal' if b_pyramid else 'none'}"]
    if gop_seconds > 0:
        params.append(f"keyint={max(1, round(fps * gop_seconds))}")
    return ":".join(params)


def resize_video(src: str, dst: str, short_side: int = 320, crf: int = 23, gop_seconds: float = 2.0,
                 b_pyramid: bool = False) -> str:
    """Re-encode one video to H.264 with the given short side, same fps; returns 'done' or 'skipped'.

    `gop_seconds` and `b_pyramid` shape the stream for clip sampling (see the module doc).
    """
    if os.path.isfile(dst):
        return "skipped"
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    root, ext = os.path.splitext(dst)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"
    # webm cannot hold H.264; matroska can, and readers probe the content, not the name
    fmt = "matroska" if ext.lower() == ".webm" else None
    try:
        with av.open(src) as inp, av.open(tmp, "w", format=fmt) as out:
            vin = inp.streams.video[0]
            w, h = vin.codec_context.width, vin.codec_context.height
            f = short_side / min(w, h)
            nw, nh = (_even(w * f), _even(h * f)) if f < 1 else (_even(w), _even(h))  # never upscale
            rate = vin.average_rate or vin.guessed_rate or 30
            vout = out.add_stream("libx264", rate=rate)
            vout.width, vout.height, vout.pix_fmt = nw, nh, "yuv420p"
            vout.options = {"preset": "veryfast", "crf": str(crf),
                            "x264-params": x264_params(float(rate), gop_seconds, b_pyramid)}
            vout.time_base = vin.time_base
            for frame in inp.decode(vin):
                # keep source timestamps so variable frame rates and the start offset survive
                new = frame.reformat(width=nw, height=nh, format="yuv420p")
                new.pts, new.time_base = frame.pts, frame.time_base
                for packet in vout.encode(new):
                    out.mux(packet)
            for packet in vout.encode():
                out.mux(packet)
        os.replace(tmp, dst)  # only complete files get the final name
        return "done"
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _job(args: tuple) -> tuple[str, str]:
    """Pool worker: (src, dst, short_side, gop_seconds) -> (src, status or error text)."""
    src, dst, short_side, gop_seconds = args
    try:
        return src, resize_video(src, dst, short_side, gop_seconds=gop_seconds)
    except Exception as e:  # noqa: BLE001 - one bad file must not stop the batch
        return src, f"failed: {type(e).__name__}: {e}"


def resize_dataset(src_dir: str, dst_dir: str, short_side: int = 320, workers: int = 1,
                   gop_seconds: float = 2.0, mp_context: str = "forkserver") -> dict:
    """Resize every video under src_dir into dst_dir; copy list files; returns {status: count, 'failed': [...]}.

    `mp_context` is how the worker processes start (see `datasets.loader`: fork hangs once this
    process has used FFmpeg).
    """
    if mp_context not in MP_CONTEXTS:
        raise ValueError(f"mp_context must be one of {MP_CONTEXTS}, got {mp_context!r}")
    jobs = []
    for dirpath, _, names in os.walk(src_dir):
        for name in sorted(names):
            src = os.path.join(dirpath, name)
            dst = os.path.join(dst_dir, os.path.relpath(src, src_dir))
            if name.lower().endswith(VIDEO_EXTS) and ".tmp-" not in name:
                jobs.append((src, dst, short_side, gop_seconds))
            elif name.lower().endswith(LIST_EXTS):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)
    summary = {"done": 0, "skipped": 0, "failed": []}
    with multiprocessing.get_context(mp_context).Pool(max(1, workers)) as pool:
        for src, status in pool.imap_unordered(_job, jobs):
            if status in ("done", "skipped"):
                summary[status] += 1
            else:
                summary["failed"].append((src, status))
                logger.warning("%s %s", src, status)
    return summary


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--short-side", type=int, default=320)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--gop-seconds", type=float, default=2.0,
                   help="seconds between keyframes (0: x264's default of 250 frames)")
    p.add_argument("--mp-context", "--mp_context", dest="mp_context", choices=MP_CONTEXTS, default="forkserver",
                   help="how worker processes start (fork deadlocks once this process has used FFmpeg)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    s = resize_dataset(a.src, a.dst, a.short_side, a.workers, a.gop_seconds, a.mp_context)
    logger.info("resized %d, skipped %d (already done), failed %d", s["done"], s["skipped"], len(s["failed"]))
    for src, why in s["failed"]:
        logger.info("  %s: %s", src, why)
    raise SystemExit(1 if s["failed"] else 0)


if __name__ == "__main__":
    main()
