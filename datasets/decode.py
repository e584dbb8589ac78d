"""PyAV decoding of exactly the frames a clip needs, and nothing it does not need.

Frame times follow MAE-ST: `num_frames` frames `sampling_rate` apart at a reference rate of 30 fps,
so a clip spans num_frames * sampling_rate / 30 seconds whatever the source fps (24, 30, 60 ...).
For each wanted time t we take the frame shown at t (the last frame with pts <= t): the result equals
decoding the whole video and picking those frames (`tests/test_data_exact.py` checks it bit for bit).

How little is decoded: the packets are read (cheap: no decoding) from the keyframe before the
earliest wanted time until a packet's decode time passes the latest one, so the pts of every frame
there is known before anything is decoded and the wanted frames are known exactly. Then each packet
is sent to the decoder only if it can matter: a wanted frame is decoded in full; any other packet
is sent with `skip_frame=NONREF`, so FFmpeg skips it when no other frame references it (about half
of the B-frames of an x264 stream) and decodes it otherwise; decoding stops at the last wanted
packet; and when a keyframe lies between two wanted windows the packets before it are not sent at
all. Only the wanted frames are converted to RGB, straight into the output array.
"""

import bisect
import io
import math
import os
import stat
import threading
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from util.errors import DataFileError, MissingFileError

# wanted times are float seconds; pts are rounded to the container's time base (1 ms in matroska)
_TIME_TOL = 1e-4
# Bounds checked from the stream's metadata before anything is decoded (and on each decoded frame, whose
# size a container may misstate): a small file can declare 12000x12000 frames, gigabytes once in RGB.
MAX_FRAME_PIXELS = 7680 * 4320  # 8K UHD
MAX_VIDEO_FRAMES = 10_000_000  # over 90 hours at 30 fps
# Training clips of a source whose short side is longer are scaled to this while converting (swscale): an 8K
# source decodes to 1920x1080 frames, not 100 MB ones; sources up to 1080p are decoded exactly as they are.
MAX_DECODE_SHORT_SIDE = 1080


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


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class VideoTooLarge(DataFileError):
    """A video over --max_frame_pixels or --max_video_frames: skipped like any unreadable file."""


def check_bounds(path: str, width: int, height: int, frames: int, max_pixels: int, max_frames: int) -> None:
    """Raise VideoTooLarge naming `path`, its size and the flag to raise when a bound is exceeded."""
    if width * height > max_pixels:
        raise VideoTooLarge(f"{path}: {width}x{height} frames ({width * height / 1e6:.1f} Mpixel) exceed "
                            f"--max_frame_pixels {max_pixels}; re-encode it smaller (python -m datasets.resize) or "
                            f"raise the flag")
    if frames > max_frames:
        raise VideoTooLarge(f"{path}: {frames} frames exceed --max_video_frames {max_frames}; cut it or raise the flag")


class NotARegularFile(MissingFileError):
    """A path that exists but is a directory, FIFO, socket or device: reading it could block forever."""


