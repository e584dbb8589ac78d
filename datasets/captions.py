"""Captioned video: caption lists (WebVid / MSR-VTT CSV exports), the caption dataset, and captions for
the generated demo videos.

    python -m datasets.captions --out DIR --num-videos 1200 --size 32     # generated videos + captions

Caption lists are CSV files with a header. One column names the video, one holds the caption; a video
may have several rows (several captions). The video path is `--caption_path_format` filled in with
the row (`{}` is the video column, `{name}` any other column), relative to the data folder:

    WebVid   (videoid, name, page_dir, ...):  --caption_video_column videoid --caption_text_column name
                                               --caption_path_format "{page_dir}/{}.mp4"
    MSR-VTT 1k-A (key, vid_key, video_id, sentence): --caption_video_column video_id
                                               --caption_text_column sentence --caption_path_format "videos/{}.mp4"

The generated set (`ensure_videotext_dataset`) is the motion-labelled synthetic video of
`datasets/synthetic.py` plus captions written from what the generator drew for each video (shape,
colour, size, direction, rotation sense, speed), in several phrasings. Training captions use one set
of sentence templates; the test captions and the zero-shot class prompts use other templates (the
held-out phrasings), made of the same words in new sentences. Every caption states the motion
(direction and rotation sense, the class); how much of the appearance it names varies, so the text
cannot be matched from appearance alone.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import json
import logging
import os
import stat
from dataclasses import dataclass

import numpy as np
import torch

from util.errors import DataFileError, MissingFileError, short_repr

from .synthetic import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    OBJECT_TEXTURES,
    SPLIT_FRACTIONS,
    cached_build,
    render_video,
    write_lossless_video,
)
from .text_tokenizer import CaptionTokenizer
from .video_dataset import VideoDataset

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- caption lists
@dataclass
class CaptionList:
    """Videos of a caption list and their captions: `captions[i]` are the captions of `videos[i]`."""

    path: str
    videos: list[str]
    captions: list[list[str]]

    def all_captions(self) -> list[str]:
        """Every caption, in file order per video (the tokenizer's training corpus)."""
        return [c for caps in self.captions for c in caps]


def read_caption_list(path: str, data_root: str = "", video_column: str = "video", text_column: str = "caption",
                      path_format: str = "{}") -> CaptionList:
    """Parse a CSV caption list; bad input raises ValueError naming the file, the line and the fix.

    `video_column` / `text_column` may list several names separated by commas: the first one present in
    the header is used (so one setting reads files of different origin).
    """
    check_regular_file(path, "caption list")
    try:
        return _read_caption_rows(path, data_root, video_column, text_column, path_format)
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}:{first_bad_utf8_line(path)}: not UTF-8 text ({exc.reason}); re-save the caption "
                            "list as UTF-8 (e.g. iconv -f latin1 -t utf-8 OLD > NEW)") from None


def check_regular_file(path: str, what: str) -> None:
    """Raise MissingFileError unless `path` is a regular file (a FIFO or folder is said, never opened)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise MissingFileError(f"{what} {path} does not exist" if isinstance(exc, FileNotFoundError) else
                               f"{what} {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO or device"
        raise MissingFileError(f"{what} {path} is {kind}, not a regular file; give the file itself")


def first_bad_utf8_line(path: str) -> int:
    """The 1-based number of the first line of `path` that is not valid UTF-8 (0 if none is)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _read_caption_rows(path: str, data_root: str, video_column: str, text_column: str,
                       path_format: str) -> CaptionList:
    """read_caption_list's parser, once the file is known to be a regular file."""
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames
        except csv.Error as exc:
            raise DataFileError(f"{path}:1: the header is not a readable CSV row ({exc}); the first line names the "
                                "columns, e.g. video,caption") from None
        if not header:
            raise DataFileError(f"{path}: empty file; a caption list is a CSV with a header naming a video column "
                             f"and a caption column")
        vcol = _pick_column(path, header, video_column, "video", "--caption_video_column")
        tcol = _pick_column(path, header, text_column, "caption", "--caption_text_column")
        index: dict[str, int] = {}
        videos: list[str] = []
        captions: list[list[str]] = []
        for row in _csv_rows(reader, path):
            line = reader.line_num
            if None in row:  # more fields than the header names
                raise DataFileError(f"{path}:{line}: more fields than the header has columns ({len(header)}); "
                                 f"quote captions that contain commas")
            video, text = (row.get(vcol) or "").strip(), (row.get(tcol) or "").strip()
            if not video and not text and not any((v or "").strip() for v in row.values()):
                continue  # a blank line
            if not video:
                raise DataFileError(f"{path}:{line}: empty video in column '{vcol}'; fill it in or delete the row")
            if not text:
                raise DataFileError(f"{path}:{line}: empty caption in column '{tcol}' for video {short_repr(video)}; "
                                 f"fill it in or delete the row")
            try:
                rel = path_format.format(video, **row)
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                raise DataFileError(f"{path}:{line}: --caption_path_format {path_format!r} names {exc}, which is not a "
                                    f"column of the header ({_columns(header)})") from None
            full = os.path.join(data_root, rel)
            if full not in index:
                index[full] = len(videos)
                videos.append(full)
                captions.append([])
            captions[index[full]].append(text)
    if not videos:
        raise DataFileError(f"{path}: the caption list has a header but no rows")
    return CaptionList(path, videos, captions)


