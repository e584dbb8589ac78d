"""The AVA file readers on official-format text, their refusals, and the generated AVA-format set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datasets.ava import (
    Annotation,
    Detection,
    frame_ap,
    group_person_boxes,
    proposals_by_keyframe,
    read_annotations,
    read_excluded,
    read_frame_list,
    read_label_map,
    read_proposals,
)
from datasets.ava.fixture import ACTIONS, write_ava_fixture
from util.errors import DataFileError, MissingFileError

LABEL_MAP_2019 = '''item {
  name: "bend/bow (at the waist)"
  id: 1
}
item {
  name: "crouch/kneel"
  id: 3
}
'''
LABEL_MAP_FULL = 'label {\n  name: "dance"\n  label_id: 4\n  label_type: PERSON_MOVEMENT\n}\n# a comment\n'


def write(tmp_path: Path, name: str, text: str) -> str:
    """Write `text` to tmp_path/name; its path."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_label_maps_of_both_official_forms(tmp_path: Path) -> None:
    assert read_label_map(write(tmp_path, "a.pbtxt", LABEL_MAP_2019)).names == {1: "bend/bow (at the waist)",
                                                                               3: "crouch/kneel"}
    assert read_label_map(write(tmp_path, "b.pbtxt", LABEL_MAP_FULL)).names == {4: "dance"}
    one_line = read_label_map(write(tmp_path, "c.pbtxt", 'item { name: "x" id: 7 } item { name: "y" id: 2 }'))
    assert one_line.ids == [7, 2] and len(one_line) == 2


@pytest.mark.parametrize("text, where, says", [
    ('item {\n  name: "a"\n}\n', ":1:", "no id"),
    ('item {\n  name: "a"\n  id: 1\n}\nitem {\n  name: "b"\n  id: 1\n}\n', ":5:", "appears twice"),
    ('item {\n  name: "a"\n  id: 0\n}\n', ":1:", "1-indexed"),
    ('item {\n  name: "a"\n  id: 1\n', ":1:", "not closed"),
    ('item {\n  name: "a"\n  id: 1\n}\nstray\n', ":5:", "unexpected"),
    ("", "", "no classes"),
])
def test_bad_label_maps_name_file_line_and_fix(tmp_path: Path, text: str, where: str, says: str) -> None:
    path = write(tmp_path, "bad.pbtxt", text)
    with pytest.raises(DataFileError, match=says) as info:
        read_label_map(path)
    assert f"{path}{where}" in str(info.value)


def test_annotations_group_the_actions_of_one_person_box(tmp_path: Path) -> None:
    path = write(tmp_path, "ava_val_v2.2.csv",
                 "vid-_a1,0902,0.1,0.2,0.5,0.9,12,0\n"
                 "vid-_a1,0902,0.1,0.2,0.5,0.9,80,0\n"
                 "vid-_a1,902,0.6,0.2,0.9,0.9,12,1\n"
                 "\n"
                 "vid-_a1,0903,0.1,0.2,0.5,0.9,14,0\n")
    rows = read_annotations(path)
    assert rows[0] == Annotation("vid-_a1", 902, (0.1, 0.2, 0.5, 0.9), 12, 0) and len(rows) == 4
    grouped = group_person_boxes(rows)
    assert [(b.actions, b.person_id) for b in grouped[("vid-_a1", 902)]] == [((12, 80), 0), ((12,), 1)]
    assert [b.actions for b in grouped[("vid-_a1", 903)]] == [(14,)]
    seven = read_annotations(write(tmp_path, "seven.csv", "v,0902,0.1,0.2,0.5,0.9,12\n"))
    assert seven[0].person_id is None


@pytest.mark.parametrize("line, says", [
    ("v,0902,0.1,0.2,0.5,0.9", "6 columns"),
    ("v,902.5,0.1,0.2,0.5,0.9,12,0", "whole number of seconds"),
    ("v,0902,0.1,0.2,0.5,x,12,0", "not a finite number"),
    ("v,0902,0.1,0.2,0.5,nan,12,0", "not a finite number"),
    ("v,0902,10,20,50,90,12,0", "not normalised"),
    ("v,0902,0.5,0.2,0.1,0.9,12,0", "x2 < x1"),
    ("v,0902,0.1,0.2,0.5,0.9,walk,0", "action_id 'walk'"),
    (",0902,0.1,0.2,0.5,0.9,12,0", "empty video_id"),
])
def test_bad_annotation_rows_name_file_and_line(tmp_path: Path, line: str, says: str) -> None:
    path = write(tmp_path, "ava_train_v2.2.csv", "v,0902,0.1,0.2,0.5,0.9,12,0\n" + line + "\n")
    with pytest.raises(DataFileError, match=says) as info:
        read_annotations(path)
    assert f"{path}:2:" in str(info.value)