def check_regular_file(path: str, what: str = "file") -> None:
    """Raise FileNotFoundError / NotARegularFile naming `path` unless it is a regular file (symlinks followed).

    os.stat never blocks on a FIFO or device, while open() on a FIFO waits for a writer forever.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path} does not exist") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise NotARegularFile(f"{what} {path} is {kind}, not a regular file: only regular files are read")


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
    check_regular_file(path, "video")
    with av.open(path) as container:
        return _stream_info(container)[1]


def _output_size(info: VideoInfo, short_side: int | None, max_short_side: int | None = None
                 ) -> tuple[int, int] | None:
    """(width, height) with the short side scaled to `short_side` (or down to `max_short_side` when longer),
    or None to keep the decoded size."""
    if short_side is None and max_short_side and min(info.width, info.height) > max_short_side:
        short_side = max_short_side
    if short_side is None or not info.width or not info.height:
        return None
    f = short_side / min(info.width, info.height)
    return max(short_side, round(info.width * f)), max(short_side, round(info.height * f))


_local = threading.local()


def _to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None) -> np.ndarray:
    """Convert (and optionally scale to (width, height)) one frame to uint8 [H, W, 3]."""
    # One swscale context per thread and process, reused while the input format and sizes stay the
    # same: PyAV's frame.to_ndarray(format=) builds a new one for every frame, which cost 0.39 ms of a
    # 32 px frame's 0.45 (PyAV 18); the pixels are the same (the reference-decode tests use to_ndarray).
    # threads=1: a context with swscale's own thread pool (the default, FFmpeg >= 7.1) deadlocks a
    # forked child that uses it, and a DataLoader worker gets one core anyway. A child still gets its
    # own context (the pid check), so nothing made before a fork is ever used after it.
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        _local.reformatter, _local.pid = VideoReformatter(), pid
    width, height = size if size is not None else (None, None)
    return _local.reformatter.reformat(frame, width=width, height=height, format="rgb24",
                                       threads=1).to_ndarray()


class FrameBuffer:
    """Memory a process decodes into item after item (`decode_frames(..., buffer=)`).

    A fresh ~35 MB frame array per item (R = 4 at 568x320) costs its page faults again every time,
    about a tenth of a worker's time; reused pages cost nothing. Pickles empty, so a dataset that
    decoded in the parent still ships to its workers without frames.
    """

    def __init__(self):
        self._memory = np.empty(0, np.uint8)

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        """A uint8 array of `shape` over the reused memory (the previous result is overwritten)."""
        n = math.prod(shape)
        if self._memory.size < n:
            self._memory = np.empty(n, np.uint8)
        return self._memory[:n].reshape(shape)

    def __getstate__(self) -> dict:
        """Nothing: the memory stays with the process that filled it."""
        return {}

    def __setstate__(self, state: dict) -> None:
        """Start empty."""
        self.__init__()


def _check_frame(frame: av.VideoFrame, holder: dict) -> None:
    """A decoded frame larger than the bound (its container said otherwise) is refused before conversion."""
    path, max_pixels = holder["path"], holder["max_pixels"]
    if frame.width * frame.height > max_pixels:
        check_bounds(path, frame.width, frame.height, 0, max_pixels, holder["max_frames"])


class _Output:
    """The uint8 [N, H, W, 3] result, filled in the caller's order as wanted frames arrive."""

    def __init__(self, rows_of: dict[int, list[int]], size: tuple[int, int] | None, count: int,
                 buffer: FrameBuffer | None = None, holder: dict | None = None):
        self.rows_of, self.size, self.count, self.buffer, self.holder = rows_of, size, count, buffer, holder
        self.array: np.ndarray | None = None

    def take(self, frame: av.VideoFrame) -> None:
        """Convert `frame` once if some wanted time shows it, into every row that shows it."""
        rows = self.rows_of.pop(frame.pts, None)
        if rows is None:
            return
        if self.holder is not None:
            _check_frame(frame, self.holder)
        img = _to_rgb(frame, self.size)
        if self.array is None:
            shape = (self.count,) + img.shape
            self.array = self.buffer.array(shape) if self.buffer is not None else np.empty(shape, np.uint8)
        for r in rows:
            self.array[r] = img


def decode_frames(path: str | bytes, times, short_side: int | None = None, seek: bool = True,
                  skip_nonref: bool = True, threads: int = 1, stats: dict | None = None,
                  buffer: FrameBuffer | None = None, max_pixels: int = MAX_FRAME_PIXELS,
                  max_frames: int = MAX_VIDEO_FRAMES, max_short_side: int | None = None,
                  name: str | None = None) -> tuple[np.ndarray, np.ndarray, VideoInfo]:
    """Decode the frames shown at `times` (s, from the first frame; any order, repeats allowed).

    `times` is an array or a function VideoInfo -> array (to place clips from the duration without a
    second open). Returns uint8 [N, H, W, 3] in the order of the times, the actual times (s) of those
    frames, and the stream info. `short_side` scales while converting (swscale: cheaper than later).
    `threads`: FFmpeg decoding threads (1 when the DataLoader workers already fill the cores).
    `seek=False` reads from the start of the file; `skip_nonref=False` decodes every packet it sends.
    `stats`, if given, receives how the frames were obtained: "path" ("planned" or "everything"),
    "sent" (packets given to the decoder) and "decoded" (frames it returned).
    `buffer`: decode into this reused memory; the result is then a view that the next call with the
    same buffer overwrites.
    Only regular files are opened (NotARegularFile otherwise), and a video whose frames exceed `max_pixels`
    (width x height) or which holds more than `max_frames` frames raises VideoTooLarge, from its metadata,
    before any frame is decoded. `max_short_side` (without `short_side`): a source whose short side is longer
    is scaled down to it while converting; smaller ones keep their size.
    `path` may also be the bytes of a whole video file (a tar shard's member), decoded in memory; `name`
    then stands for it in errors.
    """
    if name is None:
        name = path if isinstance(path, str) else f"<{len(path)} bytes of video>"
    holder: dict = {"stats": stats if stats is not None else {}, "path": name, "max_pixels": max_pixels,
                    "max_frames": max_frames, "max_short_side": max_short_side}
    result = None
    if seek:
        try:
            result = _decode(path, times, holder, short_side, True, skip_nonref, threads, buffer)
        except av.FFmpegError:
            if "times" not in holder:  # the file did not even open: nothing to retry
                raise
    if result is None:  # no seek wanted, or the seek failed / overshot (missing index, odd timestamps)
        result = _decode(path, times, holder, short_side, False, skip_nonref, threads, buffer)
    if result is None:  # packets without timestamps, or a wanted frame the decoder never produced
        result = _decode_everything(path, holder, short_side, threads)
    return result


