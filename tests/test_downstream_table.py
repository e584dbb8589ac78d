"""benchmarks/downstream.py: the recipe file and its refusals, the runs it plans, the weights fingerprint, and a
tiny end-to-end table (SSv2 attentive probe, UCF101 linear probe over two splits) on generated
official-layout releases converted by datasets.prepare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import common, downstream
from datasets.prepare import main as prepare
from models import create_model
from tests.test_downstream_prepare import ssv2_release, ucf_release
from util.errors import ConfigError
from util.weights import weights_fingerprint

RECIPE = """
ssv2:
  recipe: configs/finetune/vit_b_ssv2.yaml
  data_path: {lists}/ssv2
  protocols: [finetune, attentive]
ucf101:
  recipe: configs/finetune/vit_b_ucf101.yaml
  data_path: {lists}/ucf101
  splits: [split1, split2]
  protocols: {{linear: [--test_num_temporal_views, 2]}}
  args: [--test_num_spatial_crops, "1"]
"""
TINY = ["--model", "vit_micro_patch8", "--num_classes", "3", "--input_size", "32", "--num_frames", "4",
        "--batch_size", "2", "--repeat_aug", "1", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0",
        "--precision", "fp32"]


def encoder_file(path: Path, seed: int = 0) -> Path:
    """A pretrained-encoder stand-in: a micro ViT's weights without a classifier, as {'model': state dict}."""
    torch.manual_seed(seed)
    model = create_model("vit_micro_patch8", num_classes=3, img_size=32, num_frames=4, cls_embed=True,
                         sep_pos_embed=True)
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}}, path)
    return path


def test_fingerprint_is_of_the_weights_not_the_file(tmp_path: Path) -> None:
    sd = torch.load(encoder_file(tmp_path / "a.pth"), weights_only=True)["model"]
    torch.save({"module": {f"module.{k}": v for k, v in reversed(sd.items())}}, tmp_path / "b.pth")  # DDP names
    assert weights_fingerprint(tmp_path / "a.pth") == weights_fingerprint(tmp_path / "b.pth")
    sd["cls_token"] = sd["cls_token"] + 1e-3
    torch.save(sd, tmp_path / "c.pth")
    assert weights_fingerprint(tmp_path / "c.pth") != weights_fingerprint(tmp_path / "a.pth")


def test_recipe_plans_one_run_per_dataset_protocol_and_split(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE.format(lists=tmp_path / "lists"))
    data = downstream.main(["--recipe", str(tmp_path / "r.yaml"), "--checkpoint", "enc.pth", "--output_dir",
                            str(tmp_path / "out"), "--dry_run", "--", "--epochs", "1"])
    runs = {(r["dataset"], r["protocol"], r["split"]): r for r in data["runs"]}
    assert list(runs) == [("ssv2", "finetune", ""), ("ssv2", "attentive", ""), ("ucf101", "linear", "split1"),
                          ("ucf101", "linear", "split2")]
    linear = runs["ucf101", "linear", "split2"]
    assert linear["out"] == str(tmp_path / "out" / "ucf101" / "linear" / "split2")
    args = linear["args"]
    assert args[args.index("--data_path") + 1] == str(tmp_path / "lists" / "ucf101" / "split2")
    assert args[args.index("--config") + 1] == str(common.ROOT / "configs/finetune/vit_b_ucf101.yaml")
    # protocol flag, then the dataset's flags, the protocol's, and those after `--` last (they win)
    assert args[args.index("--probe"):] == ["--probe", "linear", "--test_num_spatial_crops", "1",
                                             "--test_num_temporal_views", "2", "--epochs", "1"]
    assert "--probe" not in runs["ssv2", "finetune", ""]["args"]


def test_the_shipped_recipe_file_plans_its_runs(tmp_path: Path) -> None:
    data = downstream.main(["--recipe", str(common.ROOT / "configs/downstream/vit_b.yaml"), "--checkpoint", "enc.pth",
                            "--output_dir", str(tmp_path), "--dry_run"])
    assert [(r["dataset"], r["protocol"], r["split"]) for r in data["runs"]] == [
        ("ssv2", "finetune", ""), ("ssv2", "attentive", ""),
        *[(name, "finetune", f"split{k}") for name in ("ucf101", "hmdb51") for k in (1, 2, 3)]]


