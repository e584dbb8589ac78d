"""Image MAE through the video code: the image-folder dataset, one-frame models, and the image demo
config training end to end (also with the adaptive sampler: its entropy is logged, its heat map drawn)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from datasets.image_folder import ImageFolderDataset, build_image_folder_dataset, generate_image_folder
from models import create_model
from util.visualize import MIN_SIDE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return Path(generate_image_folder(str(tmp_path_factory.mktemp("images")), images_per_class=4, size=40))


def test_items_match_the_video_item_dict_and_are_deterministic(image_folder: Path) -> None:
    ds = build_image_folder_dataset(str(image_folder), "train", crop_size=32, repeat_aug=2, mask_noise_tokens=16)
    assert len(ds) == 16 and ds.classes == sorted(ds.classes)
    item = ds[(0, 5)]
    assert item["clips"].shape == (2, 3, 1, 32, 32) and item["clips"].dtype == torch.float32
    assert item["noise"].shape == (2, 16) and item["label"].tolist() == [1, 1] and item["index"].tolist() == [5, 5]
    again = ImageFolderDataset(str(image_folder / "train"), crop_size=32, repeat_aug=2, mask_noise_tokens=16)[(0, 5)]
    assert torch.equal(item["clips"], again["clips"]) and torch.equal(item["noise"], again["noise"])
    other_epoch = ds[(1, 5)]
    assert not torch.equal(item["clips"], other_epoch["clips"]) and not torch.equal(item["noise"], other_epoch["noise"])
    assert not torch.equal(item["clips"][0], item["clips"][1])  # the repeats differ in crop


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(str(tmp_path))


@pytest.mark.parametrize("mask_type", ["random", "adaptive"])
def test_one_frame_models(mask_type: str) -> None:
    torch.manual_seed(0)
    model = create_model("mae_vit_micro_patch8", img_size=32, num_frames=1, t_patch_size=1, pred_t_dim=1,
                         depth=2, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, mask_type=mask_type)
    assert model.grid_size == (1, 4, 4)
    clips = torch.randn(2, 3, 1, 32, 32)
    loss, pred, mask = model(clips, 0.75, torch.rand(2, 16))
    loss.backward()
    assert pred.shape == (2, 16, 8 * 8 * 3) and torch.equal(mask.sum(1), torch.full((2,), 12.0))
    assert torch.allclose(model.unpatchify(model.patchify(clips)), clips)


def run_image_demo(out: Path, data: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "main_pretrain.py"), "--config", str(ROOT / "configs/pretrain/image_demo.yaml"),
           "--data_path", str(data), "--output_dir", str(out), "--epochs", "1", "--batch_size", "4",
           "--log_every", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_image_demo_config_trains(tmp_path: Path, image_folder: Path) -> None:
    records = [r for r in run_image_demo(tmp_path / "run", image_folder) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] for r in records)  # finite, not NaN
    height = Image.open(tmp_path / "run" / "vis" / "epoch-0000.png").height
    side = 32 * math.ceil(MIN_SIDE / 32)  # small frames are enlarged, pixel for pixel, in the grid
    assert height == 3 * (side + 1) + 1  # original / masked / reconstruction rows of one 32 px frame


def test_adaptive_logs_sampler_entropy_and_draws_the_heat_map(tmp_path: Path, image_folder: Path) -> None:
    records = [r for r in run_image_demo(tmp_path / "run", image_folder, "--mask_type", "adaptive",
                                         "--decoder_mask_ratio", "0.5") if "loss" in r]
    assert all("sampler_entropy" in r and "sampler_loss" in r for r in records)
    assert all(0 < r["sampler_entropy"] <= torch.log(torch.tensor(16.0)) + 1e-4 for r in records)
    height = Image.open(tmp_path / "run" / "vis" / "epoch-0000.png").height
    assert height == 4 * (32 * math.ceil(MIN_SIDE / 32) + 1) + 1  # plus the sampling-probability row