def _open_video(path: str, times, holder: dict, threads: int):
    """Open `path` (or video bytes); fix the wanted times once (a retry reuses them, and their rng draws) in
    `holder`."""
    if isinstance(path, str):
        check_regular_file(path, "video")  # av.open on a FIFO waits for a writer forever
        container = av.open(path)
    else:  # a shard member's bytes: a fresh in-memory file per open (a retry reads it from its start again)
        container = av.open(io.BytesIO(path))
    try:
        stream, info = _stream_info(container)
        frames = stream.frames or round(info.duration * info.fps)  # frame count: the header's, else estimated
        check_bounds(holder["path"], info.width or 0, info.height or 0, frames, holder.get("max_pixels", MAX_FRAME_PIXELS),
                     holder.get("max_frames", MAX_VIDEO_FRAMES))
    except BaseException:
        container.close()
        raise
    if "times" not in holder:
        holder["times"] = np.asarray(times(info) if callable(times) else times, dtype=np.float64)
    # Frame threads only pay off with spare cores; with one core per worker they only add overhead.
    if threads > 1:
        stream.thread_type, stream.thread_count = "AUTO", threads
    else:
        stream.thread_type = "NONE"
    origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    # a frame stamped up to one time-base tick late still counts as on screen at t
    tol = min(max(_TIME_TOL, float(stream.time_base or 0)), 0.25 / info.fps)
    return container, stream, info, origin, tol


# H.264/HEVC allow up to 16 frames of reordering: read this many packets past the one that proves
# the window is complete, in case the container's decode times are guesses (matroska stores none)
_REORDER_MARGIN = 16


def _read_packets(container, stream, tb: float, origin: float, until: float, after_seek: bool):
    """Packets in decode order from the first keyframe until every frame shown up to `until` is known.

    Returns None when a packet has no pts (nothing can be planned; the caller decodes everything).
    """
    packets, margin = [], None
    for packet in container.demux(stream):
        if packet.pts is None:
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            return None
        if after_seek and not packets and not packet.is_keyframe:
            continue  # a seek should land on a keyframe; nothing before the next one can be decoded
        packets.append(packet)
        if margin is None:
            # decode times never decrease and pts >= dts, so no later packet is shown before `until`
            if packet.dts is not None and packet.dts * tb - origin > until:
                margin = _REORDER_MARGIN
        else:
            margin -= 1
            if margin <= 0:
                break
    return packets


