"""Write the project's list files (`path label` per line) and `classes.txt` from official dataset releases.

    python -m datasets.prepare ssv2 --root SSV2 --out lists/ssv2
    python -m datasets.prepare ucf101 --root UCF-101 --splits ucfTrainTestlist --out lists/ucf101
    python -m datasets.prepare hmdb51 --root hmdb51 --splits testTrainMulti_7030_splits --out lists/hmdb51
    python -m datasets.prepare k710 --k400 lists/k400 --k600 lists/k600 --k700 lists/k700 --out lists/k710

ssv2 writes OUT/train.csv, OUT/val.csv (the official validation set: the test set has no labels) and
OUT/classes.txt; ucf101 and hmdb51 write one folder per official split, OUT/split{1,2,3}/{train,val}.csv
(val: the split's test list, on which the field reports) and classes.txt, so `--data_path OUT/split1`
fine-tunes on split 1. Video paths are written relative to the list's folder (the fine-tuning data
root by default), so the lists keep working when ROOT and OUT move together. What each release must
look like is in docs/downstream.md; anything else is refused with the file (and line) at fault.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from util.errors import DataFileError, MissingFileError

from .video_dataset import read_list_file

Samples = list[tuple[str, int]]  # (absolute video path, label)

# The official SSv2 annotation names; newer downloads unpack them as labels/{labels,train,validation}.json.
SSV2_FILES = {
    "labels": ("something-something-v2-labels.json", "labels.json"),
    "train": ("something-something-v2-train.json", "train.json"),
    "val": ("something-something-v2-validation.json", "validation.json"),
}
SSV2_VIDEO_DIRS = ("20bn-something-something-v2", "videos", ".")
SPLITS = (1, 2, 3)
HMDB_SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>[123])\.txt$")
HMDB_USE = {"1": "train", "2": "val"}  # 0: in neither set of that split


def normalize_template(template: str) -> str:
    """An SSv2 template as labels.json spells it: "Putting [something] on [something]" -> without brackets."""
    return template.replace("[", "").replace("]", "")


def _find(root: Path, names: Sequence[str], what: str) -> Path:
    """The first of `names` in `root` or `root/labels`; MissingFileError naming every place tried."""
    tried = [folder / name for name in names for folder in (root, root / "labels")]
    for path in tried:
        if path.is_file():
            return path
    raise MissingFileError(f"{what} not found (tried {', '.join(str(p) for p in tried)}): --root must be the folder "
                           f"holding the official release's annotations")


def read_json(path: Path) -> object:
    """Parsed JSON; a DataFileError naming the file and position if it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DataFileError(f"{path}: not a valid JSON file ({type(exc).__name__}: {str(exc)[:200]}); "
                            f"download it again") from None


def read_ssv2_labels(path: Path) -> dict[str, int]:
    """labels.json: template -> class index (written as a string), indices exactly 0 .. N-1."""
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise DataFileError(f"{path}: expected a JSON object mapping each template to its index, e.g. "
                            f'{{"Pushing something from left to right": "93"}}')
    labels = {}
    for template, index in data.items():
        if not isinstance(index, (str, int)) or not str(index).isdigit():
            raise DataFileError(f"{path}: template {template!r} maps to {index!r}, not a class index")
        labels[normalize_template(template)] = int(index)
    if sorted(labels.values()) != list(range(len(labels))):
        raise DataFileError(f"{path}: class indices must be 0 .. {len(labels) - 1}, each once (got "
                            f"{len(set(labels.values()))} distinct values from {min(labels.values())} to "
                            f"{max(labels.values())})")
    return labels


