"""PyAV decoding of exactly the frames a clip needs.

Frame times follow MAE-ST: `num_frames` frames `sampling_rate` apart at a reference rate of 30 fps,
so a clip spans num_frames * sampling_rate / 30 seconds whatever the source fps (24, 30, 60 ...).
For each wanted time t we take the frame shown at t (the last frame with pts <= t). We seek to the
keyframe before the earliest wanted time, decode forward only until the latest wanted time, and
convert to RGB only the frames we keep: the official code decodes and converts the whole video.
"""

import math
from dataclasses import dataclass

import av
import numpy as np

# wanted times are float seconds; pts are rounded to the container's time base (1 ms in matroska)
_TIME_TOL = 1e-4


@dataclass
class VideoInfo:
    """Stream facts needed to place clips: duration (s, from the first frame), fps, size."""

    duration: float
    fps: float
    width: int
    height: int


def clip_times(start: float, num_frames: int, sampling_rate: int, target_fps: float = 30.0) -> np.ndarray:
    """Times (s) of the frames of one clip: start + i * sampling_rate / target_fps."""
    return start + np.arange(num_frames) * (sampling_rate / target_fps)


def clip_span(num_frames: int, sampling_rate: int, target_fps: float = 30.0) -> float:
    """Time (s) from the first to the last sampled frame of a clip."""
    return (num_frames - 1) * sampling_rate / target_fps


def random_clip_start(duration: float, span: float, rng: np.random.Generator) -> float:
    """Uniform random start so the clip fits in the video (0 when the video is shorter)."""
    return float(rng.uniform(0.0, max(0.0, duration - span)))


def uniform_clip_start(duration: float, span: float, view: int, num_views: int) -> float:
    """Start of temporal view `view` of `num_views`: k * (duration - span) / (K - 1), centred if K = 1.

    The first view starts at 0 and the last ends at the end of the video, the rest evenly between.
    """
    room = max(0.0, duration - span)
    if num_views <= 1:
        return room / 2
    return view * room / (num_views - 1)


def _stream_info(container: av.container.InputContainer) -> tuple[av.video.stream.VideoStream, VideoInfo]:
    """First video stream and its timing facts; raises ValueError for files without video."""
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 30)
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1e6
    elif stream.frames:
        duration = stream.frames / fps
    # duration counts the last frame's display time; the last frame *starts* 1/fps earlier
    duration = max(0.0, duration - 1.0 / fps)
    return stream, VideoInfo(duration, fps, stream.codec_context.width, stream.codec_context.height)


def probe(path: str) -> VideoInfo:
    """Duration, fps and size of a video without decoding it."""
    with av.open(path) as container:
        return _stream_info(container)[1]


