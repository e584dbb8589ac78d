"""Frame-AP@0.5 against hand-computed values (each expected AP is worked out in the test's comment)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from datasets.ava import (
    Annotation,
    Detection,
    LabelMap,
    average_precision,
    frame_ap,
    read_detections,
    write_detections,
)

FULL = (0.0, 0.0, 1.0, 1.0)


def gt(box: tuple, action: int = 1, video: str = "v", ts: int = 902, person: int | None = 0) -> Annotation:
    """A ground-truth row."""
    return Annotation(video, ts, box, action, person)


def det(box: tuple, score: float, action: int = 1, video: str = "v", ts: int = 902) -> Detection:
    """A detection row."""
    return Detection(video, ts, box, action, score)


def test_precision_is_made_monotone_before_integrating() -> None:
    # ranked TP, FP, TP, TP with 3 positives: precision 1, 1/2, 2/3, 3/4 at recall 1/3, 1/3, 2/3, 1.
    # Monotone from the right: 1, 3/4, 3/4, 3/4 -> AP = 1/3 * 1 + 1/3 * 3/4 + 1/3 * 3/4 = 5/6
    # (without the running maximum it would be 1/3 + 1/3 * 2/3 + 1/3 * 3/4 = 0.8056).
    ap = average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 1], bool), 3)
    assert ap == pytest.approx(5 / 6, abs=1e-12)


def test_recall_short_of_one_integrates_only_to_the_last_hit() -> None:
    # TP, FP with 4 positives: precision 1 up to recall 1/4, nothing after -> AP = 1/4
    assert average_precision(np.array([0.9, 0.1]), np.array([1, 0], bool), 4) == pytest.approx(0.25)
    assert average_precision(np.zeros(0), np.zeros(0, bool), 2) == 0.0  # positives, no detections
    assert math.isnan(average_precision(np.array([0.5]), np.array([0], bool), 0))  # no positives


def test_iou_exactly_half_matches_and_just_below_does_not() -> None:
    truth = [gt(FULL)]
    # intersection 0.5, union 1.0: IoU exactly 0.5 counts (>=), AP 1
    assert frame_ap(truth, [det((0.0, 0.0, 0.5, 1.0), 0.9)], [1]).ap[1] == 1.0
    assert frame_ap(truth, [det((0.0, 0.0, 0.5 + 1e-9, 1.0), 0.9)], [1]).ap[1] == 1.0
    assert frame_ap(truth, [det((0.0, 0.0, 0.5 - 1e-9, 1.0), 0.9)], [1]).ap[1] == 0.0


def test_duplicate_detections_at_one_location_count_once() -> None:
    # two persons; the first detected twice (0.9, 0.8), the second at 0.7: ranked TP, FP, TP, 2 positives.
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> monotone 1, 2/3, 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    left, right = (0.0, 0.0, 0.4, 1.0), (0.6, 0.0, 1.0, 1.0)
    truth = [gt(left, person=0), gt(right, person=1)]
    dets = [det(left, 0.9), det(left, 0.8), det(right, 0.7)]
    assert frame_ap(truth, dets, [1]).ap[1] == pytest.approx(5 / 6, abs=1e-12)
    assert frame_ap(truth, [dets[0], dets[2]], [1]).ap[1] == 1.0


def test_a_detection_takes_its_best_box_and_never_falls_back_to_the_second() -> None:
    # boxes A = x 0..0.6, B = x 0.2..0.8. Detection 1 = A (0.9): TP on A. Detection 2 = x 0.05..0.65 (0.8):
    # IoU with A 0.55/0.65 = 0.846, with B 0.45/0.75 = 0.6 >= 0.5, but its best box A is taken -> FP.
    # TP, FP with 2 positives -> AP = 1/2 (a matcher falling back to B would give 1).
    a, b = (0.0, 0.0, 0.6, 1.0), (0.2, 0.0, 0.8, 1.0)
    result = frame_ap([gt(a, person=0), gt(b, person=1)], [det(a, 0.9), det((0.05, 0.0, 0.65, 1.0), 0.8)], [1])
    assert result.ap[1] == pytest.approx(0.5)


def test_tied_scores_rank_the_later_detection_first() -> None:
    # one positive at keyframe 902 (detected, 0.5) and a false positive at 903 (also 0.5). The official
    # argsort(scores)[::-1] puts the later of tied detections first: FP then TP -> precision 0, 1/2 at recall
    # 0, 1 -> monotone 1/2 -> AP 1/2. Listing 903 first puts the TP first: AP 1.
    truth = [gt(FULL, ts=902)]
    hit, miss = det(FULL, 0.5, ts=902), det(FULL, 0.5, ts=903)
    assert frame_ap(truth, [hit, miss], [1]).ap[1] == pytest.approx(0.5)
    assert frame_ap(truth, [miss, hit], [1]).ap[1] == 1.0
    # ties of equal outcome do not depend on the order: two TPs at 0.5 of two positives
    two = [gt(FULL, ts=902), gt(FULL, ts=903)]
    assert frame_ap(two, [hit, det(FULL, 0.5, ts=903)], [1]).ap[1] == 1.0


def test_a_class_without_positives_is_nan_and_left_out_of_the_mean() -> None:
    # class 1: TP (AP 1); class 2: no positives, one detection (NaN); class 4: one positive, missed (AP 0)
    truth = [gt(FULL, action=1), gt(FULL, action=4)]
    dets = [det(FULL, 0.9, action=1), det(FULL, 0.9, action=2)]
    result = frame_ap(truth, dets, LabelMap({1: "a", 2: "b", 4: "d"}))
    assert result.ap[1] == 1.0 and math.isnan(result.ap[2]) and result.ap[4] == 0.0
    assert result.mean_ap == pytest.approx(0.5)
    summary = result.to_json()
    assert summary["mAP"] == pytest.approx(0.5) and summary["classes"][1] == {
        "id": 2, "name": "b", "AP": None, "positives": 0, "detections": 1}


def test_classes_outside_the_label_map_are_ignored() -> None:
    # action 3 is not evaluated: its ground truth is no positive and its detections are no FP of anything
    truth = [gt(FULL, action=1), gt(FULL, action=3)]
    result = frame_ap(truth, [det(FULL, 0.9, action=3), det(FULL, 0.8, action=1)], [1])
    assert list(result.ap) == [1] and result.ap[1] == 1.0 and result.positives == {1: 1}


def test_excluded_keyframes_leave_ground_truth_and_detections_out() -> None:
    # keyframe 903 holds a missed positive and a confident FP: included, ranked FP (0.95), TP (0.9) with 2
    # positives -> precision 0, 1/2 at recall 0, 1/2 -> AP 1/4; excluded, only 902 counts -> AP 1.
    truth = [gt(FULL, ts=902), gt((0.0, 0.0, 0.3, 0.3), ts=903)]
    dets = [det(FULL, 0.9, ts=902), det((0.5, 0.5, 1.0, 1.0), 0.95, ts=903)]
    assert frame_ap(truth, dets, [1]).ap[1] == pytest.approx(0.25)
    assert frame_ap(truth, dets, [1], excluded={("v", 903)}).ap[1] == 1.0


def test_detections_without_ground_truth_in_their_frame_are_false_positives() -> None:
    # FP 0.9 at another video, TP 0.8: precision 0, 1/2 at recall 0, 1 -> AP 1/2
    result = frame_ap([gt(FULL)], [det(FULL, 0.9, video="w"), det(FULL, 0.8)], [1])
    assert result.ap[1] == pytest.approx(0.5)


def test_at_most_fifty_detections_per_keyframe_and_invalid_boxes_dropped() -> None:
    # 50 confident detections of class 2 fill the keyframe's 50 places before class 1's hit (0.1) can enter
    truth = [gt(FULL, action=1)]
    dets = [det((0.0, 0.0, 0.5, 0.5), 0.9, action=2) for _ in range(50)] + [det(FULL, 0.1, action=1)]
    assert frame_ap(truth, dets, [1, 2]).ap[1] == 0.0
    assert frame_ap(truth, dets, [1, 2], max_detections_per_frame=None).ap[1] == 1.0
    # class 1's detection with x1 == x2 is removed (not an FP): the TP alone -> AP 1
    assert frame_ap(truth, [det((0.3, 0.0, 0.3, 1.0), 0.95), det(FULL, 0.5)], [1]).ap[1] == 1.0


def test_written_detections_round_trip_through_the_evaluator(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth, dets = [], []
    for ts in range(902, 910):
        for p in range(3):
            x, y = rng.uniform(0, 0.6, 2)
            box = (float(x), float(y), float(x + 0.3), float(y + 0.35))
            truth.append(gt(box, action=int(rng.integers(1, 4)), ts=ts, person=p))
            for a in (1, 2, 3):
                jitter = rng.normal(0, 0.03, 4)
                dets.append(det(tuple(float(v) for v in np.clip(np.add(box, jitter), 0, 1)), float(rng.random()),
                                action=a, ts=ts))
    path = tmp_path / "detections.csv"
    write_detections(str(path), dets)
    back = read_detections(str(path))
    assert back == dets  # shortest round-trip text: every float reads back to itself
    direct, via_file = frame_ap(truth, dets, [1, 2, 3]), frame_ap(truth, back, [1, 2, 3])
    assert direct.ap == via_file.ap and 0 < direct.mean_ap < 1
    first = path.read_text().splitlines()[0].split(",")
    assert first[0] == "v" and first[1] == "0902" and len(first) == 8
