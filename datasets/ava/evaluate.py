"""Frame-level AP at IoU 0.5 per class and its mean: the AVA metric, computed as the official evaluator does.

The official evaluator is ActivityNet's Evaluation/get_ava_performance.py with the TensorFlow object-detection
code under Evaluation/ava/ (PascalDetectionEvaluator; PySlowFast ships the same code in
slowfast/utils/ava_evaluation/). This module is our own code for the same numbers:

- reading: rows of classes outside the label map are dropped first; a keyframe's detections are then cut to
  the `max_detections_per_frame` (50 in get_ava_performance.py) best scores, kept with a min-heap of
  (score, action_id, y1, x1, y2, x2) tuples that a new row enters only with a score above the heap's lowest,
  and ordered by falling score (Python's stable sort over the heap's order), as its `read_csv` does; excluded
  keyframes are dropped from both ground truth and detections.
- per keyframe and class (per_image_evaluation.py): detections with x1 >= x2 or y1 >= y2 are removed; each
  remaining detection, in that order, takes the ground-truth box of highest IoU (the first on ties); it is a
  true positive if that IoU is >= 0.5 and the box was not taken yet, otherwise a false positive -- a
  detection never falls back to its second-best box, and a box matched twice gives one TP and one FP. AVA has
  no "difficult" or group-of boxes (the evaluator is given all-False flags), so none are ignored. A keyframe
  without ground truth makes all its detections false positives.
- per class (metrics.py): detections of all keyframes (in the order the keyframes first appear among the
  detections) are ranked by `argsort(scores)[::-1]` -- of tied scores the later one first; we use a stable
  argsort, which is what numpy's default sort gives on small arrays (on large ones its order among ties is
  unspecified) -- then precision = cumTP / rank and recall = cumTP / positives; AP is VOC's: precision padded
  with 0 at both ends (recall with 0 and 1), made non-increasing from the right by a running maximum, and
  summed over the points where recall changes as (r_i - r_(i-1)) * p_i. A class with positives and no
  detections has AP 0; a class without positives has AP NaN and is left out of the mean (`np.nanmean`).

PySlowFast's in-run evaluation (ava_eval_helper.py `evaluate_ava`) differs from the official script: it keeps
every detection (no cap) and matches a keyframe's detections in the order the model wrote them, not by score.
`max_detections_per_frame=None` gives the first; we always match in score order, as the official script.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np

from util.errors import InputError

from .files import Annotation, Detection, Key, LabelMap

IOU_THRESHOLD = 0.5
MAX_DETECTIONS_PER_FRAME = 50  # get_ava_performance.py: read_csv(detections, class_whitelist, 50)

_Entry = tuple[float, int, float, float, float, float]  # (score, action_id, y1, x1, y2, x2), the official tuple


@dataclass
class FrameAP:
    """Per-class AP (NaN: no positives), their mean over classes with positives, and the counts behind them."""

    ap: dict[int, float]
    mean_ap: float
    positives: dict[int, int]
    detections: dict[int, int]
    names: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-ready summary: mAP and one entry per class (AP null when the class has no positives)."""
        return {"mAP": None if math.isnan(self.mean_ap) else self.mean_ap,
                "classes": [{"id": c, "name": self.names.get(c, str(c)),
                             "AP": None if math.isnan(ap) else ap, "positives": self.positives[c],
                             "detections": self.detections[c]} for c, ap in self.ap.items()]}


def frame_order(entries: Iterable[_Entry], capacity: int | None) -> list[_Entry]:
    """A keyframe's (score, ...) tuples cut to the `capacity` best and sorted by falling score, as read_csv."""
    heap: list[_Entry] = []
    for e in entries:
        if not capacity or len(heap) < capacity:
            heapq.heappush(heap, e)
        elif e[0] > heap[0][0]:
            heapq.heapreplace(heap, e)
    return sorted(heap, key=lambda t: -t[0])


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of [N, 4] and [M, 4] boxes given as (y1, x1, y2, x2): [N, M]."""
    h = np.maximum(0.0, np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]))
    w = np.maximum(0.0, np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]))
    inter = h * w
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def match_frame(det_boxes: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """TP flags of one keyframe's detections of one class, taken in the given order (argmax match, no fallback)."""
    tp = np.zeros(len(det_boxes), dtype=bool)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return tp
    overlaps = iou(det_boxes, gt_boxes)
    best = np.argmax(overlaps, axis=1)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for i, g in enumerate(best):
        if overlaps[i, g] >= iou_threshold and not taken[g]:
            tp[i] = taken[g] = True
    return tp


