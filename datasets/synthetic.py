"""Generated demo videos: textured shapes whose *motion* is the label.

    python -m datasets.synthetic --out DIR --num-videos 96 [--size 64 --frames 48 --fps 30]
    python -m datasets.synthetic --out DIR --num-videos 16 --single-object   # + boxes.json

Eight classes = 4 directions (right, left, down, up) x 2 rotation senses (cw, ccw). Shape, colour,
object texture, background texture, start position and start angle are drawn independently of the
class, and objects wrap around the frame edges (a torus), so the object position in any single frame
is uniform whatever the direction: one frame carries no information about the label; two do.

Generated sets are reproducible to the byte: frames come from one seeded numpy generator (PCG64 draws
are the same on every platform) and are stored losslessly (FFV1 in Matroska, single-threaded encoder,
`bitexact` muxing without version strings or random ids), so the same arguments give the same files on
any machine and PyAV/FFmpeg version, and a decoder returns exactly the rendered pixels. H.264 would
not: x264's output depends on its version and thread count, and its rounding noise differs per file.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile

import av
import numpy as np

logger = logging.getLogger(__name__)

CLASS_NAMES = [f"{d}-{r}" for d in ("right", "left", "down", "up") for r in ("cw", "ccw")]
_DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0), "up": (0.0, -1.0)}
_SHAPES = ("square", "triangle", "cross", "ellipse", "star")
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))


BACKGROUNDS = ("texture", "smooth", "plain")
OBJECT_TEXTURES = ("stripes", "solid")


def _background(rng: np.random.Generator, size: int, kind: str = "texture") -> np.ndarray:
    """Static background, uint8 [H, W, 3]: random low-frequency noise plus faint stripes ("texture"), the
    noise alone ("smooth": no stripes), or one random colour ("plain"); the last two are easy to fill in
    from a few visible patches. All kinds draw the same random numbers, so the objects of a video do not
    depend on the background kind."""
    if kind not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {kind!r}")
    low = rng.random((4, 4, 3))
    ys = np.linspace(0, 3, size)
    # bilinear upsampling of a 4x4 noise grid: smooth blotches that do not move
    y0 = np.clip(ys.astype(int), 0, 2)
    fy = (ys - y0)[:, None, None]
    rows = low[y0] * (1 - fy) + low[y0 + 1] * fy
    fx = (ys - y0)[None, :, None]
    img = rows[:, y0] * (1 - fx) + rows[:, y0 + 1] * fx
    yy, xx = np.mgrid[0:size, 0:size]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.3, 0.8)
    stripes = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    if kind == "plain":
        img = np.broadcast_to(low[0, 0], img.shape)
    img = 0.35 + 0.35 * img + (0.15 * stripes[..., None] if kind == "texture" else 0.075)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape in object-local coordinates (u, v), radius r."""
    if shape == "square":
        return (np.abs(u) < r * 0.8) & (np.abs(v) < r * 0.8)
    if shape == "triangle":
        return (v < r * 0.6) & (v > -r + 1.6 * np.abs(u))
    if shape == "cross":
        return ((np.abs(u) < r * 0.3) & (np.abs(v) < r)) | ((np.abs(v) < r * 0.3) & (np.abs(u) < r))
    if shape == "ellipse":
        return (u / r) ** 2 + (v / (0.55 * r)) ** 2 < 1
    angle, rad = np.arctan2(v, u), np.hypot(u, v)
    return rad < r * (0.6 + 0.4 * np.cos(5 * angle))


