"""The downstream recipes (each parses, each value names its source) and a 2-step SSv2 fine-tuning run on lists
that datasets.prepare wrote from a generated official-layout release."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tasks
from datasets.prepare import main as prepare
from tests.test_downstream_prepare import ssv2_release
from util.config import parse_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ssv2_release(tmp_path_factory.mktemp("ssv2"))


RECIPES = {"vit_b_ssv2": dict(model="vit_base_patch16", num_classes=174, frame_sampling="segment", hflip=False,
                              epochs=30, blr=5e-4, lr_scale_by="videos", batch_size=6, repeat_aug=2, layer_decay=0.75,
                              drop_path_rate=0.1, dropout=0.0, test_num_temporal_views=2, test_num_spatial_crops=3,
                              rand_aug="rand-m7-n4-mstd0.5-inc1"),
           "vit_l_ssv2": dict(model="vit_large_patch16", num_classes=174, frame_sampling="segment", hflip=False,
                              epochs=20, blr=5e-4, batch_size=6, drop_path_rate=0.2, layer_decay=0.75,
                              test_num_temporal_views=2, test_num_spatial_crops=3),
           "vit_b_ucf101": dict(num_classes=101, frame_sampling="stride", hflip=True, epochs=100, blr=5e-4,
                                batch_size=16, layer_decay=0.7, drop_path_rate=0.2, dropout=0.5, min_lr=5e-6,
                                test_num_temporal_views=5, test_num_spatial_crops=3),
           "vit_b_hmdb51": dict(num_classes=51, frame_sampling="stride", sampling_rate=2, epochs=15, blr=5e-4,
                                batch_size=3, layer_decay=0.7, dropout=0.5, test_num_temporal_views=5),
           "vit_b_k710": dict(num_classes=710, frame_sampling="stride", sampling_rate=4, epochs=90, blr=7e-4,
                              min_lr=2e-6, batch_size=16, layer_decay=0.75, drop_path_rate=0.1, dropout=0.0,
                              test_num_temporal_views=5, test_num_spatial_crops=3)}
SOURCED = ("num_classes", "epochs", "warmup_epochs", "blr", "min_lr", "weight_decay", "layer_decay", "drop_path_rate",
           "dropout", "batch_size", "repeat_aug", "mixup", "cutmix", "smoothing", "rand_aug", "reprob", "hflip",
           "frame_sampling", "test_num_temporal_views", "test_num_spatial_crops")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_downstream_recipe_parses_and_names_its_sources(name: str) -> None:
    path = ROOT / "configs" / "finetune" / f"{name}.yaml"
    args = parse_args(tasks.finetune_parser(), ["--config", str(path)])
    assert {k: getattr(args, k) for k in RECIPES[name]} == RECIPES[name]
    keys = set(yaml.safe_load(path.read_text()))
    lines = {line.split(":")[0]: line for line in path.read_text().splitlines() if line and line[0].isalpha()}
    unsourced = [k for k in SOURCED if k in keys and not re.search(r"#.*\b[A-Z]\w*:\d+|#.*\.(py|sh|yaml):\d+",
                                                                      lines[k])]
    assert not unsourced, f"{name}: values without a file:line source: {unsourced}"
    assert set(SOURCED) <= keys, f"{name}: recipe does not set {set(SOURCED) - keys}"


# VideoMAE's from-scratch pretraining on the small sets (its data-efficiency claim): configs/pretrain/vit_b_<set>.yaml
PRETRAIN = {"vit_b_ssv2": dict(mask_type="tube", mask_ratio=0.9, epochs=2401, blr=1.5e-4, min_lr=8e-5, batch_size=32,
                               sampling_rate=5),
            "vit_b_ucf101": dict(mask_type="tube", mask_ratio=0.75, epochs=3201, blr=3e-4, min_lr=7.5e-6, batch_size=24,
                                 sampling_rate=5),
            "vit_b_hmdb51": dict(mask_type="tube", mask_ratio=0.75, epochs=4801, blr=3e-4, min_lr=7.5e-6, batch_size=24,
                                 sampling_rate=2)}
VIDEOMAE = dict(model="mae_vit_base_patch16", num_frames=16, t_patch_size=2, pred_t_dim=16, cls_embed=False,
                sep_pos_embed=False, decoder_embed_dim=384, decoder_num_heads=6, decoder_depth=4, repeat_aug=1,
                warmup_epochs=40, lr_scale_by="videos", weight_decay=0.05, wd_skip="tokens", opt_betas=[0.9, 0.95],
                clip_grad=0.0, norm_pix_loss=True)
PRETRAIN_SOURCED = ("mask_type", "mask_ratio", "epochs", "warmup_epochs", "blr", "min_lr", "batch_size", "sampling_rate",
                    "decoder_embed_dim", "decoder_depth", "opt_betas", "weight_decay", "clip_grad", "pred_t_dim")


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_small_set_pretraining_recipe_is_videomaes_and_names_its_sources(name: str) -> None:
    path = ROOT / "configs" / "pretrain" / f"{name}.yaml"
    args = parse_args(tasks.pretrain_parser(), ["--config", str(path)])
    want = {**VIDEOMAE, **PRETRAIN[name]}
    assert {k: getattr(args, k) for k in want} == want
    text = path.read_text()
    lines = {line.split(":")[0]: line for line in text.splitlines() if line and line[0].isalpha()}
    unsourced = [k for k in PRETRAIN_SOURCED if not re.search(r"#.*\b[A-Z]\w*:\d+|#.*\.(py|sh|yaml):\d+", lines[k])]
    assert not unsourced or name == "vit_b_hmdb51" and unsourced == ["epochs", "sampling_rate"], (name, unsourced)
    assert "Not expressible" in text and "unverified" in text if name == "vit_b_hmdb51" else "Not expressible" in text


@pytest.mark.slow  # end-to-end subprocess runs (10-60 s on 2 cores): .ci/run's slow step runs it
def test_ssv2_finetunes_two_steps_end_to_end(ssv2: Path, tmp_path: Path) -> None:
    lists, out = tmp_path / "lists", tmp_path / "run"
    prepare(["ssv2", "--root", str(ssv2), "--out", str(lists)])
    # the SSv2 recipe itself, at tiny sizes: 4 videos / batch 2 = 2 steps, then 2 x 3 test views of 2 videos
    cmd = [sys.executable, str(ROOT / "main_finetune.py"), "--config", str(ROOT / "configs/finetune/vit_b_ssv2.yaml"),
           "--data_path", str(lists), "--output_dir", str(out), "--model", "vit_micro_patch8", "--num_classes", "3",
           "--input_size", "32", "--num_frames", "4", "--batch_size", "2", "--repeat_aug", "1", "--num_workers", "0",
           "--epochs", "1", "--warmup_epochs", "0", "--precision", "fp32", "--log_every", "1",
           "--frame_sampling", "segment", "--no-hflip"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["frame_sampling"], config["hflip"], config["test_num_temporal_views"]) == ("segment", False, 2)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in log) == 2, log
    assert "val: 2 of 2 videos scored, 6 views each" in proc.stdout + proc.stderr  # SSv2's 2 x 3 test views