def average_precision(scores: np.ndarray, tp: np.ndarray, positives: int) -> float:
    """VOC AP of ranked detections: NaN without positives, 0 without detections, else the interpolated area."""
    if positives == 0:
        return math.nan
    if int(tp.sum()) > positives:
        raise InputError(f"{int(tp.sum())} true positives for {positives} positives: a box matched twice")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(scores, kind="stable")[::-1]  # the official argsort()[::-1]: of ties, the later first
    hits = tp[order].astype(np.int64)
    cum_tp = np.cumsum(hits)
    cum_fp = np.cumsum(1 - hits)
    precision = np.concatenate([[0.0], cum_tp / (cum_tp + cum_fp), [0.0]])
    recall = np.concatenate([[0.0], cum_tp / positives, [1.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    changed = np.nonzero(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[changed] - recall[changed - 1]) * precision[changed]))


def _classes(label_map: LabelMap | Collection[int]) -> tuple[list[int], dict[int, str]]:
    """Evaluated class ids and names from a label map or a collection of ids."""
    if isinstance(label_map, LabelMap):
        return label_map.ids, dict(label_map.names)
    ids = sorted({int(c) for c in label_map})
    return ids, {}


def _boxes(entries: list[_Entry]) -> np.ndarray:
    """(y1, x1, y2, x2) rows of entries: [N, 4] float64."""
    return np.array([e[2:] for e in entries], dtype=np.float64).reshape(-1, 4)


def frame_ap(groundtruth: Iterable[Annotation], detections: Iterable[Detection],
             label_map: LabelMap | Collection[int], excluded: Collection[Key] = (),
             iou_threshold: float = IOU_THRESHOLD,
             max_detections_per_frame: int | None = MAX_DETECTIONS_PER_FRAME) -> FrameAP:
    """Frame-AP per evaluated class and mAP, as ActivityNet's get_ava_performance.py computes them."""
    classes, names = _classes(label_map)
    evaluated = set(classes)
    excluded = {(str(v), int(t)) for v, t in excluded}

    gt_rows: dict[Key, list[_Entry]] = {}
    for g in groundtruth:
        if g.action_id in evaluated:
            x1, y1, x2, y2 = g.box
            # the official read_csv takes an 8th column as the score: the person id orders a keyframe's boxes
            score = 1.0 if g.person_id is None else float(g.person_id)
            gt_rows.setdefault((g.video_id, int(g.timestamp)), []).append((score, g.action_id, y1, x1, y2, x2))
    gt: dict[Key, list[_Entry]] = {k: frame_order(v, None) for k, v in gt_rows.items() if k not in excluded}
    positives = dict.fromkeys(classes, 0)
    for entries in gt.values():
        for e in entries:
            positives[e[1]] += 1

    det_rows: dict[Key, list[_Entry]] = {}
    for d in detections:
        if d.action_id not in evaluated:
            continue
        if not math.isfinite(d.score):
            raise InputError(f"detection {d} has a score that is not finite")
        x1, y1, x2, y2 = d.box
        det_rows.setdefault((d.video_id, int(d.timestamp)), []).append((float(d.score), d.action_id, y1, x1, y2, x2))

    scores: dict[int, list[np.ndarray]] = {c: [] for c in classes}
    hits: dict[int, list[np.ndarray]] = {c: [] for c in classes}
    for key, rows in det_rows.items():
        if key in excluded:
            continue
        entries = [e for e in frame_order(rows, max_detections_per_frame) if e[2] < e[4] and e[3] < e[5]]
        truth = gt.get(key, [])
        for c in classes:
            mine = [e for e in entries if e[1] == c]
            if not mine:
                continue
            scores[c].append(np.array([e[0] for e in mine], dtype=np.float64))
            hits[c].append(match_frame(_boxes(mine), _boxes([e for e in truth if e[1] == c]), iou_threshold))

    ap = {}
    for c in classes:
        s = np.concatenate(scores[c]) if scores[c] else np.zeros(0)
        h = np.concatenate(hits[c]) if hits[c] else np.zeros(0, dtype=bool)
        ap[c] = average_precision(s, h, positives[c])
    valid = [v for v in ap.values() if not math.isnan(v)]
    mean_ap = float(np.mean(valid)) if valid else math.nan
    counts = {c: int(sum(len(s) for s in scores[c])) for c in classes}
    return FrameAP(ap, mean_ap, positives, counts, names)