def _to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    """Convert (and optionally scale to (width, height)) one frame to uint8 [H, W, 3]."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    return frame.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray()


def _pick(frames_iter, origin: float, times: np.ndarray, size, must_cover_first: bool, tol: float):
    """Walk decoded frames, keeping for every wanted time the frame shown then.

    Returns (images, frame_times) or None when the first decoded frame is already after the first
    wanted time although it should not be (a seek that overshot).
    """
    out, got = [None] * len(times), np.zeros(len(times))
    j, prev, prev_t = 0, None, 0.0
    converted_src, converted = None, None
    for frame in frames_iter:
        if frame.pts is None:
            continue
        t = float(frame.pts * frame.time_base) - origin
        if prev is None and must_cover_first and t > times[0] + tol:
            return None
        while j < len(times) and t > times[j] + tol:
            # the previous frame is the one on screen at times[j]; before the first frame, clamp to it
            src, src_t = (prev, prev_t) if prev is not None else (frame, t)
            if src is not converted_src:  # several wanted times can fall on one frame: convert it once
                converted_src, converted = src, _to_rgb(src, size)
            out[j], got[j] = converted, src_t
            j += 1
        if j == len(times):
            return out, got
        prev, prev_t = frame, t
    if prev is None:
        raise ValueError("no decodable video frame")
    while j < len(times):  # past the end: clamp to the last frame
        if prev is not converted_src:
            converted_src, converted = prev, _to_rgb(prev, size)
        out[j], got[j] = converted, prev_t
        j += 1
    return out, got


def decode_frames(path: str, times, short_side: int | None = None, seek: bool = True,
                  skip_nonref: bool = True, threads: int = 1) -> tuple[np.ndarray, np.ndarray, VideoInfo]:
    """Decode the frames shown at `times` (s, from the first frame; any order, repeats allowed).

    `times` is an array or a function VideoInfo -> array (to place clips from the duration without a
    second open). Returns uint8 [N, H, W, 3] in the order of the times, the actual times (s) of those
    frames, and the stream info. `short_side` scales while converting (swscale: cheaper than later).
    `threads`: FFmpeg decoding threads (1 when the DataLoader workers already fill the cores).
    """
    holder = {}
    result = None
    if seek:
        try:
            result = _decode(path, times, holder, short_side, True, skip_nonref, threads)
        except av.FFmpegError:
            if "times" not in holder:  # the file did not even open: nothing to retry
                raise
            result = None  # e.g. a container without an index: retried below from the start
    if result is None:
        # no seek wanted, or the seek failed / overshot (missing index, odd timestamps)
        result = _decode(path, times, holder, short_side, False, skip_nonref, threads)
    images, got, info = result
    order = holder["order"]
    out = np.empty((len(images),) + images[0].shape, np.uint8)
    out[order] = images  # back to the caller's order in one copy
    times_out = np.empty_like(got)
    times_out[order] = got
    return out, times_out, info


def _skipping(frames, stream, origin: float, until: float):
    """Yield decoded frames, decoding non-reference frames only from `until` (s) on."""
    cc = stream.codec_context
    skipping = until > 0
    if skipping:
        cc.skip_frame = "NONREF"
    for frame in frames:
        if skipping and frame.pts is not None and float(frame.pts * frame.time_base) - origin >= until:
            cc.skip_frame = "DEFAULT"
            skipping = False
        yield frame


def _decode(path: str, times, holder: dict, short_side: int | None, seek: bool, skip_nonref: bool,
            threads: int = 1):
    """One pass over the file; None if a seek overshot the first wanted frame."""
    with av.open(path) as container:
        stream, info = _stream_info(container)
        if "times" not in holder:  # computed once, so a retry uses the same times (and rng draws)
            t = np.asarray(times(info) if callable(times) else times, dtype=np.float64)
            holder["order"] = np.argsort(t, kind="stable")
            holder["times"] = t[holder["order"]]
        sorted_times = holder["times"]
        size = None
        if short_side is not None and info.width and info.height:
            f = short_side / min(info.width, info.height)
            size = (max(short_side, round(info.width * f)), max(short_side, round(info.height * f)))
        # Frame threads only pay off with spare cores; with one core per worker they only add overhead.
        if threads > 1:
            stream.thread_type, stream.thread_count = "AUTO", threads
        else:
            stream.thread_type = "NONE"
        origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        seek = seek and sorted_times[0] > _TIME_TOL
        if seek:
            target = int(math.floor((float(sorted_times[0]) + origin) / stream.time_base))
            container.seek(target, stream=stream, backward=True, any_frame=False)
        # a frame stamped up to one time-base tick late still counts as on screen at t
        tol = min(max(_TIME_TOL, float(stream.time_base or 0)), 0.25 / info.fps)
        frames = container.decode(stream)
        if skip_nonref:
            # switch back early: frames come in decode order, up to 16 frames before display order
            frames = _skipping(frames, stream, origin, float(sorted_times[0]) - 20.0 / info.fps)
        picked = _pick(frames, origin, sorted_times, size, seek, tol)
    return None if picked is None else (*picked, info)