def _csv_rows(reader: csv.DictReader, path: str):
    """The reader's rows; csv's own errors (a field over its 128 KiB limit, a NUL byte) name file and line."""
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            hint = ("an unclosed quote (\") usually makes the rest of the file one field: close it, or shorten the "
                    "caption" if "field larger" in str(exc) else "fix or delete the row")
            raise DataFileError(f"{path}:{start}: not a readable CSV row from here ({exc}); {hint}") from None
        yield row


def _columns(header: list[str]) -> str:
    """The header's column names for a message, bounded (a binary 'header' can be a megabyte)."""
    text = ", ".join(header)
    return text if len(text) <= 200 else text[:197] + "..."


def _pick_column(path: str, header: list[str], wanted: str, role: str, flag: str) -> str:
    """The first of the comma-separated names in `wanted` that the header has; else a clear error."""
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    for name in names:
        if name in header:
            return name
    raise DataFileError(f"{path}: no {role} column {' or '.join(repr(n) for n in names)} in the header "
                     f"({_columns(header)}); name the right one with {flag}")


def write_caption_list(path: str, rows: list[tuple[str, str]]) -> None:
    """Write (video, caption) rows as a `video,caption` CSV, atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- dataset
class CaptionVideoDataset(VideoDataset):
    """Items of a caption list: the VideoDataset's clip(s) of a video plus one of its captions as ids.

    The caption (and which of its words text masking drops) comes from a generator seeded by
    (seed, epoch, index), like the clip, so the pairs do not depend on ranks, workers or resumes.
    """

    CAPTION_STREAM = 7919  # a fourth seed word: the caption draws never share the clip's random stream

    def __init__(self, captions: CaptionList, tokenizer: CaptionTokenizer, context_length: int,
                 text_mask_ratio: float = 0.0, **kwargs) -> None:
        super().__init__(captions.path, samples=[(v, -1) for v in captions.videos], **kwargs)
        if not 0.0 <= text_mask_ratio < 1.0:
            raise ValueError(f"text_mask_ratio must be in [0, 1), got {text_mask_ratio}")
        self.captions, self.tokenizer = captions.captions, tokenizer
        self.context_length, self.text_mask_ratio = context_length, text_mask_ratio

    def __getitem__(self, key) -> dict:
        """The VideoDataset item plus `tokens` [R, context_length]: a caption of the video actually decoded."""
        item = super().__getitem__(key)
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, int(epoch), int(index), self.CAPTION_STREAM])
        # `index` is the decoded video: a replacement when the drawn one could not be read.
        texts = [self.captions[v][int(rng.integers(len(self.captions[v])))] for v in item["index"].tolist()]
        ids = self.tokenizer.encode(texts, self.context_length, self.text_mask_ratio, rng)
        item["tokens"] = torch.from_numpy(ids)
        return item


# ----------------------------------------------------------------------------- captions of the generated videos
SHAPE_WORDS = {"square": "square", "triangle": "triangle", "cross": "cross", "ellipse": "oval", "star": "star"}
DIRECTION_WORDS = {"right": ("right", "to the right", "rightward"), "left": ("left", "to the left", "leftward"),
                   "down": ("down", "downward", "toward the bottom"), "up": ("up", "upward", "toward the top")}
ROTATION_WORDS = {"cw": "clockwise", "ccw": "counterclockwise"}
GENERIC_SUBJECTS = ("something", "an object", "a shape")
# Training phrasings; {speed} is "" or an adverb with a trailing space.
# {s}/{es}/{it} make the verbs agree with the subject: "a star moves", "a star and a cross move".
TRAIN_TEMPLATES = (
    "{subject} {speed}move{s} {direction}, spinning {rotation}",
    "{subject} {speed}slide{s} {direction} while turning {rotation}",
    "{subject} rotate{s} {rotation} as {it} {speed}drift{s} {direction}",
    "{subject} {speed}travel{s} {direction} and spin{s} {rotation}",
    "spinning {rotation}, {subject} {speed}go{es} {direction}",
)
# Held-out phrasings (test captions, class prompts): the training words in other sentences.
HELD_OUT_TEMPLATES = (
    "{subject} spin{s} {rotation} and {speed}move{s} {direction}",
    "turning {rotation}, {subject} {speed}drift{s} {direction}",
    "{subject} {speed}go{es} {direction} as {it} spin{s} {rotation}",
)
# Bumped when the caption text changes, so cached caption sets are rebuilt (2: verbs agree with two objects).
CAPTION_VERSION = 2


def _agreement(plural: bool) -> dict[str, str]:
    """The template's verb-ending slots for a singular or plural subject."""
    return dict(s="", es="", it="they") if plural else dict(s="s", es="es", it="it")


