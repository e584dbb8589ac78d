"""datasets.prepare on generated releases in the official layouts: SSv2 JSON + VP9 .webm, UCF101 / HMDB51 split
files + .avi."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from datasets import read_list_file
from datasets.prepare import main as prepare
from datasets.prepare import normalize_template
from datasets.synthetic import write_video
from util.errors import DataFileError, MissingFileError

TEMPLATES = {"Pushing something from left to right": "0", "Pushing something from right to left": "1",
             "Putting something on something": "2"}
BRACKETED = ["Pushing [something] from left to right", "Pushing [something] from right to left",
             "Putting [something] on [something]"]


def tiny_video(path: Path, seed: int, codec: str = "libvpx-vp9", frames: int = 10) -> None:
    """A short real video (random texture drifting right) at 12 fps, 32x48."""
    rng = np.random.default_rng(seed)
    base = (rng.random((32, 64, 3)) * 255).astype(np.uint8)
    write_video(str(path), np.stack([base[:, i:i + 48] for i in range(frames)]), fps=12, codec=codec)


def ssv2_release(root: Path, train: int = 4, val: int = 2) -> Path:
    """SSv2's official layout: the three JSON files beside 20bn-something-something-v2/<id>.webm."""
    videos = root / "20bn-something-something-v2"
    videos.mkdir(parents=True)
    (root / "something-something-v2-labels.json").write_text(json.dumps(TEMPLATES))
    entries = []
    for i in range(train + val):
        k = i % 3
        entries.append({"id": str(1000 + i), "template": BRACKETED[k], "label": BRACKETED[k].replace("[", "a ")
                        .replace("]", ""), "placeholders": ["a cup"] * BRACKETED[k].count("[")})
        tiny_video(videos / f"{1000 + i}.webm", i)
    (root / "something-something-v2-train.json").write_text(json.dumps(entries[:train]))
    (root / "something-something-v2-validation.json").write_text(json.dumps(entries[train:]))
    return root


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ssv2_release(tmp_path_factory.mktemp("ssv2"))


def test_template_brackets_are_removed() -> None:
    assert normalize_template("Putting [something] on [something]") == "Putting something on something"


def test_ssv2_lists_from_the_official_json(ssv2: Path, tmp_path: Path) -> None:
    out = tmp_path / "lists"
    assert prepare(["ssv2", "--root", str(ssv2), "--out", str(out)]) == {"train": 4, "val": 2}
    assert (out / "classes.txt").read_text().splitlines() == list(TEMPLATES)
    train = read_list_file(str(out / "train.csv"), str(out), num_classes=3)
    assert [(Path(p).resolve(), y) for p, y in train] == [
        ((ssv2 / "20bn-something-something-v2" / f"{1000 + i}.webm").resolve(), i % 3) for i in range(4)]
    val = read_list_file(str(out / "val.csv"), str(out))
    assert [Path(p).name for p, _ in val] == ["1004.webm", "1005.webm"] and [y for _, y in val] == [1, 2]
    assert not (out / "train.csv").read_text().startswith("/")  # relative to the list's folder


def test_ssv2_refusals_name_the_file_and_fix(ssv2: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ssv2.iterdir():
        (bad / f.name).symlink_to(f)
    train = json.loads((ssv2 / "something-something-v2-train.json").read_text())
    (bad / "something-something-v2-train.json").unlink()
    (bad / "something-something-v2-train.json").write_text(json.dumps(
        train + [{"id": "77", "template": "Spinning [something]", "label": "x", "placeholders": []}]))
    with pytest.raises(DataFileError, match=r"train\.json: entry 4 \(id 77\): template 'Spinning \[something\]'.*"
                                            r"labels\.json"):
        prepare(["ssv2", "--root", str(bad), "--out", str(tmp_path / "o")])
    (bad / "something-something-v2-train.json").write_text(json.dumps(
        train + [{"id": "77", "template": BRACKETED[0], "label": "x", "placeholders": []}]))
    with pytest.raises(DataFileError, match=r"1 of 7 videos .* missing.*77\.webm.*--allow_missing"):
        prepare(["ssv2", "--root", str(bad), "--out", str(tmp_path / "o")])
    counts = prepare(["ssv2", "--root", str(bad), "--out", str(tmp_path / "o"), "--allow_missing"])
    assert counts == {"train": 4, "val": 2}
    (bad / "something-something-v2-train.json").write_text('[{"id": "1", "template": ')
    with pytest.raises(DataFileError, match=r"train\.json: not a valid JSON file"):
        prepare(["ssv2", "--root", str(bad), "--out", str(tmp_path / "o")])
    (bad / "something-something-v2-labels.json").unlink()
    (bad / "something-something-v2-labels.json").write_text(json.dumps({**TEMPLATES, "Dropping something": "7"}))
    with pytest.raises(DataFileError, match=r"labels\.json: class indices must be 0 \.\. 3"):
        prepare(["ssv2", "--root", str(bad), "--out", str(tmp_path / "o")])
    (bad / "something-something-v2-labels.json").unlink()
    with pytest.raises(MissingFileError, match="something-something-v2-labels.json not found.*--root"):
        prepare(["ssv2", "--root", str(bad), "--out", str(tmp_path / "o")])


UCF_CLASSES = ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]


