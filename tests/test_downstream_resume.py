"""main_finetune.py on the new dataset kinds under 2-process DDP (gloo): SSv2 (VP9 .webm, segment sampling, the
SSv2 recipe's augmentation and mixup) and frame folders (VideoMAE v2 rawframe lists). SIGKILL after a mid-epoch
save, resume: the same per-step losses and test result as one uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datasets.prepare import main as prepare
from tests.test_downstream_prepare import ssv2_release
from tests.test_frame_folder import make_release
from tests.test_pretrain import env, free_port, kill_at_checkpoint
from tests.test_probe import logged

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "vit_micro_patch8", "--input_size", "32", "--num_frames", "4", "--batch_size", "2",
        "--repeat_aug", "1", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0", "--precision", "fp32",
        "--log_every", "1", "--save_every", "2", "--eval_every", "0", "--eval_split", "val"]


def ssv2_lists(tmp: Path) -> list[str]:
    """SSv2 lists converted from a generated release, train repeated to 16 videos: 4 steps of 2 ranks x 2."""
    lists = tmp / "lists"
    prepare(["ssv2", "--root", str(ssv2_release(tmp / "ssv2")), "--out", str(lists)])
    (lists / "train.csv").write_text((lists / "train.csv").read_text() * 4)
    return ["--config", str(ROOT / "configs/finetune/vit_b_ssv2.yaml"), "--data_path", str(lists),
            "--num_classes", "3"]  # the recipe: segment sampling, no flip, RandAugment, mixup/cutmix, 2 x 3 views


def frame_lists(tmp: Path) -> list[str]:
    """VideoMAE v2 rawframe lists over two generated frame folders, train 16 entries, val the two."""
    tmp.mkdir()
    make_release(tmp, 30)
    (tmp / "train.csv").write_text((tmp / "jpg.csv").read_text() * 8)
    (tmp / "val.csv").write_text((tmp / "jpg.csv").read_text())
    return ["--data_path", str(tmp), "--data_format", "frames", "--frame_fps", "30", "--num_classes", "2",
            "--test_num_temporal_views", "2", "--test_num_spatial_crops", "1"]


def command(out: Path, data: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(ROOT / "main_finetune.py"), "--output_dir", str(out), *data, *TINY]


@pytest.mark.slow  # 3 two-process runs each (~40 s per kind on 2 cores): .ci/run's slow step runs it
@pytest.mark.parametrize("kind", ["ssv2_webm", "frame_folders"])
def test_two_rank_ddp_finetune_resumes_exactly_after_sigkill(kind: str, tmp_path: Path) -> None:
    data = (ssv2_lists if kind == "ssv2_webm" else frame_lists)(tmp_path / "data")
    ref = tmp_path / "ref"
    proc = subprocess.run(command(ref, data), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = logged(ref)
    assert sorted(expected) == [1, 2, 3, 4]
    out = tmp_path / "killed"
    kill_at_checkpoint(command(out, data), out, 2)
    assert (out / "checkpoints" / "latest").resolve().name == "step-2"
    resumed = subprocess.run(command(out, data), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    got = logged(out)
    assert sorted(got) == sorted(expected)
    for step, rec in expected.items():
        assert abs(got[step]["loss"] - rec["loss"]) <= 1e-6 * max(1.0, abs(rec["loss"])), (step, got[step], rec)
    ref_test, got_test = (json.loads((d / "eval_val.json").read_text()) for d in (ref, out))
    assert (got_test["top1"], got_test["top5"], got_test["views"]) == (ref_test["top1"], ref_test["top5"],
                                                                      ref_test["views"])
    assert got_test["views"] == got_test["videos"] * (6 if kind == "ssv2_webm" else 2) > 0