def colour_name(rgb: np.ndarray) -> str:
    """A plain colour word for an RGB triple in [0, 1] (hue buckets; grey/white when unsaturated)."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if s < 0.25:
        return "white" if v > 0.8 else "grey"
    hue = h * 360
    for bound, name in ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"),
                        (260, "blue"), (300, "purple"), (345, "pink")):
        if hue < bound:
            return name
    return "red"


def describe_objects(objects: list[dict], size: int, object_scale: float, rng: np.random.Generator,
                     detail: int) -> str:
    """Noun phrase for the video's objects; detail 0: generic, 1: shape, 2: colour + shape, 3: size + colour + shape."""
    if detail == 0:
        return GENERIC_SUBJECTS[int(rng.integers(len(GENERIC_SUBJECTS)))]
    phrases = []
    for o in objects:
        words = [SHAPE_WORDS[o["shape"]]]
        if detail >= 2:
            words.insert(0, colour_name(o["colour"]))
        if detail >= 3:
            rel = (o["r"] / (size * object_scale) - 0.12) / 0.08  # the generator draws r in size * [0.12, 0.2]
            words.insert(0, "small" if rel < 0.5 else "big")
        phrases.append(" ".join(words))
    return " and ".join(("an " if p[0] in "aeiou" else "a ") + p for p in phrases)


def speed_word(objects: list[dict], size: int, speed_scale: float) -> str:
    """"slowly " / "quickly " for the slowest / fastest third of the generator's speeds, else ""."""
    rel = np.mean([(o["speed"] / (size * speed_scale) - 0.012) / 0.013 for o in objects])
    return "slowly " if rel < 1 / 3 else "quickly " if rel > 2 / 3 else ""


def caption(label: int, objects: list[dict], template: str, rng: np.random.Generator, size: int,
            object_scale: float = 1.0, speed_scale: float = 1.0, detail: int | None = None) -> str:
    """One caption of a generated video from its class and drawn objects, in `template`'s phrasing."""
    direction, sense = CLASS_NAMES[label].split("-")
    detail = int(rng.integers(4)) if detail is None else detail
    words = DIRECTION_WORDS[direction]
    text = template.format(
        subject=describe_objects(objects, size, object_scale, rng, detail),
        speed=speed_word(objects, size, speed_scale) if rng.random() < 0.5 else "",
        direction=words[int(rng.integers(len(words)))], rotation=ROTATION_WORDS[sense],
        **_agreement(detail > 0 and len(objects) > 1))
    return _sentence(text)