def ucf_release(tmp: Path) -> tuple[Path, Path]:
    """UCF-101/<Class>/v_<Class>_gXX_cYY.avi plus ucfTrainTestlist/ (classInd, trainlist0k, testlist0k)."""
    root, splits = tmp / "UCF-101", tmp / "ucfTrainTestlist"
    splits.mkdir(parents=True)
    (splits / "classInd.txt").write_text("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(UCF_CLASSES)))
    videos = {c: [f"{c}/v_{c.replace('stand', 'Stand')}_g0{g}_c01.avi" for g in range(1, 4)] for c in UCF_CLASSES}
    for c, files in videos.items():
        (root / c).mkdir(parents=True)
        for j, f in enumerate(files):
            tiny_video(root / f, j, codec="mpeg4", frames=4)
    for k in (1, 2, 3):  # split k tests on group k, trains on the others (as the official splits do)
        train = [f"{f} {i + 1}\r\n" for i, c in enumerate(UCF_CLASSES) for g, f in enumerate(videos[c], 1) if g != k]
        test = [f"{f}\r\n" for c in UCF_CLASSES for g, f in enumerate(videos[c], 1) if g == k]
        (splits / f"trainlist0{k}.txt").write_text("".join(train))
        (splits / f"testlist0{k}.txt").write_text("".join(test))
    return root, splits


def test_ucf101_three_splits(tmp_path: Path) -> None:
    root, splits = ucf_release(tmp_path)
    out = tmp_path / "lists"
    counts = prepare(["ucf101", "--root", str(root), "--splits", str(splits), "--out", str(out)])
    assert counts == {f"split{k}/{s}": n for k in (1, 2, 3) for s, n in (("train", 6), ("val", 3))}
    for k in (1, 2, 3):
        val = read_list_file(str(out / f"split{k}" / "val.csv"), str(out / f"split{k}"), num_classes=3)
        assert [(Path(p).name, y) for p, y in val] == [
            (f"v_{c.replace('stand', 'Stand')}_g0{k}_c01.avi", i) for i, c in enumerate(UCF_CLASSES)]
        assert all(os.path.isfile(p) for p, _ in val)
        assert (out / f"split{k}" / "classes.txt").read_text().splitlines() == UCF_CLASSES
    (splits / "trainlist02.txt").write_text("YoYo/v_YoYo_g01_c01.avi 1\n")  # YoYo is class 3
    with pytest.raises(DataFileError, match=r"trainlist02\.txt:1: index 1 disagrees with folder YoYo"):
        prepare(["ucf101", "--root", str(root), "--splits", str(splits), "--out", str(out)])
    (splits / "trainlist02.txt").unlink()
    with pytest.raises(MissingFileError, match=r"trainlist02\.txt not found: --splits"):
        prepare(["ucf101", "--root", str(root), "--splits", str(splits), "--out", str(out)])


HMDB_CLASSES = ["brush_hair", "cartwheel"]


def hmdb_release(tmp: Path) -> tuple[Path, Path]:
    """hmdb51/<class>/<video>.avi plus testTrainMulti_7030_splits/<class>_test_split<k>.txt (`video 0|1|2`)."""
    root, splits = tmp / "hmdb51", tmp / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for c in HMDB_CLASSES:
        (root / c).mkdir(parents=True)
        names = [f"Clip_{j}_{c}_f_nm_np1_fr_med_{j}.avi" for j in range(3)]
        for j, n in enumerate(names):
            tiny_video(root / c / n, j, codec="mpeg4", frames=4)
        for k in (1, 2, 3):  # video k-1 is the test video of split k; video 0 is unused in split 3
            use = ["2" if j == k - 1 else ("0" if (k, j) == (3, 0) else "1") for j in range(3)]
            (splits / f"{c}_test_split{k}.txt").write_text("".join(f"{n} {u} \n" for n, u in zip(names, use, strict=True)))
    return root, splits


def test_hmdb51_three_splits(tmp_path: Path) -> None:
    root, splits = hmdb_release(tmp_path)
    out = tmp_path / "lists"
    counts = prepare(["hmdb51", "--root", str(root), "--splits", str(splits), "--out", str(out)])
    assert counts == {"split1/train": 4, "split1/val": 2, "split2/train": 4, "split2/val": 2,
                      "split3/train": 2, "split3/val": 2}
    train3 = read_list_file(str(out / "split3" / "train.csv"), str(out / "split3"), num_classes=2)
    assert [(Path(p).name, y) for p, y in train3] == [
        ("Clip_1_brush_hair_f_nm_np1_fr_med_1.avi", 0), ("Clip_1_cartwheel_f_nm_np1_fr_med_1.avi", 1)]
    assert (out / "split1" / "classes.txt").read_text().splitlines() == HMDB_CLASSES
    (splits / "cartwheel_test_split2.txt").write_text("Clip_0_cartwheel_f_nm_np1_fr_med_0.avi 3\n")
    with pytest.raises(DataFileError, match=r"cartwheel_test_split2\.txt:1: expected 'video\.avi 0\|1\|2'"):
        prepare(["hmdb51", "--root", str(root), "--splits", str(splits), "--out", str(out)])
    counts = prepare(["hmdb51", "--root", str(root), "--splits", str(splits), "--out", str(out), "--split_ids", "1"])
    assert list(counts) == ["split1/train", "split1/val"]