def render_video(label: int, rng: np.random.Generator, size: int = 64, frames: int = 48,
                 num_objects: int | None = None, background: str = "texture", object_scale: float = 1.0,
                 speed_scale: float = 1.0, object_texture: str = "stripes") -> tuple[np.ndarray, list]:
    """Render one clip of class `label`: uint8 [T, H, W, 3] and per-frame boxes [[x0, y0, x1, y1], ...].

    `object_texture` "stripes" (two colours, so the rotation shows) or "solid" (one colour: what a micro
    model can learn to paint back in minutes; the demo uses it). Both draw the same random numbers.
    """
    if object_texture not in OBJECT_TEXTURES:
        raise ValueError(f"object_texture must be one of {OBJECT_TEXTURES}, got {object_texture!r}")
    direction, sense = CLASS_NAMES[label].split("-")
    dx, dy = _DIRECTIONS[direction]
    spin = 1.0 if sense == "cw" else -1.0
    n_obj = num_objects or int(rng.integers(1, 3))
    single = num_objects == 1
    bg = _background(rng, size, background)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    objs = []
    for _ in range(n_obj):
        r = size * rng.uniform(0.12, 0.2) * object_scale
        # pixels per frame: slow enough to see, fast enough to matter (speed_scale > 1: larger steps per frame)
        speed = size * rng.uniform(0.012, 0.025) * speed_scale
        if single:
            # stay fully inside the frame so the box is one rectangle (no wrap-around)
            lo, hi = r + 1, size - r - 1
            speed = min(speed, (hi - lo) / max(frames - 1, 1))
            travel = speed * (frames - 1)
            start = []
            for d in (dx, dy):
                a, b = (lo, hi - travel) if d > 0 else (lo + travel, hi) if d < 0 else (lo, hi)
                start.append(rng.uniform(a, max(a, b)))
        else:
            start = rng.uniform(0, size, 2).tolist()
        objs.append(dict(shape=_SHAPES[rng.integers(len(_SHAPES))], r=r, speed=speed, start=start,
                         angle=rng.uniform(0, 2 * np.pi), omega=spin * rng.uniform(0.06, 0.15),
                         colour=rng.uniform(0.1, 1.0, 3), colour2=rng.uniform(0.0, 0.9, 3),
                         freq=rng.uniform(0.5, 1.2)))
    video = np.empty((frames, size, size, 3), np.uint8)
    boxes = []
    for t in range(frames):
        img = bg.astype(np.float32) / 255
        frame_boxes = []
        for o in objs:
            cx = o["start"][0] + dx * o["speed"] * t
            cy = o["start"][1] + dy * o["speed"] * t
            # torus distance so an object leaving one edge re-enters at the other
            ox = (xx - cx + size / 2) % size - size / 2
            oy = (yy - cy + size / 2) % size - size / 2
            a = o["angle"] + o["omega"] * t
            u = np.cos(a) * ox + np.sin(a) * oy
            v = -np.sin(a) * ox + np.cos(a) * oy
            mask = _shape_mask(o["shape"], u, v, o["r"])
            # stripes in object coordinates make the rotation visible even for symmetric shapes
            tex = (np.sin(o["freq"] * u) > 0)[..., None] if object_texture == "stripes" else True
            img = np.where(mask[..., None], np.where(tex, o["colour"], o["colour2"]), img)
            ys, xs = np.nonzero(mask)
            frame_boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
                               if len(xs) else [0, 0, 0, 0])
        video[t] = (img * 255).astype(np.uint8)
        boxes.append(frame_boxes)
    return video, boxes