def class_prompts() -> dict[str, list[str]]:
    """Zero-shot prompts per class: every held-out phrasing x generic subject x direction wording."""
    out = {}
    for name in CLASS_NAMES:
        direction, sense = name.split("-")
        out[name] = [_sentence(t.format(subject=s, speed="", direction=d, rotation=ROTATION_WORDS[sense],
                                        **_agreement(False)))
                     for t in HELD_OUT_TEMPLATES for s in GENERIC_SUBJECTS for d in DIRECTION_WORDS[direction]]
    return out


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def generate_videotext_dataset(out: str, num_videos: int, size: int = 32, frames: int = 48, fps: int = 30,
                               seed: int = 0, background: str = "plain", object_scale: float = 2.0,
                               speed_scale: float = 2.0, captions_per_video: int = 5,
                               object_texture: str = "stripes") -> str:
    """Write labelled videos, train/val/test lists, caption lists and class prompts into `out`.

    Files: videos/*.mkv (lossless, byte-reproducible, as datasets.synthetic); train/val/test.csv (`path label`) and classes.txt, as datasets.synthetic;
    train_captions.csv (`captions_per_video` training phrasings per video), val_ and test_captions.csv
    (one held-out phrasing per video, MSR-VTT 1k-A style); class_prompts.json (held-out phrasings per
    class, for zero-shot classification).
    """
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    rng = np.random.default_rng(seed)
    text_rng = np.random.default_rng([seed, 1])  # captions never shift the videos' random stream
    rows = []
    for i in range(num_videos):
        label = i % len(CLASS_NAMES)
        objects: list[dict] = []
        video, _ = render_video(label, rng, size, frames, None, background, object_scale, speed_scale,
                                object_texture, attributes=objects)
        rel = f"videos/{i:05d}_{CLASS_NAMES[label]}.mkv"
        write_lossless_video(os.path.join(out, rel), video, fps)
        train_caps = [caption(label, objects, TRAIN_TEMPLATES[(k + i) % len(TRAIN_TEMPLATES)], text_rng, size,
                              object_scale, speed_scale) for k in range(captions_per_video)]
        held = caption(label, objects, HELD_OUT_TEMPLATES[int(text_rng.integers(len(HELD_OUT_TEMPLATES)))],
                       text_rng, size, object_scale, speed_scale, detail=2)
        rows.append((rel, label, train_caps, held))
    order = np.random.default_rng(seed + 1).permutation(num_videos)
    begin = 0
    for j, (split, frac) in enumerate(SPLIT_FRACTIONS):
        end = num_videos if j == len(SPLIT_FRACTIONS) - 1 else begin + max(1, round(frac * num_videos))
        chosen = sorted(order[begin:min(end, num_videos)])
        begin = min(end, num_videos)
        with open(os.path.join(out, f"{split}.csv"), "w") as f:
            f.writelines(f"{rows[k][0]} {rows[k][1]}\n" for k in chosen)
        if split == "train":
            caps = [(rows[k][0], c) for k in chosen for c in rows[k][2]]
        else:
            caps = [(rows[k][0], rows[k][3]) for k in chosen]
        write_caption_list(os.path.join(out, f"{split}_captions.csv"), caps)
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    with open(os.path.join(out, "class_prompts.json"), "w") as f:
        json.dump(class_prompts(), f, indent=1)
    return out


def ensure_videotext_dataset(cache_dir: str | None = None, num_videos: int = 240, size: int = 32,
                             frames: int = 48, fps: int = 30, seed: int = 0, background: str = "plain",
                             object_scale: float = 2.0, speed_scale: float = 2.0,
                             captions_per_video: int = 5, object_texture: str = "stripes") -> str:
    """The generated captioned set in the cache (made once, atomically); returns its folder."""
    if object_texture not in OBJECT_TEXTURES:
        raise ValueError(f"object_texture must be one of {OBJECT_TEXTURES}, got {object_texture!r}")
    # Every setting and the generator's version name the folder (as datasets.synthetic): the H.264 sets of
    # GENERATOR_VERSION 1 are never reused.
    params = dict(num_videos=num_videos, size=size, frames=frames, fps=fps, seed=seed, background=background,
                  object_scale=float(object_scale), speed_scale=float(speed_scale),
                  captions_per_video=captions_per_video, object_texture=object_texture, version=GENERATOR_VERSION,
                  caption_version=CAPTION_VERSION)

    def build(tmp: str) -> None:
        logger.info("generating %d captioned videos into the cache %s", num_videos, os.path.dirname(tmp))
        generate_videotext_dataset(tmp, num_videos, size, frames, fps, seed, background, object_scale,
                                   speed_scale, captions_per_video, object_texture)

    return cached_build("videotext", params, "class_prompts.json", build, cache_dir)


def main() -> None:
    """Command-line entry point: generate a captioned set into --out."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num-videos", type=int, default=240)
    p.add_argument("--size", type=int, default=32, help="frame side in pixels (even)")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--background", default="plain", choices=("texture", "smooth", "plain"))
    p.add_argument("--object-scale", type=float, default=2.0, help="multiplies every object's radius")
    p.add_argument("--speed-scale", type=float, default=2.0, help="multiplies every object's speed")
    p.add_argument("--captions-per-video", type=int, default=5)
    p.add_argument("--object-texture", choices=OBJECT_TEXTURES, default="stripes",
                   help="objects in two-colour stripes or one solid colour")
    a = p.parse_args()
    generate_videotext_dataset(a.out, a.num_videos, a.size, a.frames, seed=a.seed, background=a.background,
                               object_scale=a.object_scale, speed_scale=a.speed_scale,
                               captions_per_video=a.captions_per_video, object_texture=a.object_texture)
    print(f"wrote {a.num_videos} captioned videos, lists and class prompts to {a.out}")


if __name__ == "__main__":
    main()