@pytest.mark.parametrize("text, match", [
    ("[a, b]", "expected a mapping"),
    ("ssv2: {recipe: configs/finetune/vit_b_ssv2.yaml}", "needs `recipe`"),
    ("ssv2: {recipe: configs/finetune/vit_b_ssv2.yaml, data_path: x, epochs: 3}", r"unknown keys \['epochs'\]"),
    ("ssv2: {recipe: configs/finetune/vit_b_ssv2.yaml, data_path: x, protocols: [knn]}", "protocols must be"),
    ("ssv2: {recipe: configs/finetune/nope.yaml, data_path: x}", "nope.yaml is not a file"),
    ("ssv2: {recipe: configs/finetune/vit_b_ssv2.yaml, data_path: x, args: --epochs 3}", "list of flags"),
    ("ssv2: {recipe: configs/finetune/vit_b_ssv2.yaml, data_path: x, splits: split1}", "splits must be"),
    ("ssv2: [", r"(Parser|Scanner)Error"),
])
def test_bad_recipe_files_are_refused_with_the_file_and_the_fix(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        downstream.read_recipe(tmp_path / "r.yaml")
    assert str(tmp_path / "r.yaml") in str(err.value)


def test_an_output_dir_of_other_weights_is_refused(tmp_path: Path) -> None:
    downstream.claim_output_dir(tmp_path, "a.pth", "0123")
    downstream.claim_output_dir(tmp_path, "a.pth", "0123")  # the same weights: its runs are reused
    with pytest.raises(ConfigError, match="holds the runs of other weights"):
        downstream.claim_output_dir(tmp_path, "b.pth", "4567")


@pytest.mark.slow  # end-to-end subprocess runs (3 x main_finetune.py, ~60 s on 2 idle cores): .ci/run's slow step runs it
def test_downstream_table_end_to_end_on_generated_releases(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    prepare(["ssv2", "--root", str(ssv2_release(tmp_path / "ssv2")), "--out", str(lists / "ssv2")])
    root, splits = ucf_release(tmp_path / "ucf")
    prepare(["ucf101", "--root", str(root), "--splits", str(splits), "--out", str(lists / "ucf101"),
             "--split_ids", "1,2"])
    # SSv2's fine-tuning protocol is left out for time (its commands are the dry-run test's)
    (tmp_path / "r.yaml").write_text(RECIPE.format(lists=lists).replace("[finetune, attentive]", "[attentive]"))
    argv = ["--recipe", str(tmp_path / "r.yaml"), "--checkpoint", str(encoder_file(tmp_path / "enc.pth")),
            "--output_dir", str(tmp_path / "out"), "--results", str(tmp_path / "results"), "--", *TINY]
    data = downstream.main(argv)
    assert data["weights_fingerprint"] == weights_fingerprint(tmp_path / "enc.pth")
    rows = {(r["dataset"], r["protocol"]): r for r in data["rows"]}
    assert list(rows) == [("ssv2", "attentive"), ("ucf101", "linear")]
    assert rows["ssv2", "attentive"]["views"] == "2 temporal x 3 spatial"  # the SSv2 recipe's test views
    assert rows["ucf101", "linear"]["views"] == "2 temporal x 1 spatial"  # the recipe file's overrides
    for row in rows.values():
        got = [json.loads((Path(run) / "eval_val.json").read_text()) for run in row["runs"]]
        assert [s["top1"] for s in row["splits"].values()] == [g["top1"] for g in got]
        assert row["top1"] == pytest.approx(sum(g["top1"] for g in got) / len(got))
        assert all(g["videos"] == g["videos_total"] > 0 for g in got)
    assert list(rows["ucf101", "linear"]["splits"]) == ["split1", "split2"]
    assert json.loads((tmp_path / "out" / "downstream.json").read_text()) == json.loads(json.dumps(data))
    [record] = (tmp_path / "results").iterdir()
    assert common.read_result_json(record) == json.loads(json.dumps(data))
    # a second command reuses every finished run (nothing is trained again) and writes the same table
    again = downstream.main(argv)
    assert again["rows"] == data["rows"] and again["minutes_run_now"] == 0