def write_video(path: str, frames: np.ndarray, fps: int = 30, codec: str = "libx264",
                gop_size: int | None = None, pix_fmt: str = "yuv420p") -> None:
    """Encode uint8 [T, H, W, 3] frames into a video file with PyAV."""
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            # fast preset keeps generation in seconds; crf 18 keeps the textures crisp
            stream.options = {"preset": "veryfast", "crf": "18"}
        if gop_size is not None:
            stream.codec_context.gop_size = gop_size
            if codec == "libx264":
                stream.options = {**stream.options, "keyint": str(gop_size), "min-keyint": str(gop_size),
                                  "scenecut": "0"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_lossless_video(path: str, frames: np.ndarray, fps: int = 30) -> None:
    """Encode uint8 [T, H, W, 3] RGB frames losslessly and byte-reproducibly (FFV1 in Matroska)."""
    # Matroska writes random segment ids and the library version unless muxing is bitexact.
    with av.open(path, "w", format="matroska", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        # bgr0: FFV1 codes 8-bit RGB as is (no lossy RGB->YUV step whose rounding is platform code).
        stream.pix_fmt = "bgr0"
        # Every choice explicit so a changed FFmpeg default cannot change the bytes; one thread because
        # slice threading is the one place an encoder could depend on the machine; every frame a keyframe
        # so a clip anywhere in the video decodes after one seek.
        stream.options = {"threads": "1", "level": "3", "coder": "range_def", "context": "0", "slices": "4",
                          "slicecrc": "1", "g": "1"}
        pad = np.zeros(frames.shape[1:3] + (1,), np.uint8)
        for img in frames:
            # from BGRA: the one packed RGB layout FFV1 takes that PyAV builds from numpy without swscale
            bgra = np.ascontiguousarray(np.concatenate([img[..., ::-1], pad], axis=-1))
            for packet in stream.encode(av.VideoFrame.from_ndarray(bgra, format="bgra")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# Bump when rendering or encoding changes: cached sets are keyed by it, so an older set is never reused.
GENERATOR_VERSION = 2  # 1: H.264 (x264) mp4 files, not reproducible; 2: lossless FFV1 in Matroska


def generate_dataset(out: str, num_videos: int, size: int = 64, frames: int = 48, fps: int = 30,
                     seed: int = 0, single_object: bool = False, background: str = "texture",
                     object_scale: float = 1.0, speed_scale: float = 1.0, object_texture: str = "stripes") -> str:
    """Write `num_videos` labelled lossless videos plus train/val/test.csv (and boxes.json) into `out`."""
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, boxes_all = [], {}
    for i in range(num_videos):
        label = i % len(CLASS_NAMES)  # balanced classes
        video, boxes = render_video(label, rng, size, frames, 1 if single_object else None, background,
                                     object_scale, speed_scale, object_texture)
        rel = f"videos/{i:05d}_{CLASS_NAMES[label]}.mkv"
        write_lossless_video(os.path.join(out, rel), video, fps)
        rows.append((rel, label))
        boxes_all[rel] = boxes
    order = np.random.default_rng(seed + 1).permutation(num_videos)
    begin = 0
    for j, (split, frac) in enumerate(SPLIT_FRACTIONS):
        end = num_videos if j == len(SPLIT_FRACTIONS) - 1 else begin + max(1, round(frac * num_videos))
        with open(os.path.join(out, f"{split}.csv"), "w") as f:
            for k in sorted(order[begin:min(end, num_videos)]):
                f.write(f"{rows[k][0]} {rows[k][1]}\n")
        begin = min(end, num_videos)
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    # per-frame object boxes [x0, y0, x1, y1] (pixels, exclusive end), e.g. to check where AdaMAE looks
    with open(os.path.join(out, "boxes.json"), "w") as f:
        json.dump(boxes_all, f)
    return out


def default_cache_dir() -> str:
    """Where generated sets are cached: $MAE_ST_CACHE, else ~/.cache/mae_st_scale."""
    return os.environ.get("MAE_ST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mae_st_scale")


def cached_build(kind: str, params: dict, marker: str, build, cache_dir: str | None = None) -> str:
    """Folder `<cache>/<kind>-<hash of params>` made once by `build(tmp_dir)`, atomically.

    Built beside the target and renamed: a killed run leaves only a tmp folder, never a half set;
    `marker` (a path inside the folder) tells a finished one, also after losing a race to another process.
    """
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = cache_dir or default_cache_dir()
    final = os.path.join(root, f"{kind}-{digest}")
    if os.path.exists(os.path.join(final, marker)):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{kind}-{digest}-", dir=root)
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not os.path.exists(os.path.join(final, marker)):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_synthetic_dataset(cache_dir: str | None = None, num_videos: int = 96, size: int = 64,
                             frames: int = 48, fps: int = 30, seed: int = 0,
                             single_object: bool = False, background: str = "texture",
                             object_scale: float = 1.0, speed_scale: float = 1.0,
                             object_texture: str = "stripes") -> str:
    """Return a folder holding the generated set, creating it once (atomically) in a cache folder."""
    # Every setting and the generator version name the folder: new content never reuses an old folder.
    params = dict(num_videos=num_videos, size=size, frames=frames, fps=fps, seed=seed,
                  single_object=single_object, background=background, object_scale=float(object_scale),
                  speed_scale=float(speed_scale), object_texture=object_texture, version=GENERATOR_VERSION)

    def build(tmp: str) -> None:
        logger.info("generating %d synthetic videos into the cache %s", num_videos, os.path.dirname(tmp))
        generate_dataset(tmp, num_videos, size, frames, fps, seed, single_object, background, object_scale,
                         speed_scale, object_texture)

    return cached_build("synthetic", params, "test.csv", build, cache_dir)


def dataset_fingerprint(folder: str) -> str:
    """SHA-256 (first 16 hex digits) over the list files and every video's bytes: equal on any machine."""
    digest = hashlib.sha256()
    names = [f"{split}.csv" for split, _ in SPLIT_FRACTIONS]
    names += sorted(os.path.join("videos", n) for n in os.listdir(os.path.join(folder, "videos")))
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num-videos", type=int, default=96)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--single-object", action="store_true",
                   help="one moving object on a static background (boxes.json holds its per-frame box)")
    p.add_argument("--background", choices=BACKGROUNDS, default="texture",
                   help="static background: low-frequency noise plus stripes, the noise alone, or one colour")
    p.add_argument("--object-scale", type=float, default=1.0, help="multiplies every object's radius")
    p.add_argument("--speed-scale", type=float, default=1.0, help="multiplies every object's speed")
    a = p.parse_args()
    generate_dataset(a.out, a.num_videos, a.size, a.frames, a.fps, a.seed, a.single_object, a.background,
                     a.object_scale, a.speed_scale)
    print(f"wrote {a.num_videos} videos and train/val/test.csv to {a.out} (fingerprint {dataset_fingerprint(a.out)})")


if __name__ == "__main__":
    main()