def test_proposals_above_the_threshold_and_excluded_timestamps(tmp_path: Path) -> None:
    path = write(tmp_path, "ava_val_predicted_boxes.csv",
                 "v,0902,0.1,0.2,0.5,0.9,,0.95\n"
                 "v,0902,0.2,0.2,0.6,0.9,,0.8\n"
                 "v,0903,0.1,0.2,0.5,0.9,80,0.9\n")
    kept = read_proposals(path, score_threshold=0.9)  # PySlowFast keeps score >= threshold
    assert [(p.timestamp, p.score, p.action_id) for p in kept] == [(902, 0.95, None), (903, 0.9, 80)]
    assert len(read_proposals(path)) == 3
    assert list(proposals_by_keyframe(kept)) == [("v", 902), ("v", 903)]
    with pytest.raises(DataFileError, match="7 columns"):
        read_proposals(write(tmp_path, "p.csv", "v,0902,0.1,0.2,0.5,0.9,0.95\n"))
    assert read_excluded(write(tmp_path, "ex.csv", "v,0902\nw,1000\n")) == {("v", 902), ("w", 1000)}
    with pytest.raises(DataFileError, match=r"ex2\.csv:1: 3 columns"):
        read_excluded(write(tmp_path, "ex2.csv", "v,0902,1\n"))
    with pytest.raises(MissingFileError, match="does not exist"):
        read_excluded(str(tmp_path / "absent.csv"))


def test_generated_set_loads_with_the_readers_and_scores_its_own_truth(tmp_path: Path) -> None:
    fx = write_ava_fixture(str(tmp_path / "ava"), videos={"train": 1, "val": 1}, keyframes=4)
    labels = read_label_map(fx.path("val", "label_map"))
    assert labels.names == ACTIONS
    truth = read_annotations(fx.path("val", "annotations"))
    grouped = group_person_boxes(truth)
    assert set(grouped) == {(v, s) for v in fx.videos["val"] for s in fx.keyframes}
    for boxes in grouped.values():
        assert 2 <= len(boxes) <= 3
        for b in boxes:  # one of left / right / still, each box inside the frame and not empty
            assert len({1, 2, 3} & set(b.actions)) == 1 and 0 <= b.box[0] < b.box[2] <= 1
    # flicker (6) is annotated but not evaluated: in the files, absent from the label map and from the AP
    assert any(a.action_id == 6 for a in truth) and 6 not in labels.names
    excluded = read_excluded(fx.path("val", "excluded"))
    assert excluded == {(fx.videos["val"][0], fx.keyframes[-1])} and read_excluded(fx.path("train", "excluded")) == set()
    frames = read_frame_list(fx.path("val", "frame_list"), str(tmp_path / "ava" / "frames"))
    video = fx.videos["val"][0]
    assert len(frames[video]) == (fx.keyframes[-1] + 3 - 900) * fx.fps and Path(frames[video][0]).is_file()

    proposals = read_proposals(fx.path("val", "proposals"), score_threshold=0.7)
    # every person has a proposal near its box: ground truth + jitter, scored 0.7-1
    for (vid, ts), boxes in grouped.items():
        near = [p.box for p in proposals if (p.video_id, p.timestamp) == (vid, ts)]
        for b in boxes:
            assert max(_iou(b.box, p) for p in near) > 0.5
    # scoring the truth itself (each action of each box at score 1) gives AP 1 on every evaluated class present
    dets = [Detection(a.video_id, a.timestamp, a.box, a.action_id, 1.0) for a in truth]
    result = frame_ap(truth, dets, labels, excluded)
    assert all(v == 1.0 for v in result.ap.values() if not np.isnan(v)) and result.mean_ap == 1.0


def _iou(a: tuple, b: tuple) -> float:
    """IoU of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union