def _decode(path: str | bytes, times, holder: dict, short_side: int | None, seek: bool, skip_nonref: bool,
            threads: int, buffer: FrameBuffer | None = None):
    """Planned decode (see the module doc); None if the seek overshot or the plan cannot be followed."""
    container, stream, info, origin, tol = _open_video(path, times, holder, threads)
    with container:
        t = holder["times"]
        tb = float(stream.time_base)
        seek = seek and t.min() > _TIME_TOL
        if seek:
            target = int(math.floor((float(t.min()) + origin) / stream.time_base))
            container.seek(target, stream=stream, backward=True, any_frame=False)
        packets = _read_packets(container, stream, tb, origin, float(t.max()) + tol, seek)
        if not packets:
            if packets is not None and not seek:
                raise ValueError("no decodable video frame")
            return None
        pts = np.array([p.pts for p in packets], dtype=np.int64)
        if len(np.unique(pts)) != len(pts):
            return None  # repeated timestamps: frames cannot be told apart by pts
        shown = np.argsort(pts, kind="stable")  # packet indices in display order
        shown_time = pts[shown] * tb - origin
        k = np.searchsorted(shown_time, t + tol, side="right") - 1  # last frame with time <= t
        if seek and (k < 0).any():
            return None  # the seek landed after the first wanted time
        picked = shown[np.maximum(k, 0)]  # before the first frame: clamp to it
        rows_of: dict[int, list[int]] = {}
        for row, i in enumerate(picked):
            rows_of.setdefault(int(pts[i]), []).append(row)
        out = _Output(rows_of, _output_size(info, short_side, holder.get("max_short_side")), len(t), buffer, holder)
        sent, decoded = _send_planned(stream.codec_context, packets, pts, np.unique(picked), out, skip_nonref)
        holder["stats"].update(path="planned", sent=sent, decoded=decoded)
        if out.rows_of or out.array is None:
            return None  # the decoder did not produce a wanted frame: fall back to decoding everything
        return out.array, pts[picked] * tb - origin, info


def _send_planned(cc, packets: list, pts: np.ndarray, wanted: np.ndarray, out: _Output,
                  skip_nonref: bool) -> tuple[int, int]:
    """Send the decoder only the packets the wanted frames (decode-order indices, ascending) need.

    Returns (packets sent, frames decoded).
    """
    keys = [i for i, p in enumerate(packets) if p.is_keyframe or i == 0]
    # where decoding must start for each wanted frame: the last keyframe before it in decode order
    # that is also shown no later than it (an open GOP's leading frames need the GOP before)
    starts = []
    for i in wanted:
        j = bisect.bisect_right(keys, i) - 1
        while j > 0 and pts[keys[j]] > pts[i]:
            j -= 1
        starts.append(keys[max(j, 0)])
    first_needed = np.minimum.accumulate(np.array(starts)[::-1])[::-1]  # by every wanted frame from here on
    mode, pos, sent, decoded = None, -1, 0, 0
    for i, need_from in zip(wanted, first_needed, strict=True):
        if need_from > pos + 1:
            if pos >= 0:  # a keyframe lies ahead: finish what is decoded, then jump to it
                for frame in cc.decode(None):
                    out.take(frame)
                    decoded += 1
                cc.flush_buffers()
            pos = int(need_from) - 1
        for j in range(pos + 1, int(i) + 1):
            want = "DEFAULT" if not skip_nonref or int(pts[j]) in out.rows_of else "NONREF"
            if want != mode:
                cc.skip_frame = mode = want
            for frame in cc.decode(packets[j]):
                out.take(frame)
                decoded += 1
        sent += int(i) - pos
        pos = int(i)
    for frame in cc.decode(None):
        out.take(frame)
        decoded += 1
    return sent, decoded


def _decode_everything(path: str | bytes, holder: dict, short_side: int | None, threads: int):
    """Reference path: decode every frame from the start and keep the one shown at each wanted time."""
    container, stream, info, origin, tol = _open_video(path, None, holder, threads)
    with container:
        t = holder["times"]
        order = np.argsort(t, kind="stable")
        sorted_t = t[order]
        size = _output_size(info, short_side, holder.get("max_short_side"))
        images, got = [None] * len(t), np.zeros(len(t))
        j, prev, prev_t, decoded = 0, None, 0.0, 0
        for frame in container.decode(stream):
            decoded += 1
            _check_frame(frame, holder)
            if frame.pts is None:
                continue
            ft = float(frame.pts * frame.time_base) - origin
            while j < len(t) and ft > sorted_t[j] + tol:
                src, src_t = (prev, prev_t) if prev is not None else (frame, ft)  # before the first: clamp
                images[j], got[j] = _to_rgb(src, size), src_t
                j += 1
            if j == len(t):
                break
            prev, prev_t = frame, ft
        if prev is None:
            raise ValueError("no decodable video frame")
        while j < len(t):  # past the end: clamp to the last frame
            images[j], got[j] = _to_rgb(prev, size), prev_t
            j += 1
    holder["stats"].update(path="everything", sent=decoded, decoded=decoded)
    out = np.empty((len(t),) + images[0].shape, np.uint8)
    out[order] = images
    times_out = np.empty_like(got)
    times_out[order] = got
    return out, times_out, info
