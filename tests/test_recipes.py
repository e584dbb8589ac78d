"""The Kinetics-400 recipes against the published schedules: epochs counted once, warm-up, lr rule."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from main_finetune import get_args_parser as finetune_parser
from main_pretrain import get_args_parser as pretrain_parser
from util.config import parse_args
from util.lr_sched import effective_lr

ROOT = Path(__file__).resolve().parents[1]
MAE_RECIPES = sorted(p for p in (ROOT / "configs" / "pretrain").glob("vit_*_k400*.yaml") if "rho" not in p.name)
FINETUNE_RECIPES = sorted((ROOT / "configs" / "finetune").glob("vit_*_k400.yaml"))


def resolved(path: Path, parser=pretrain_parser) -> dict:
    """Every flag of a recipe as the main would see it."""
    return vars(parse_args(parser(), ["--config", str(path)]))


@pytest.mark.parametrize("path", MAE_RECIPES, ids=lambda p: p.name)
def test_pretrain_recipe_runs_the_papers_effective_epochs_and_warmup(path: Path) -> None:
    # The paper (and mae_st's FINETUNE.md, PySlowFast's MAX_EPOCH 200 x TRAIN_CROP_NUM_TEMPORAL 4) count
    # effective epochs: data passes x clips per video. 800 unless the name says 1600; warm-up 120 effective.
    a = resolved(path)
    wanted = 1600 if "1600ep" in path.name else 800
    assert a["repeat_aug"] == 4
    assert a["epochs"] * a["repeat_aug"] == wanted
    assert a["warmup_epochs"] * a["repeat_aug"] == 120
    # The file's own header states the same count.
    assert f"{wanted} effective epochs" in path.read_text().splitlines()[0]


@pytest.mark.parametrize("path", MAE_RECIPES, ids=lambda p: p.name)
def test_pretrain_recipe_lr_is_mae_st_pretrainings_at_128_videos(path: Path) -> None:
    # mae_st main_pretrain.py: lr = blr x batch_size x accum_iter x world / 256 = 1.6e-3 x 128 / 256 = 8e-4
    # on 64 GPUs x 2 videos; PySlowFast's ViT-L config gives 1e-4 x 8 shards = 8e-4 on 64 GPUs as well.
    a = resolved(path)
    assert a["lr_scale_by"] == "videos" and a["blr"] == pytest.approx(1.6e-3) and a["lr"] is None
    header = path.read_text()
    layout = re.search(r"layout: (\d+) nodes? x (\d+) GPUs", header)
    world = int(layout.group(1)) * int(layout.group(2))
    assert a["batch_size"] * world * a["accum_iter"] == 128
    lr = effective_lr(a["blr"], a["batch_size"], a["repeat_aug"], a["accum_iter"], world, a["lr_scale_by"])
    assert lr == pytest.approx(8e-4)


@pytest.mark.parametrize("path", FINETUNE_RECIPES, ids=lambda p: p.name)
def test_finetune_recipe_counts_clips_as_mae_st_finetuning(path: Path) -> None:
    a = resolved(path, finetune_parser)
    assert a["lr_scale_by"] == "clips" and a["batch_size"] * a["repeat_aug"] * 64 == 512  # 512 clips per step
    # ViT-B/L: 2.4e-3 x 512 / 256 (mae_st FINETUNE.md; ViT-B's PySlowFast file gives no lr). ViT-H: PySlowFast's
    # BASE_LR 3e-4 per node of BATCH_SIZE 16 clips = 4.8e-3 per 256, x 512 / 256.
    want = 9.6e-3 if "vit_h" in path.name else 4.8e-3
    assert effective_lr(a["blr"], a["batch_size"], a["repeat_aug"], a["accum_iter"], 64, "clips") == pytest.approx(want)


def test_lr_rule_both_conventions() -> None:
    # 64 ranks x 2 videos x 4 clips, no accumulation: 128 videos, 512 clips per step.
    assert effective_lr(1.6e-3, 2, 4, 1, 64, "videos") == pytest.approx(1.6e-3 * 128 / 256)
    assert effective_lr(1.6e-3, 2, 4, 1, 64, "clips") == pytest.approx(1.6e-3 * 512 / 256)
    # Accumulation counts in both; repeats only for clips.
    assert effective_lr(1e-3, 3, 2, 5, 7, "videos") == pytest.approx(1e-3 * 3 * 5 * 7 / 256)
    assert effective_lr(1e-3, 3, 2, 5, 7, "clips") == pytest.approx(1e-3 * 3 * 2 * 5 * 7 / 256)
    with pytest.raises(ValueError, match="clips' or 'videos"):
        effective_lr(1e-3, 1, 1, 1, 1, "samples")


@pytest.mark.parametrize("scale_by,units", [("videos", 2), ("clips", 6)])
def test_startup_line_names_both_epoch_counts_and_the_lr_rule(tmp_path: Path, scale_by: str, units: int) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "main_pretrain.py"), "--output_dir", str(out), "--synthetic_videos", "8",
           "--input_size", "32", "--num_frames", "4", "--pred_t_dim", "2", "--repeat_aug", "3", "--batch_size", "2",
           "--num_workers", "0", "--epochs", "5", "--warmup_epochs", "2", "--max_steps", "1", "--blr", "0.0256",
           "--lr_scale_by", scale_by, "--decoder_embed_dim", "32", "--decoder_depth", "1", "--save_every", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "5 epochs = data passes; x repeat_aug 3 = 15 effective epochs" in text
    assert "warm-up 2 (6 effective)" in text
    assert f"blr 0.0256 x {units} {scale_by} / 256 (--lr_scale_by {scale_by})" in text
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr_scale_by"] == scale_by and saved["lr"] == pytest.approx(0.0256 * units / 256)



TOKENS = {"cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class", "mask_token", "decoder_cls_token",
          "decoder_pos_embed_spatial", "decoder_pos_embed_temporal", "decoder_pos_embed_class"}


def _decay_by_name(wd_skip: str) -> dict[str, float]:
    import torch

    from models import create_model
    from util.config import OptimConfig
    from util.optim import build_optimizer, param_groups
    torch.manual_seed(0)
    mae = create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, decoder_embed_dim=64, decoder_depth=1)
    cfg = OptimConfig(weight_decay=0.05, wd_skip=wd_skip)
    opt = build_optimizer(mae, cfg, 1e-3, torch.device("cpu"))
    names = [n for g in param_groups(mae, 0.05, skip_tokens=wd_skip == "tokens") for n in g["names"]]
    decay = [g["weight_decay"] for g in opt.param_groups for _ in g["params"]]
    return dict(zip(names, decay, strict=True)), dict(mae.named_parameters())


def test_weight_decay_1d_decays_every_tensor_of_two_or_more_dims() -> None:
    # mae_st misc.add_weight_decay (no skip list): 1-D tensors and biases get 0, everything else decays;
    # PySlowFast with ZERO_WD_1D_PARAM True and ZERO_DECAY_POS_CLS False: the same split.
    decay, params = _decay_by_name("1d")
    assert decay.keys() == params.keys()
    for name, p in params.items():
        assert decay[name] == (0.05 if p.ndim >= 2 else 0.0), name
    assert all(decay[n] == 0.05 for n in TOKENS)  # positional tables, class and mask tokens decay


def test_weight_decay_tokens_also_skips_positional_tables_and_tokens() -> None:
    decay, params = _decay_by_name("tokens")
    for name, p in params.items():
        assert decay[name] == (0.0 if p.ndim < 2 or name in TOKENS else 0.05), name


def test_weight_decay_conventions_per_main_and_recipe() -> None:
    assert vars(parse_args(pretrain_parser(), []))["wd_skip"] == "1d"  # mae_st pretraining
    assert vars(parse_args(finetune_parser(), []))["wd_skip"] == "tokens"  # mae_st fine-tuning
    assert all(resolved(p)["wd_skip"] == "1d" for p in MAE_RECIPES)
    # ViT-L is mae_st's FINETUNE.md command; ViT-B/H are PySlowFast's FT configs (ZERO_DECAY_POS_CLS: False).
    assert {p.stem: resolved(p, finetune_parser)["wd_skip"] for p in FINETUNE_RECIPES} == {
        "vit_b_k400": "1d", "vit_l_k400": "tokens", "vit_h_k400": "1d"}


PYSLOWFAST_L = ROOT / "configs" / "pretrain" / "pyslowfast_vit_l_k400.yaml"


@pytest.mark.parametrize("path", MAE_RECIPES, ids=lambda p: p.name)
def test_mae_st_recipe_regresses_mae_st_target_frames(path: Path) -> None:
    # mae_st models_mae.py: torch.linspace(0, T - 1, pred_t_dim) frames, not every T / pred_t_dim-th.
    assert resolved(path)["target_frames"] == "linspace"


def test_pyslowfast_recipe_is_its_config_k400_vit_l_16x4_mae_pt() -> None:
    # Values of SlowFast configs/masked_ssl/k400_VIT_L_16x4_MAE_PT.yaml, written out by hand: MAX_EPOCH 200,
    # WARMUP_EPOCHS 30, TRAIN_CROP_NUM_TEMPORAL 4, TRAIN.BATCH_SIZE 32 per 8-GPU node, BASE_LR 1e-4 x NUM_SHARDS,
    # COSINE_END_LR 1e-6 x NUM_SHARDS, CLIP_GRAD_L2NORM 0.02, WEIGHT_DECAY 0.05, MASK_RATIO 0.9, DECODER 4 x 512.
    a, shards = resolved(PYSLOWFAST_L), 8
    assert (a["epochs"], a["warmup_epochs"], a["repeat_aug"], a["batch_size"] * 8) == (200, 30, 4, 32)
    lr = effective_lr(a["blr"], a["batch_size"], a["repeat_aug"], a["accum_iter"], 8 * shards, a["lr_scale_by"])
    assert lr == pytest.approx(1e-4 * shards) and a["min_lr"] == pytest.approx(1e-6 * shards)
    assert (a["clip_grad"], a["weight_decay"], a["wd_skip"], a["mask_ratio"]) == (0.02, 0.05, "1d", 0.9)
    assert (a["decoder_depth"], a["decoder_embed_dim"], a["decoder_num_heads"]) == (4, 512, 512 // 64)
    assert (a["target_frames"], a["decoder_cls"], a["decoder_sep_pos_embed"]) == ("stride", "encoder", False)


@pytest.mark.parametrize("path", FINETUNE_RECIPES, ids=lambda p: p.name)
def test_finetune_recipe_tests_mae_st_main_test_views(path: Path) -> None:
    # mae_st util/kinetics.py test_num_ensemble_views=10, test_num_spatial_crops=3; main_test.py meters 3 x 10.
    a = resolved(path, finetune_parser)
    assert (a["test_num_temporal_views"], a["test_num_spatial_crops"]) == (10, 3)
    assert vars(parse_args(finetune_parser(), []))["test_num_temporal_views"] == 10


def _docs_table() -> dict[str, list[str]]:
    """docs/recipes.md's 64-GPU table: recipe file name -> its row's cells (brace patterns expanded)."""
    text = (ROOT / "docs" / "recipes.md").read_text()
    section = text[text.index("## The 64-GPU setting"):text.index("## Fine-tuning and testing")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not line.startswith("| `"):
            continue
        for pattern in re.findall(r"`([^`]+\.yaml)`", cells[0]):
            head, _, rest = pattern.partition("{")
            options, _, tail = rest.partition("}")
            for option in options.split(",") if options else [""]:
                rows[head + option + tail] = cells
    return rows


def test_docs_64_gpu_table_has_every_k400_mae_recipe_with_its_counts_and_lr() -> None:
    rows = _docs_table()
    assert sorted(rows) == sorted(p.name for p in [*MAE_RECIPES, PYSLOWFAST_L])
    for name, (_, step, passes, warmup, lr_cell) in rows.items():
        a = resolved(ROOT / "configs" / "pretrain" / name)
        layout = re.search(r"layout: (\d+) nodes? x (\d+) GPUs", (ROOT / "configs" / "pretrain" / name).read_text())
        world = int(layout.group(1)) * int(layout.group(2))
        videos = a["batch_size"] * a["accum_iter"] * world
        assert step == f"{videos} / {videos * a['repeat_aug']}", name
        assert passes == f"{a['epochs']} ({a['epochs'] * a['repeat_aug']})", name
        assert warmup == f"{a['warmup_epochs']:g} ({a['warmup_epochs'] * a['repeat_aug']:g})", name
        stated = re.findall(r"= ([0-9.]+e-[0-9]+)", lr_cell)
        lr = effective_lr(a["blr"], a["batch_size"], a["repeat_aug"], a["accum_iter"], world, a["lr_scale_by"])
        assert float(stated[0] if stated else lr_cell.split()[0]) == pytest.approx(lr), name


def test_finetune_vit_l_recipe_is_mae_st_finetune_md_command() -> None:
    # mae_st FINETUNE.md:73, written out by hand: --epochs 50 --warmup_epochs 5 --repeat_aug 2 --blr 0.0024
    # --layer_decay 0.75 --drop_path_rate 0.2 --dropout 0.3 --clip_grad 5.0 --smoothing 0.1 --mixup 0.8
    # --cutmix 1.0 --mixup_prob 1.0. Its --epochs are data passes too (100 effective at 2 clips per video).
    a = resolved(ROOT / "configs" / "finetune" / "vit_l_k400.yaml", finetune_parser)
    assert (a["epochs"], a["warmup_epochs"], a["repeat_aug"]) == (50, 5, 2)
    assert a["blr"] == pytest.approx(2.4e-3) and a["lr_scale_by"] == "clips"
    assert (a["layer_decay"], a["drop_path_rate"], a["dropout"], a["clip_grad"]) == (0.75, 0.2, 0.3, 5.0)
    assert (a["smoothing"], a["mixup"], a["cutmix"], a["mixup_prob"]) == (0.1, 0.8, 1.0, 1.0)
