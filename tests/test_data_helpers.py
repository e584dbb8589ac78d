"""Helpers for the data tests: real video files whose frames carry their own index."""

from fractions import Fraction

import av
import numpy as np

from datasets.synthetic import write_video

BITS = 8  # frame index encoded as 8 horizontal bands: survives crops, flips and lossy codecs


def counter_frames(num: int, width: int, height: int, static: bool = False) -> np.ndarray:
    """uint8 [num, H, W, 3]: band k of frame i is white when bit k of i is set, over a fixed texture.

    With `static`, every frame is the same asymmetric image (to check per-clip consistency).
    """
    yy, xx = np.mgrid[0:height, 0:width]
    texture = np.stack([xx * 255 // width, yy * 255 // height, (xx * yy) % 97 * 2], -1).astype(np.uint8)
    frames = np.repeat(texture[None], num, 0)
    if static:
        return frames
    band = height // BITS
    for i in range(num):
        for k in range(BITS):
            # left 3/4 carries the bits; the right quarter keeps texture so crops are distinguishable
            frames[i, k * band:(k + 1) * band, : width * 3 // 4] = 255 if (i >> k) & 1 else 0
    return frames


def panning_frames(num: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 [num, H, W, 3]: a random block texture panning 1 px down and 2 px right per frame.

    Every frame differs, and the smooth motion makes x264 use B-frames as camera footage does.
    """
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    texture = np.tile(np.kron(base, np.ones((4, 4, 1), np.uint8)), (2, 2, 1))
    return np.stack([texture[t % height:t % height + height, 2 * t % width:2 * t % width + width]
                     for t in range(num)])


def read_counter(img: np.ndarray) -> int:
    """Frame index from a uint8 [H, W, 3] image made by `counter_frames` (full height, left part)."""
    h, w = img.shape[:2]
    band = h // BITS
    value = 0
    for k in range(BITS):
        # sample the middle of each band, away from blurred band edges
        patch = img[k * band + band // 4:(k + 1) * band - band // 4, : w // 2]
        value |= int(patch.mean() > 127) << k
    return value


def write_counter_video(path: str, num: int = 30, fps: int = 30, codec: str = "libx264", width: int = 64,
                        height: int = 48, gop_size: int | None = None, static: bool = False) -> str:
    """Write a counter video (see `counter_frames`) and return its path."""
    write_video(path, counter_frames(num, width, height, static), fps, codec, gop_size)
    return path


def write_h264(path: str, frames: np.ndarray, times_ms, keyint: int, pix_fmt: str = "yuv420p",
               x264_params: str | None = None) -> str:
    """H.264 (libx264, B-frames) with frames shown at `times_ms` (ms; irregular gaps give VFR)."""
    fps = round(1000 * (len(times_ms) - 1) / max(1, times_ms[-1] - times_ms[0])) or 30
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], pix_fmt
        s.codec_context.time_base = s.time_base = Fraction(1, 1000)
        # x264's own settings go through x264-params (unknown top-level options are silently ignored)
        params = f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=3:b-pyramid=normal"
        s.options = {"preset": "veryfast", "crf": "18", "x264-params": params + (f":{x264_params}" if x264_params else "")}
        for img, t in zip(frames, times_ms, strict=True):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts, frame.time_base = int(t), Fraction(1, 1000)
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def reference_decode(path: str, times) -> tuple[np.ndarray, np.ndarray]:
    """Decode every frame, then for each time take the last frame shown at or before it (clamped)."""
    with av.open(path) as c:
        s = c.streams.video[0]
        origin = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
        tol = min(max(1e-4, float(s.time_base)), 0.25 / float(s.average_rate or s.guessed_rate))
        shown = [(float(f.pts * f.time_base) - origin, f.to_ndarray(format="rgb24")) for f in c.decode(s)]
    at = np.array([t for t, _ in shown])
    assert np.all(np.diff(at) > 0), "decoder output must be in display order"
    idx = np.clip(np.searchsorted(at, np.asarray(times) + tol, side="right") - 1, 0, None)
    return np.stack([shown[i][1] for i in idx]), at[idx]


def write_audio_only(path: str) -> str:
    """An .mp4 holding one second of AAC audio and no video stream."""
    with av.open(path, "w") as c:
        s = c.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 10) * 3000).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.rate = 16000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_mjpeg(path: str, sizes: list[tuple[int, int]], fps: int = 10) -> str:
    """An MJPEG .mkv with one flat frame per (width, height); the stream header states the first size.

    A later size that differs is encoded by its own encoder: a file whose header understates its frames.
    Frames are filled plane by plane (no RGB array), so even an 8K frame costs little memory to write.
    """
    with av.open(path, "w") as out:
        w0, h0 = sizes[0]
        st = out.add_stream("mjpeg", rate=fps)
        st.width, st.height, st.pix_fmt = w0, h0, "yuvj420p"
        st.codec_context.thread_count = 1
        for i, (w, h) in enumerate(sizes):
            frame = av.VideoFrame(w, h, "yuvj420p")
            for plane in frame.planes:
                plane.update(bytes([128]) * plane.buffer_size)
            frame.pts = i
            if (w, h) == (w0, h0):
                packets = list(st.encode(frame))
            else:
                enc = av.CodecContext.create("mjpeg", "w")
                enc.width, enc.height, enc.pix_fmt = w, h, "yuvj420p"
                enc.time_base = st.codec_context.time_base
                packets = [*enc.encode(frame), *enc.encode(None)]
                for p in packets:
                    p.stream, p.pts, p.dts = st, i, i
            for p in packets:
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    return path
