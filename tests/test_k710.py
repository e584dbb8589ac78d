"""Kinetics-710 from generated K400/K600/K700 lists: merged class names, no validation video in training, one copy
of a repeated video, label maps back to each source; --eval_label_map scores a K710 model on K400's columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from datasets.prepare import kinetics_class_name, youtube_id
from datasets.prepare import main as prepare
from tasks.classify import SelectColumns, read_label_map
from util.errors import DataFileError

# class names as each release spells them: K600 writes underscores, K700 renamed "dying hair" (VideoMAE v2's merge)
CLASSES = {"k400": ["abseiling", "air drumming", "dying hair"],
           "k600": ["air_drumming", "abseiling", "dancing ballet"],
           "k700": ["dyeing hair", "abseiling", "\"zumba\""]}
# (video, label) per split; AAAAAAAAAAA is in K400 and K600 training (cut differently); BBBBBBBBBBB is a K400
# validation video that K700 trains on; CCCCCCCCCCC is in two validation lists
LISTS = {"k400": {"train": [("AAAAAAAAAAA_000010_000020.mp4", 0), ("DDDDDDDDDDD_000000_000010.mp4", 2)],
                  "val": [("BBBBBBBBBBB_000000_000010.mp4", 1), ("CCCCCCCCCCC_000001_000011.mp4", 0)]},
         "k600": {"train": [("AAAAAAAAAAA_000012_000022.mp4", 1), ("EEEEEEEEEEE_000000_000010.mp4", 2)],
                  "val": [("CCCCCCCCCCC_000001_000011.mp4", 1)]},
         "k700": {"train": [("BBBBBBBBBBB_000000_000010.mp4", 1), ("FFFFFFFFFFF_000000_000010.mp4", 0)],
                  "val": [("GGGGGGGGGGG_000000_000010.mp4", 2)]}}


def write_kinetics(root: Path) -> dict[str, Path]:
    """The three converted releases: DIR/{train,val}.csv (`videos/<file> label`) and classes.txt."""
    folders = {}
    for k, splits in LISTS.items():
        folders[k] = root / k
        folders[k].mkdir()
        (folders[k] / "classes.txt").write_text("".join(f"{n}\n" for n in CLASSES[k]))
        for split, rows in splits.items():
            (folders[k] / f"{split}.csv").write_text("".join(f"videos/{v} {label}\n" for v, label in rows))
    return folders


def read(path: Path) -> list[tuple[str, int]]:
    """(YouTube id, label) of a written list."""
    return [(youtube_id(line.split()[0]), int(line.split()[1])) for line in path.read_text().splitlines()]


def test_k710_merges_names_drops_validation_videos_from_training_and_keeps_one_copy(tmp_path: Path) -> None:
    f = write_kinetics(tmp_path)
    out = tmp_path / "k710"
    counts = prepare(["k710", "--k400", str(f["k400"]), "--k600", str(f["k600"]), "--k700", str(f["k700"]),
                      "--out", str(out)])
    names = (out / "classes.txt").read_text().splitlines()
    assert names == ["abseiling", "air drumming", "dyeing hair", "dancing ballet", "zumba"]
    assert read(out / "val.csv") == [("BBBBBBBBBBB", 1), ("CCCCCCCCCCC", 0), ("GGGGGGGGGGG", 4)]
    # AAAAAAAAAAA once (K400's copy), BBBBBBBBBBB gone (K400 validates on it); labels in K710's numbering
    assert read(out / "train.csv") == [("AAAAAAAAAAA", 0), ("DDDDDDDDDDD", 2), ("EEEEEEEEEEE", 3),
                                       ("FFFFFFFFFFF", 2)]
    assert counts == {"train": 4, "val": 3}
    assert json.loads((out / "k710_to_k400.json").read_text()) == [0, 1, 2]
    assert json.loads((out / "k710_to_k600.json").read_text()) == [1, 0, 3]
    assert json.loads((out / "k710_to_k700.json").read_text()) == [2, 0, 4]
    first = (out / "train.csv").read_text().split()[0]
    assert (out / first).resolve() == (f["k400"] / "videos" / LISTS["k400"]["train"][0][0]).resolve()


def test_k710_takes_a_class_order_and_refuses_one_that_does_not_match(tmp_path: Path) -> None:
    f = write_kinetics(tmp_path)
    order = tmp_path / "label_map_k710.txt"
    order.write_text("zumba\ndancing ballet\ndyeing hair\nair drumming\nabseiling\n")
    args = ["k710", "--k400", str(f["k400"]), "--k600", str(f["k600"]), "--k700", str(f["k700"]), "--out",
            str(tmp_path / "out"), "--classes", str(order)]
    prepare(args)
    assert json.loads((tmp_path / "out" / "k710_to_k400.json").read_text()) == [4, 3, 2]
    order.write_text("zumba\ndancing ballet\nair drumming\nabseiling\n")
    with pytest.raises(DataFileError, match="dyeing hair"):
        prepare(args)


def test_class_names_are_normalised_as_videomae_v2_merges_them() -> None:
    assert kinetics_class_name(" air_drumming ") == "air drumming"
    assert kinetics_class_name("dying hair") == kinetics_class_name("dyeing hair") == "dyeing hair"
    assert kinetics_class_name('"passing american football (not in game)"') == \
        "passing American football (not in game)"


def test_eval_label_map_scores_the_selected_columns(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.randn(3, 3, 2, 2)
    path = tmp_path / "map.json"
    path.write_text("[4, 3, 2]")
    picked = SelectColumns(model, read_label_map(str(path), 5))
    assert torch.equal(picked(x), model(x)[:, [4, 3, 2]])
    for bad in ("[4, 4, 2]", "[5, 0]", "{\"a\": 1}", "[1.5]", "not json"):
        path.write_text(bad)
        with pytest.raises(DataFileError, match="eval_label_map"):
            read_label_map(str(path), 5)
