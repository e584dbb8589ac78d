"""Fine-tuning: pretrain folder -> fine-tune -> --eval reproduces the accuracy; linear probe; 2-rank testing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from main_finetune import get_args_parser
from models import create_model
from models.vit import to_linear_probe
from tasks.classify import AugmentConfig, FinetuneConfig, build_loss
from tests.dist.common import make_backend
from tests.dist.dist_launch import torchrun
from util.checkpoint import save_checkpoint
from util.config import parse_args, section
from util.distributed import DistInfo
from util.evaluate import confusion_matrix, evaluate
from util.optim import param_groups

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--synthetic_videos", "24", "--input_size", "32", "--num_frames", "4", "--batch_size", "2",
        "--repeat_aug", "2", "--num_workers", "0", "--epochs", "1", "--log_every", "2", "--blr", "1e-2",
        "--test_num_temporal_views", "2", "--test_num_spatial_crops", "2"]


def run(out: Path, *extra: str) -> str:
    cmd = [sys.executable, str(ROOT / "main_finetune.py"), "--output_dir", str(out), *TINY, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def accuracy_line(output: str) -> str:
    return re.findall(r"\* Acc@1 \S+ Acc@5 \S+", output)[-1]


def pretraining_folder(out: Path) -> Path:
    """A checkpoint folder as main_pretrain.py leaves it (DDP backend, one rank), of a tiny MAE."""
    torch.manual_seed(0)
    mae = create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, decoder_embed_dim=64, decoder_depth=1)
    backend = make_backend(mae, DistInfo(0, 1, 0, torch.device("cpu"), True), clip_grad=0.0, lr=1e-3)
    save_checkpoint(backend, out, "step-1", {"epoch": 1, "step_in_epoch": 0, "global_step": 1})
    return out


def test_finetune_from_pretraining_folder_then_eval_reproduces_accuracy(tmp_path: Path) -> None:
    pre = pretraining_folder(tmp_path / "pre")
    out = tmp_path / "ft"
    # mixup + cutmix on, so the soft-target path runs end to end
    train_log = run(out, "--finetune", str(pre), "--mixup", "0.8", "--cutmix", "1.0")
    assert "mae_st weights" not in train_log and "ours weights: 2 missing (0 encoder)" in train_log
    final = json.loads((out / "eval_test.json").read_text())
    assert final["videos"] > 0 and final["views"] == 4 * final["videos"]
    assert (out / "confusion_test.png").stat().st_size > 0
    eval_log = run(out, "--eval")  # auto-resumes the latest checkpoint of `out`
    assert accuracy_line(eval_log) == accuracy_line(train_log)
    again = json.loads((out / "eval_test.json").read_text())
    assert (again["top1"], again["top5"]) == (final["top1"], final["top5"])


def test_linear_probe_trains_only_the_batchnorm_linear_head() -> None:
    model = to_linear_probe(create_model("vit_micro_patch8", img_size=32, num_frames=4, num_classes=3))
    bn, linear = model.head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.1.weight", "head.1.bias"]
    groups = param_groups(model, 0.0, layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == 2 and all(g["lr_scale"] == 1.0 for g in groups)
    out = model(torch.randn(4, 3, 4, 32, 32))
    out.sum().backward()
    assert out.shape == (4, 3) and model.blocks[0].attn.qkv.weight.grad is None


def test_mixup_targets_sum_to_one_and_losses_match_flags() -> None:
    args = parse_args(get_args_parser(), ["--num_classes", "5"], default_config=None)
    cfg, aug = section(FinetuneConfig, args), section(AugmentConfig, args)
    mix, criterion = build_loss(cfg, aug)
    clips, target = mix(torch.randn(4, 3, 4, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert clips.shape == (4, 3, 4, 8, 8) and torch.allclose(target.sum(1), torch.ones(4))
    assert type(criterion).__name__ == "SoftTargetCrossEntropy"
    aug.mixup = aug.cutmix = 0.0
    assert build_loss(cfg, aug)[0] is None and type(build_loss(cfg, aug)[1]).__name__ == "LabelSmoothingCrossEntropy"


def test_views_averaged_per_video_and_confusion_matrix() -> None:
    class Fixed(torch.nn.Module):
        def forward(self, clips: torch.Tensor) -> torch.Tensor:
            return clips[:, :, 0, 0, 0] * 10  # logits are the first voxel of each channel

    # Video 0 (label 0): views vote 0, 0, 2 -> 0. Video 1 (label 2): views vote 1, 2, 2 -> 2.
    votes = [(0, 0), (0, 0), (0, 2), (1, 1), (1, 2), (1, 2)]
    clips = torch.zeros(6, 3, 1, 1, 1)
    for i, (_, c) in enumerate(votes):
        clips[i, c] = 1.0
    batches = [{"clips": clips[i:i + 2], "index": torch.tensor([votes[i][0], votes[i + 1][0]]),
                "label": torch.tensor([2 * votes[i][0], 2 * votes[i + 1][0]])} for i in range(0, 6, 2)]
    res = evaluate(Fixed(), batches, 2, 3, torch.device("cpu"), expected_views=3)
    assert res["top1"] == 100.0 and res["videos"] == 2 and res["views_per_video"].tolist() == [3, 3]
    matrix = confusion_matrix(torch.tensor([0, 2, 1]), torch.tensor([0, 2, 2]), 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]


def test_views_that_failed_to_decode_are_not_scored_and_the_video_is_reported() -> None:
    """A broken test video is left out of the accuracy (never credited to another video) and counted."""
    class Fixed(torch.nn.Module):
        def forward(self, clips: torch.Tensor) -> torch.Tensor:
            return clips[:, :, 0, 0, 0] * 10

    clips = torch.zeros(4, 3, 1, 1, 1)
    clips[0, 0] = clips[1, 0] = 1.0  # video 0 (label 0): both views say 0
    batches = [{"clips": clips[:2], "index": torch.tensor([0, 0]), "label": torch.tensor([0, 0]),
                "valid": torch.tensor([True, True])},
               {"clips": clips[2:], "index": torch.tensor([1, 1]), "label": torch.tensor([2, 2]),
                "valid": torch.tensor([False, False])}]  # video 1 could not be decoded
    res = evaluate(Fixed(), batches, 2, 3, torch.device("cpu"), expected_views=2)
    assert res["top1"] == 100.0 and (res["videos"], res["videos_total"], res["videos_unscored"]) == (1, 2, 1)
    assert (res["views"], res["views_scored"]) == (4, 2)


def test_finetune_with_an_undecodable_test_video_finishes_and_writes_results(tmp_path: Path) -> None:
    """One broken file in the test list: training and the final test complete, the JSON says 1 unscored."""
    from datasets.synthetic import ensure_synthetic_dataset

    data = Path(ensure_synthetic_dataset(cache_dir=str(tmp_path / "cache"), num_videos=24, size=32))
    (data / "videos" / "broken.mp4").write_bytes(b"not a video" * 100)
    with open(data / "test.csv", "a") as f:
        f.write("videos/broken.mp4 3\n")
    out = tmp_path / "ft"
    log = run(out, "--data_path", str(data), "--mixup", "0", "--cutmix", "0")
    result = json.loads((out / "eval_test.json").read_text())
    n = len((data / "test.csv").read_text().splitlines())
    assert result["videos_total"] == n and result["videos_unscored"] == 1 and result["videos"] == n - 1
    assert "could not be decoded" in log


def test_two_rank_eval_counts_every_video_once(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    torchrun(2, "eval_worker.py", str(out), timeout=300)
    ranks = json.loads(out.read_text())
    for backend in ("plain", "ddp", "fsdp"):
        assert sorted(r[backend]["local_items"] for r in ranks) == [10, 11]  # 21 items, no padding
        for r in ranks:
            res = r[backend]
            assert res["videos"] == 7 and res["views"] == 21 and res["views_per_video"] == [3] * 7
            assert res["max_score_diff"] < 1e-6 and res["top1"] == res["ref_top1"]


def test_recipes_parse_and_build_their_models() -> None:
    # Layer decay as published: mae_st FINETUNE.md (ViT-L), PySlowFast k400_VIT_{B,H}_16x4_FT.yaml (0.65, 0.8).
    for name, decay in (("demo", 0.75), ("vit_b_k400", 0.65), ("vit_l_k400", 0.75), ("vit_h_k400", 0.8)):
        args = parse_args(get_args_parser(), [], default_config=str(ROOT / "configs" / "finetune" / f"{name}.yaml"))
        assert args.layer_decay == decay and args.num_classes in (8, 400)
        with torch.device("meta"):  # no memory for ViT-H
            model = create_model(args.model, num_classes=args.num_classes, img_size=args.input_size,
                                 num_frames=args.num_frames, drop_path_rate=args.drop_path_rate)
        assert model.patch_embed.grid_size[0] == args.num_frames // args.t_patch_size


def test_adamw_betas_follow_the_recipes_and_the_flag() -> None:
    """Fine-tuning defaults to MAE-ST's betas (0.9, 0.999), pretraining to MAE's (0.9, 0.95); the flag wins."""
    from main_pretrain import get_args_parser as pretrain_parser
    from util.config import run_config
    from util.distributed import init_distributed
    from util.parallel import setup_parallel

    info = init_distributed()
    for parser, argv, want in ((get_args_parser(), [], (0.9, 0.999)), (pretrain_parser(), [], (0.9, 0.95)),
                               (get_args_parser(), ["--opt_betas", "0.8", "0.99"], (0.8, 0.99))):
        cfg = run_config(parse_args(parser, ["--precision", "fp32", *argv], default_config=None))
        backend = setup_parallel(torch.nn.Linear(4, 2), cfg.parallel, cfg.optim, 1e-3, info)
        assert tuple(backend.optimizer.param_groups[0]["betas"]) == want
