"""Readers and writers for the official AVA v2.2 files (docs/ava.md lists them).

- `ava_{train,val}_v2.2.csv`: `video_id, timestamp, x1, y1, x2, y2, action_id, person_id` (coordinates
  normalised to [0, 1]); one row per (person box, action), so a box with several actions has several rows.
- `ava_action_list_v2.2_for_activitynet_2019.pbtxt`: `item { name: "..." id: N }` (the 60 evaluated
  classes); the full `ava_action_list_v2.2.pbtxt` form `label { name: "..." label_id: N label_type: ... }` is
  read too.
- `ava_val_excluded_timestamps_v2.2.csv`: `video_id, timestamp` keyframes left out of evaluation.
- person proposals, PySlowFast's `ava_{train,val}_predicted_boxes.csv`: the annotation columns with an empty
  (or ignored) action and a detector score last (slowfast/datasets/ava_helper.py `load_boxes_and_labels`).
- detections, the official result format: `video_id, timestamp, x1, y1, x2, y2, action_id, score`
  (what ActivityNet's Evaluation/get_ava_performance.py reads with `-d`).
- PySlowFast frame lists: `original_vido_id video_id frame_id path labels` per frame, after a header.

Timestamps are whole seconds (the evaluator keys a keyframe as `"%s,%04d" % (video_id, int(timestamp))`);
anything that does not parse is refused with file:line and the fix.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from util.errors import DataFileError, MissingFileError

Box = tuple[float, float, float, float]  # x1, y1, x2, y2, normalised to [0, 1]
Key = tuple[str, int]  # (video_id, timestamp in seconds): one keyframe

FPS = 30  # AVA frames are extracted at 30 fps (PySlowFast ava_helper.py FPS)
VALID_SECONDS = range(902, 1799)  # annotated keyframes: seconds 902..1798 (PySlowFast AVA_VALID_FRAMES)
CLIP_START_SECOND = 900  # the 15-minute clips start at second 900: frame of second s = (s - 900) * fps
BOX_TOLERANCE = 1e-3  # normalised coordinates may exceed [0, 1] by rounding, never by more

# The official file names, as PySlowFast's configs name them (AVA.ANNOTATION_DIR).
ANNOTATIONS = {"train": "ava_train_v2.2.csv", "val": "ava_val_v2.2.csv"}
LABEL_MAP = "ava_action_list_v2.2_for_activitynet_2019.pbtxt"
EXCLUDED = {"train": "ava_train_excluded_timestamps_v2.2.csv", "val": "ava_val_excluded_timestamps_v2.2.csv"}
PROPOSALS = {"train": "ava_train_predicted_boxes.csv", "val": "ava_val_predicted_boxes.csv"}
FRAME_LIST_HEADER = "original_vido_id video_id frame_id path labels"  # (sic) PySlowFast's header


class Annotation(NamedTuple):
    """One ground-truth row: a person box at a keyframe with one action (person_id None in 7-column files)."""

    video_id: str
    timestamp: int
    box: Box
    action_id: int
    person_id: int | None = None


class Proposal(NamedTuple):
    """One detected person box with its detector score (action_id: the column's value, None when empty)."""

    video_id: str
    timestamp: int
    box: Box
    score: float
    action_id: int | None = None


class Detection(NamedTuple):
    """One scored (box, action) of a model: a row of the official detection CSV."""

    video_id: str
    timestamp: int
    box: Box
    action_id: int
    score: float


@dataclass(frozen=True)
class PersonBox:
    """A ground-truth person box of one keyframe with all its actions (multi-label)."""

    box: Box
    actions: tuple[int, ...]
    person_id: int | None


@dataclass(frozen=True)
class LabelMap:
    """The evaluated classes: id -> name, in file order."""

    names: dict[int, str]

    @property
    def ids(self) -> list[int]:
        """The class ids in file order."""
        return list(self.names)

    def __len__(self) -> int:
        """Number of classes."""
        return len(self.names)


def _text(path: str, what: str) -> str:
    """A UTF-8 text file's contents (BOM dropped); MissingFileError / DataFileError naming `what` and the file."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} {path} does not exist (or is not a file); give the path of the official "
                               f"AVA file (docs/ava.md)")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); download the file "
                            f"again") from None


def _rows(path: str, what: str) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank CSV line."""
    text = _text(path, what)
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield lineno, [f.strip() for f in next(csv.reader([line]))]


def _where(path: str, lineno: int) -> str:
    """`file:line` for messages."""
    return f"{path}:{lineno}"


def _video(path: str, lineno: int, text: str) -> str:
    """A video id field (not empty)."""
    if not text:
        raise DataFileError(f"{_where(path, lineno)}: empty video_id; every row starts with the video's id")
    return text


def _timestamp(path: str, lineno: int, text: str) -> int:
    """A timestamp field: whole seconds (leading zeros allowed, as in 0902)."""
    if not text.isdigit() or len(text) > 9:
        raise DataFileError(f"{_where(path, lineno)}: timestamp {text[:30]!r} is not a whole number of seconds; "
                            f"AVA keyframes are at integer seconds (e.g. 0902)")
    return int(text)


def _int(path: str, lineno: int, text: str, what: str) -> int:
    """An integer field (an action or person id)."""
    if not text.lstrip("-").isdigit() or len(text) > 18:
        raise DataFileError(f"{_where(path, lineno)}: {what} {text[:30]!r} is not an integer")
    return int(text)


def _float(path: str, lineno: int, text: str, what: str) -> float:
    """A finite float field."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataFileError(f"{_where(path, lineno)}: {what} {text[:30]!r} is not a finite number")
    return value


def _box(path: str, lineno: int, fields: list[str], normalised: bool) -> Box:
    """Columns 3-6 as (x1, y1, x2, y2); with `normalised`, refused outside [0, 1] or inverted."""
    box = tuple(_float(path, lineno, t, n) for t, n in zip(fields, ("x1", "y1", "x2", "y2"), strict=True))
    if normalised:
        if not all(-BOX_TOLERANCE <= v <= 1 + BOX_TOLERANCE for v in box):
            raise DataFileError(f"{_where(path, lineno)}: box {box} is not normalised to [0, 1]; AVA boxes are "
                                f"x1, y1, x2, y2 as fractions of the frame's width and height")
        if box[2] < box[0] or box[3] < box[1]:
            raise DataFileError(f"{_where(path, lineno)}: box {box} has x2 < x1 or y2 < y1; the columns are "
                                f"x1, y1, x2, y2 (top-left, then bottom-right)")
    return box  # type: ignore[return-value]


def read_annotations(path: str) -> list[Annotation]:
    """Rows of `ava_{train,val}_v2.2.csv` (7 columns, or 8 with the person id), in file order."""
    out = []
    for lineno, f in _rows(path, "AVA annotation file"):
        if len(f) not in (7, 8):
            raise DataFileError(f"{_where(path, lineno)}: {len(f)} columns; expected 'video_id, timestamp, x1, "
                                f"y1, x2, y2, action_id, person_id' (ava_*_v2.2.csv)")
        person = _int(path, lineno, f[7], "person_id") if len(f) == 8 else None
        out.append(Annotation(_video(path, lineno, f[0]), _timestamp(path, lineno, f[1]),
                              _box(path, lineno, f[2:6], True), _int(path, lineno, f[6], "action_id"), person))
    return out


def group_person_boxes(rows: Iterable[Annotation]) -> dict[Key, list[PersonBox]]:
    """Keyframe -> its person boxes, the actions of rows with the same (video, timestamp, box) merged."""
    grouped: dict[Key, dict[tuple[Box, int | None], list[int]]] = {}
    for r in rows:
        actions = grouped.setdefault((r.video_id, r.timestamp), {}).setdefault((r.box, r.person_id), [])
        if r.action_id not in actions:
            actions.append(r.action_id)
    # a box annotated with two person ids is two persons; the same person's rows share one box
    return {key: [PersonBox(box, tuple(sorted(acts)), pid) for (box, pid), acts in boxes.items()]
            for key, boxes in grouped.items()}


def read_proposals(path: str, score_threshold: float = 0.0) -> list[Proposal]:
    """Person proposals (PySlowFast's predicted boxes) whose score is at least `score_threshold`."""
    out = []
    for lineno, f in _rows(path, "AVA proposal file"):
        if len(f) != 8:
            raise DataFileError(f"{_where(path, lineno)}: {len(f)} columns; expected 'video_id, timestamp, x1, "
                                f"y1, x2, y2, action_id (may be empty), score' (PySlowFast's "
                                f"ava_*_predicted_boxes.csv)")
        score = _float(path, lineno, f[7], "score")
        if score < score_threshold:  # PySlowFast drops `score < DETECTION_SCORE_THRESH`
            continue
        action = _int(path, lineno, f[6], "action_id") if f[6] else None
        out.append(Proposal(_video(path, lineno, f[0]), _timestamp(path, lineno, f[1]),
                            _box(path, lineno, f[2:6], True), score, action))
    return out


def proposals_by_keyframe(rows: Iterable[Proposal]) -> dict[Key, list[Proposal]]:
    """Keyframe -> its proposals (file order)."""
    out: dict[Key, list[Proposal]] = {}
    for r in rows:
        out.setdefault((r.video_id, r.timestamp), []).append(r)
    return out


def read_excluded(path: str) -> set[Key]:
    """Keyframes of `ava_val_excluded_timestamps_v2.2.csv` (`video_id, timestamp` rows)."""
    out = set()
    for lineno, f in _rows(path, "AVA excluded-timestamps file"):
        if len(f) != 2:
            raise DataFileError(f"{_where(path, lineno)}: {len(f)} columns; expected 'video_id, timestamp' "
                                f"(ava_*_excluded_timestamps_v2.2.csv)")
        out.add((_video(path, lineno, f[0]), _timestamp(path, lineno, f[1])))
    return out


def read_detections(path: str) -> list[Detection]:
    """Rows of a detection file in the official format (8 columns, the score last), in file order."""
    out = []
    for lineno, f in _rows(path, "AVA detection file"):
        if len(f) != 8:
            raise DataFileError(f"{_where(path, lineno)}: {len(f)} columns; expected 'video_id, timestamp, x1, "
                                f"y1, x2, y2, action_id, score' (the official AVA detection format)")
        out.append(Detection(_video(path, lineno, f[0]), _timestamp(path, lineno, f[1]),
                             _box(path, lineno, f[2:6], False), _int(path, lineno, f[6], "action_id"),
                             _float(path, lineno, f[7], "score")))
    return out


_PBTXT_TOKEN = re.compile(r'(?P<comment>#[^\n]*)|(?P<open>\{)|(?P<close>\})'
                          r'|(?P<key>\w+)\s*:\s*(?:"(?P<quoted>(?:[^"\\\n]|\\.)*)"|(?P<bare>[^\s{}"#]+))'
                          r'|(?P<block>\w+)\s*(?=\{)|(?P<other>\S+)')


def read_label_map(path: str) -> LabelMap:
    """The classes of an AVA label map (`item { name: "..." id: N }` or `label { name: ... label_id: N }`)."""
    text = _text(path, "AVA label map")
    names: dict[int, str] = {}
    block: str | None = None  # the open block's name, once its '{' is read
    fields: dict[str, str] = {}
    pending, block_line = None, 0
    for m in _PBTXT_TOKEN.finditer(text):
        lineno = text.count("\n", 0, m.start()) + 1
        kind = next(k for k in ("comment", "open", "close", "key", "block", "other") if m[k] is not None)
        if kind == "comment":
            continue
        if kind == "block" and block is None and pending is None and m["block"] in ("item", "label"):
            pending, block_line = m["block"], lineno
        elif kind == "open" and pending is not None:
            block, pending, fields = pending, None, {}
        elif kind == "key" and block is not None:
            fields[m["key"]] = m["quoted"] if m["quoted"] is not None else m["bare"]
        elif kind == "close" and block is not None:
            raw_id = fields.get("id", fields.get("label_id"))
            if "name" not in fields or raw_id is None:
                raise DataFileError(f"{_where(path, block_line)}: this {block} has no "
                                    f"{'name' if 'name' not in fields else 'id'}; each entry needs both")
            if not raw_id.isdigit() or int(raw_id) < 1:
                raise DataFileError(f"{_where(path, block_line)}: id {raw_id!r} is not a positive integer (the "
                                    f"evaluator's classes are 1-indexed)")
            if int(raw_id) in names:
                raise DataFileError(f"{_where(path, block_line)}: id {raw_id} appears twice; each class once")
            names[int(raw_id)] = fields["name"]
            block = None
        else:
            raise DataFileError(f"{_where(path, lineno)}: unexpected {m.group(0)[:40]!r}; a label map is entries "
                                f'like item {{ name: "dance" id: 4 }}')
    if block is not None or pending is not None:
        raise DataFileError(f"{_where(path, block_line)}: the {block or pending} block is not closed with '}}'")
    if not names:
        raise DataFileError(f"{path}: the label map holds no classes")
    return LabelMap(names)


def read_frame_list(path: str, frame_root: str = "") -> dict[str, list[str]]:
    """A PySlowFast frame list: video id -> its frame paths (under `frame_root`), in list order."""
    out: dict[str, list[str]] = {}
    for lineno, line in enumerate(_text(path, "AVA frame list").splitlines(), 1):
        parts = line.split()
        if not parts or (lineno == 1 and parts[0] == FRAME_LIST_HEADER.split()[0]):
            continue
        if len(parts) != 5:
            raise DataFileError(f"{_where(path, lineno)}: expected '{FRAME_LIST_HEADER}' (PySlowFast frame list), "
                                f"got {line.strip()[:200]!r}")
        out.setdefault(parts[0], []).append(os.path.join(frame_root, parts[3]))
    if not out:
        raise DataFileError(f"{path}: the frame list holds no frames")
    return out


# ---------------------------------------------------------------- writers


def _num(x: float) -> str:
    """A float as the shortest text that reads back to the same value."""
    return repr(float(x))


def _check_video_id(video_id: str) -> str:
    """A video id that a CSV row can hold unquoted."""
    if not video_id or any(c in video_id for c in ',"\n\r'):
        raise DataFileError(f"video id {video_id!r} cannot be written to an AVA CSV (empty, or holds a comma, quote "
                            f"or newline)")
    return video_id


def _write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file renamed over it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def _row(video_id: str, timestamp: int, box: Box, *rest: str) -> str:
    """One CSV line: video, zero-padded seconds, the box, then `rest`."""
    return ",".join([_check_video_id(video_id), f"{int(timestamp):04d}", *map(_num, box), *rest]) + "\n"


def write_detections(path: str, detections: Iterable[Detection]) -> None:
    """The official detection CSV (`video_id, timestamp, x1, y1, x2, y2, action_id, score`), rows in order."""
    buf = io.StringIO()
    for d in detections:
        if not math.isfinite(d.score):
            raise DataFileError(f"detection {d} has a score that is not finite; cannot write it to {path}")
        buf.write(_row(d.video_id, d.timestamp, d.box, str(int(d.action_id)), _num(d.score)))
    _write_text(path, buf.getvalue())


def write_annotations(path: str, rows: Iterable[Annotation]) -> None:
    """An `ava_*_v2.2.csv` file (8 columns when every row has a person id, else 7)."""
    rows = list(rows)
    with_person = all(r.person_id is not None for r in rows)
    _write_text(path, "".join(_row(r.video_id, r.timestamp, r.box, str(r.action_id),
                                   *([str(r.person_id)] if with_person else [])) for r in rows))


def write_proposals(path: str, rows: Iterable[Proposal]) -> None:
    """A PySlowFast predicted-boxes CSV: the action column empty unless given, the score last."""
    _write_text(path, "".join(_row(r.video_id, r.timestamp, r.box,
                                   "" if r.action_id is None else str(r.action_id), _num(r.score)) for r in rows))


def write_excluded(path: str, keys: Iterable[Key]) -> None:
    """An excluded-timestamps CSV (`video_id, timestamp`)."""
    _write_text(path, "".join(f"{_check_video_id(v)},{int(t):04d}\n" for v, t in keys))


def write_label_map(path: str, label_map: LabelMap) -> None:
    """A label map in the ActivityNet 2019 form (`item { name: "..." id: N }`)."""
    for name in label_map.names.values():
        if '"' in name or "\n" in name:
            raise DataFileError(f"class name {name!r} holds a quote or newline; cannot write it to {path}")
    _write_text(path, "".join(f'item {{\n  name: "{name}"\n  id: {i}\n}}\n' for i, name in label_map.names.items()))


def write_frame_list(path: str, frames: dict[str, list[str]]) -> None:
    """A PySlowFast frame list: the header, then one line per frame (paths relative to the frame root)."""
    lines = [FRAME_LIST_HEADER]
    for index, (video, paths) in enumerate(frames.items()):
        lines += [f'{_check_video_id(video)} {index} {k} {p} ""' for k, p in enumerate(paths)]
    _write_text(path, "\n".join(lines) + "\n")