def ssv2_split(path: Path, labels: dict[str, int], labels_path: Path, video_dir: Path) -> Samples:
    """(video, label) of one SSv2 annotation file: a list of {"id", "template", ...} entries."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DataFileError(f"{path}: expected a JSON list of {{'id', 'template', 'label', 'placeholders'}} entries")
    samples, seen = [], set()
    for i, entry in enumerate(entries):
        missing = [k for k in ("id", "template") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise DataFileError(f"{path}: entry {i} has no {' or '.join(repr(k) for k in missing)} (the test set's "
                                f"file has no labels: only train and validation can be converted)")
        video_id = str(entry["id"])
        if not video_id or "/" in video_id or video_id in (".", ".."):
            raise DataFileError(f"{path}: entry {i}: id {video_id!r} is not a video file name")
        if video_id in seen:
            raise DataFileError(f"{path}: entry {i}: id {video_id} appears twice")
        seen.add(video_id)
        template = normalize_template(str(entry["template"]))
        if template not in labels:
            raise DataFileError(f"{path}: entry {i} (id {video_id}): template {entry['template']!r} is not in "
                                f"{labels_path}; use the labels file of the same release")
        samples.append((str(video_dir / f"{video_id}.webm"), labels[template]))
    if not samples:
        raise DataFileError(f"{path}: holds no videos")
    return samples


def ssv2_lists(root: Path, videos: str | None = None) -> tuple[dict[str, Samples], list[str]]:
    """The SSv2 train and validation samples of an official release at `root`, and the class names by index."""
    labels_path = _find(root, SSV2_FILES["labels"], "something-something-v2-labels.json")
    labels = read_ssv2_labels(labels_path)
    names = [t for t, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    if videos is not None:
        video_dir = root / videos
        if not video_dir.is_dir():
            raise MissingFileError(f"--videos {videos}: {video_dir} is not a folder")
    else:  # the archive unpacks to 20bn-something-something-v2/<id>.webm
        found = [root / d for d in SSV2_VIDEO_DIRS if (root / d).is_dir() and any((root / d).glob("*.webm"))]
        if not found:
            raise MissingFileError(f"no .webm videos in {', '.join(str(root / d) for d in SSV2_VIDEO_DIRS)}: unpack "
                                   f"the video archive there, or name its folder with --videos")
        video_dir = found[0]
    lists = {}
    for split in ("train", "val"):
        path = _find(root, SSV2_FILES[split], SSV2_FILES[split][0])
        lists[split] = ssv2_split(path, labels, labels_path, video_dir)
    return lists, names


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of a split file's non-blank lines (the official files end lines with CRLF)."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found: --splits must be the folder of the official split files")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not a UTF-8 text file ({exc.reason}); use the official split files") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def ucf101_lists(root: Path, splits_dir: Path, splits: Sequence[int] = SPLITS
                 ) -> tuple[dict[int, dict[str, Samples]], list[str]]:
    """Per official split, the UCF101 train and test samples (videos ROOT/<Class>/<file>.avi), and the class names.

    classInd.txt holds `index Class` (from 1); trainlist0k.txt `Class/file.avi index`; testlist0k.txt
    `Class/file.avi` (its class is the folder's).
    """
    ind = splits_dir / "classInd.txt"
    names = []
    for n, line in _lines(ind):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(names) + 1:
            raise DataFileError(f"{ind}:{n}: expected '{len(names) + 1} ClassName' (classes numbered from 1 in "
                                f"order), got {line[:100]!r}")
        names.append(parts[1])
    index = {name: i for i, name in enumerate(names)}
    by_case = {name.casefold(): i for i, name in enumerate(names)}
    out: dict[int, dict[str, Samples]] = {}
    for k in splits:
        out[k] = {}
        for split, stem in (("train", "trainlist"), ("val", "testlist")):
            path, samples = splits_dir / f"{stem}0{k}.txt", []
            for n, line in _lines(path):
                parts = line.split()
                rel, folder = parts[0], parts[0].split("/")[0]
                label = index.get(folder, by_case.get(folder.casefold()))
                if "/" not in rel or label is None or len(parts) > 2:
                    raise DataFileError(f"{path}:{n}: expected 'Class/video.avi{' index' if split == 'train' else ''}'"
                                        f" with a class of {ind}, got {line[:100]!r}")
                if len(parts) == 2 and parts[1] != str(label + 1):
                    raise DataFileError(f"{path}:{n}: index {parts[1]} disagrees with folder {folder} (class "
                                        f"{label + 1} in {ind})")
                samples.append((str(root / rel), label))
            if not samples:
                raise DataFileError(f"{path}: holds no videos")
            out[k][split] = samples
    return out, names


def hmdb51_lists(root: Path, splits_dir: Path, splits: Sequence[int] = SPLITS
                 ) -> tuple[dict[int, dict[str, Samples]], list[str]]:
    """Per official split, the HMDB51 train and test samples (videos ROOT/<class>/<file>.avi), and the class names.

    `<class>_test_split<k>.txt` holds `file.avi 1|2|0` (1 train, 2 test, 0 unused); classes are numbered in
    sorted order of their names.
    """
    if not splits_dir.is_dir():
        raise MissingFileError(f"--splits {splits_dir} is not a folder: unpack the official split archive there")
    files: dict[str, dict[int, Path]] = {}
    for path in splits_dir.iterdir():
        m = HMDB_SPLIT_FILE.match(path.name)
        if m:
            files.setdefault(m.group("cls"), {})[int(m.group("split"))] = path
    if not files:
        raise MissingFileError(f"no <class>_test_split<k>.txt files in {splits_dir}: --splits must be the folder of "
                               f"the official split files")
    names = sorted(files)
    out: dict[int, dict[str, Samples]] = {}
    for k in splits:
        out[k] = {"train": [], "val": []}
        for label, name in enumerate(names):
            path = files[name].get(k, splits_dir / f"{name}_test_split{k}.txt")
            for n, line in _lines(path):
                parts = line.split()
                if len(parts) != 2 or parts[1] not in ("0", "1", "2") or "/" in parts[0]:
                    raise DataFileError(f"{path}:{n}: expected 'video.avi 0|1|2' (1 train, 2 test, 0 unused), "
                                        f"got {line[:100]!r}")
                if parts[1] in HMDB_USE:
                    out[k][HMDB_USE[parts[1]]].append((str(root / name / parts[0]), label))
        for split, samples in out[k].items():
            if not samples:
                raise DataFileError(f"split {k} of {splits_dir} has no {split} video (no line marked "
                                    f"{'1' if split == 'train' else '2'})")
    return out, names


# VideoMAE v2 misc/k710_identical_label_merge.json (@29eab1e): one class under two names across Kinetics versions,
# the older name -> the name K710 keeps.
K710_MERGE = {
    "changing wheel": "changing wheel (not on bike)", "garbage collecting": "person collecting garbage",
    "balloon blowing": "inflating balloons", "tying tie": "tying necktie", "making bed": "making the bed",
    "opening bottle": "opening bottle (not wine)", "hugging": "hugging (not baby)", "dying hair": "dyeing hair",
    "throwing ball": "throwing ball (not baseball or American football)",
    "cooking sausages": "cooking sausages (not on barbeque)",
    "passing american football (not in game)": "passing American football (not in game)",
    "picking fruit": "picking apples", "skiing (not slalom or crosscountry)": "skiing mono",
    "drinking": "sipping cup", "sniffing": "smelling feet",
}
KINETICS = ("k400", "k600", "k700")
_YOUTUBE_CLIP = re.compile(r"^(?P<id>[\w-]{11})_\d+_\d+$")  # Kinetics file names: <youtube id>_<start>_<end>


def kinetics_class_name(name: str) -> str:
    """A Kinetics class name as K710 spells it: quotes and underscores gone, spaces single, VideoMAE v2's merges."""
    name = " ".join(name.strip().strip('"').replace("_", " ").split())
    return K710_MERGE.get(name, name)


def youtube_id(path: str) -> str:
    """The video a Kinetics file is cut from: `<id>_<start>_<end>.mp4` -> id (else the file name's stem)."""
    stem = Path(path).stem
    m = _YOUTUBE_CLIP.match(stem)
    return m.group("id") if m else stem


def read_kinetics_lists(folder: Path) -> tuple[dict[str, Samples], list[str]]:
    """train/val samples (absolute paths) and class names of a converted Kinetics folder (train.csv, val.csv,
    classes.txt as this tool and the K400 lists of MAE-ST/VideoMAE write them)."""
    names_path = folder / "classes.txt"
    if not names_path.is_file():
        raise MissingFileError(f"{names_path} not found: each of --k400/--k600/--k700 must hold train.csv, val.csv and "
                               f"classes.txt (one class name per line, line k = label k)")
    names = [n for n in names_path.read_text(encoding="utf-8").splitlines() if n.strip()]
    lists = {}
    for split in ("train", "val"):
        path = next((folder / f"{split}{ext}" for ext in (".csv", ".txt") if (folder / f"{split}{ext}").is_file()),
                    folder / f"{split}.csv")
        lists[split] = read_list_file(str(path), str(folder), num_classes=len(names))
    return lists, names


def k710_lists(folders: dict[str, Path], order: list[str] | None = None
               ) -> tuple[dict[str, Samples], list[str], dict[str, list[int]], dict[str, int]]:
    """K710 from K400/K600/K700 lists: (train/val samples, class names, the label map of each source, counts).

    Classes with the same name (after `kinetics_class_name`) are one class; numbered K400's first, then the new
    ones of K600, then K700's, each in its classes.txt order, unless `order` (e.g. VideoMAE v2's
    misc/label_map_k710.txt) gives them. A video (by YouTube id) is kept once, under its first source; the
    training list loses every video that is in any validation list.
    """
    sources = {k: read_kinetics_lists(folders[k]) for k in KINETICS}
    names: list[str] = []
    index: dict[str, int] = {}
    for _, src_names in sources.values():
        for n in src_names:
            key = kinetics_class_name(n).casefold()
            if key not in index:
                index[key] = len(names)
                names.append(kinetics_class_name(n))
    if order is not None:
        wanted = [kinetics_class_name(n) for n in order if n.strip()]
        if sorted(n.casefold() for n in wanted) != sorted(index):
            extra = sorted({n.casefold() for n in wanted} - set(index))[:5]
            lost = sorted(set(index) - {n.casefold() for n in wanted})[:5]
            raise DataFileError(f"--classes names {len(wanted)} classes, the lists {len(index)}: not in the lists "
                                f"{extra}, not in --classes {lost}")
        names = wanted
        index = {n.casefold(): i for i, n in enumerate(names)}
    maps = {k: [index[kinetics_class_name(n).casefold()] for n in src_names] for k, (_, src_names) in sources.items()}
    val_ids = {youtube_id(p) for lists, _ in sources.values() for p, _ in lists["val"]}
    out: dict[str, Samples] = {"train": [], "val": []}
    counts = {"duplicates": 0, "train_in_val": 0}
    for split in ("val", "train"):
        seen: set[str] = set()
        for k, (lists, _) in sources.items():
            for path, label in lists[split]:
                vid = youtube_id(path)
                if split == "train" and vid in val_ids:
                    counts["train_in_val"] += 1
                elif vid in seen:
                    counts["duplicates"] += 1
                else:
                    seen.add(vid)
                    out[split].append((path, maps[k][label]))
    return out, names, maps, counts


def drop_missing(lists: dict[str, Samples], source: str, allow_missing: bool) -> dict[str, Samples]:
    """The samples whose video exists; missing ones are an error naming examples, or dropped with `allow_missing`."""
    kept, missing, total = {}, [], 0
    for split, samples in lists.items():
        kept[split] = [s for s in samples if os.path.isfile(s[0])]
        missing += [s[0] for s in samples if not os.path.isfile(s[0])]
        total += len(samples)
    if missing and not allow_missing:
        raise DataFileError(f"{len(missing)} of {total} videos named by {source} are missing, e.g. {missing[:3]}: "
                            f"point --root at the unpacked videos (or pass --allow_missing to leave them out)")
    if missing:
        print(f"left out {len(missing)} of {total} videos that are missing, e.g. {missing[:3]}", file=sys.stderr)
    return kept


def write_lists(out: Path, lists: dict[str, Samples], names: list[str]) -> None:
    """`<split>.csv` (`path label`, paths relative to `out`) per split and `classes.txt` (one name per line)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, samples in lists.items():
        lines = [f"{os.path.relpath(path, out)} {label}\n" for path, label in samples]
        tmp = out / f".{split}.csv.tmp"
        tmp.write_text("".join(lines), encoding="utf-8")
        tmp.replace(out / f"{split}.csv")  # a reader never sees half a list
    (out / "classes.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")


def _split_ids(text: str) -> list[int]:
    """`1,2,3` -> [1, 2, 3] (argparse type)."""
    ids = [int(x) for x in text.split(",") if x.strip()]
    if not ids or any(k not in SPLITS for k in ids):
        raise argparse.ArgumentTypeError(f"splits are among {SPLITS}, got {text!r}")
    return ids


def get_parser() -> argparse.ArgumentParser:
    """The converter's flags: one sub-command per dataset."""
    parser = argparse.ArgumentParser("python -m datasets.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)
    p = sub.add_parser("k710", help="Kinetics-710 (VideoMAE v2) from converted K400, K600 and K700 lists")
    p.add_argument("--k400", required=True, type=Path, help="K400 folder: train.csv, val.csv, classes.txt")
    p.add_argument("--k600", required=True, type=Path, help="K600 folder: train.csv, val.csv, classes.txt")
    p.add_argument("--k700", required=True, type=Path, help="K700 folder: train.csv, val.csv, classes.txt")
    p.add_argument("--out", required=True, type=Path, help="folder for the K710 lists, classes.txt, k710_to_*.json")
    p.add_argument("--classes", type=Path, default=None, help="class order to use (one name per line, e.g. VideoMAE "
                   "v2's misc/label_map_k710.txt); default: K400's, then K600's new ones, then K700's")
    for name, what in (("ssv2", "Something-Something v2"), ("ucf101", "UCF101"), ("hmdb51", "HMDB51")):
        p = sub.add_parser(name, help=f"{what} from its official release")
        p.add_argument("--root", required=True, type=Path, help="the unpacked release" if name == "ssv2" else
                       "the unpacked videos: ROOT/<class>/<video>.avi")
        p.add_argument("--out", required=True, type=Path, help="folder for the list files and classes.txt")
        p.add_argument("--allow_missing", action="store_true", help="leave out listed videos that are not there")
        if name == "ssv2":
            p.add_argument("--videos", default=None, help="folder of the .webm files under ROOT (default: "
                           f"the first of {', '.join(SSV2_VIDEO_DIRS)} that holds .webm files)")
        else:
            p.add_argument("--splits", required=True, type=Path, help="folder of the official split files")
            p.add_argument("--split_ids", type=_split_ids, default=list(SPLITS), help="which splits, e.g. 1,2,3")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """Convert one release; returns the number of videos per written list (e.g. {"split1/train": 9537})."""
    a = get_parser().parse_args(argv)
    counts = {}
    if a.dataset == "k710":
        order = a.classes.read_text(encoding="utf-8").splitlines() if a.classes else None
        lists, names, maps, dropped = k710_lists({k: getattr(a, k) for k in KINETICS}, order)
        write_lists(a.out, lists, names)
        for k, columns in maps.items():  # column j of a K710 model's logits for class j of K400 (K600, K700)
            (a.out / f"k710_to_{k}.json").write_text(json.dumps(columns) + "\n", encoding="utf-8")
        counts = {split: len(s) for split, s in lists.items()}
        print(f"k710: left out {dropped['train_in_val']} training videos that are in a validation list and "
              f"{dropped['duplicates']} repeated videos", file=sys.stderr)
    elif a.dataset == "ssv2":
        lists, names = ssv2_lists(a.root, a.videos)
        lists = drop_missing(lists, f"the annotations in {a.root}", a.allow_missing)
        write_lists(a.out, lists, names)
        counts = {split: len(s) for split, s in lists.items()}
    else:
        convert = ucf101_lists if a.dataset == "ucf101" else hmdb51_lists
        per_split, names = convert(a.root, a.splits, a.split_ids)
        for k, lists in per_split.items():
            lists = drop_missing(lists, f"split {k} of {a.splits}", a.allow_missing)
            write_lists(a.out / f"split{k}", lists, names)
            counts.update({f"split{k}/{split}": len(s) for split, s in lists.items()})
    print(f"{a.dataset}: {len(names)} classes (--num_classes {len(names)}); "
          + ", ".join(f"{k}: {v}" for k, v in counts.items()) + f" videos; lists in {a.out}")
    return counts


if __name__ == "__main__":
    main()
