"""MAE-ST fine-tuning (and linear probing) of a video ViT for action classification, with multi-view testing.

    python main_finetune.py                                          # CPU demo on generated video
    python main_finetune.py --finetune runs/demo                     # start from our pretraining run
    torchrun --nproc_per_node 8 main_finetune.py --config configs/finetune/vit_l_k400.yaml \
        --data_path K400 --finetune mae_pretrain_vit_large_k400.pth
    python main_finetune.py --config ... --eval --resume OUT/checkpoints/latest   # test a saved run

With no `--config`, `configs/finetune/demo.yaml` is used. `--finetune` accepts our checkpoint folders
and exports, the official MAE-ST / PySlowFast releases and VideoMAE files (`models/convert.py`).
Training runs in the engine shared with pretraining (`util/engine.py`); testing averages the
softmax of K temporal x S spatial views per video (`util/evaluate.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from datasets import (
    DistributedEvalSampler,
    FailureTracker,
    ResumableDistributedSampler,
    VideoMixup,
    build_video_dataset,
    collate_clips,
)
from datasets.loader import build_loader
from main_pretrain import resolve_data_path, tracked
from models import create_model
from models.convert import load_pretrained
from util.checkpoint import TrainingSaver, find_latest, finish_pending_save, load_checkpoint
from util.config import BOOL, add_common_args, parse_args, save_config
from util.distributed import cleanup, init_distributed, set_cpu_threads
from util.engine import TrainState, steps_in_epoch, train_one_epoch
from util.evaluate import confusion_matrix, evaluate, save_confusion_matrix
from util.logger import TrainLogger
from util.lr_sched import effective_lr
from util.parallel import setup_parallel
from util.preemption import PreemptionWatcher

DEMO_CONFIG = str(Path(__file__).resolve().parent / "configs" / "finetune" / "demo.yaml")
log = logging.getLogger("mae_st.finetune")


def get_args_parser() -> argparse.ArgumentParser:
    """Every fine-tuning flag (shared ones come from util.config; MAE-ST's defaults here)."""
    parser = argparse.ArgumentParser("MAE-ST fine-tuning", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    # MAE-ST fine-tuning defaults for the shared flags (ViT-L recipe of the official FINETUNE.md).
    parser.set_defaults(model="vit_large_patch16", epochs=50, warmup_epochs=5, blr=1e-3, min_lr=1e-6,
                        repeat_aug=2, clip_grad=5.0, save_every=0, opt_betas=[0.9, 0.999])
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--finetune", default="", help="weights to start from: file or checkpoint/output folder")
    g.add_argument("--num_classes", type=int, default=400)
    g.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay (1.0: off)")
    g.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth of the last block")
    g.add_argument("--dropout", type=float, default=0.5, help="dropout before the classifier")
    g.add_argument("--global_pool", action=BOOL, default=True, help="mean-pool patch tokens (else class token)")
    g.add_argument("--linprobe", action=BOOL, default=False,
                   help="freeze the encoder; train BatchNorm1d(affine=False) + linear head (as MAE)")
    g = parser.add_argument_group("augmentation")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixing a batch")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix over mixup")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--rand_aug", default="rand-m7-n2-mstd0.5-inc1", help="timm RandAugment config ('': off)")
    g.add_argument("--reprob", type=float, default=0.25, help="random-erasing probability")
    g.add_argument("--min_crop_scale", type=float, default=0.08, help="smallest random-resized-crop area share")
    g.add_argument("--hflip", action=BOOL, default=True, help="random horizontal flips (off for direction labels)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval", action=BOOL, default=False, help="only test the weights (--resume, latest or --finetune)")
    g.add_argument("--dist_eval", action=BOOL, default=True, help="shard test videos over ranks (else all on each)")
    g.add_argument("--eval_split", default="val", help="list file to test on (K400 reports on val)")
    g.add_argument("--eval_every", type=int, default=5, help="epochs between tests during training (0: end only)")
    g.add_argument("--test_num_temporal_views", type=int, default=7, help="clips per video along time")
    g.add_argument("--test_num_spatial_crops", type=int, default=3, help="crops per clip (1: center, 3: l/c/r)")
    return parser


def build_model(args: argparse.Namespace) -> nn.Module:
    """The plain single-device classifier named by --model."""
    return create_model(
        args.model, num_classes=args.num_classes, img_size=args.input_size, num_frames=args.num_frames,
        t_patch_size=args.t_patch_size, cls_embed=args.cls_embed, sep_pos_embed=args.sep_pos_embed,
        drop_path_rate=0.0 if args.linprobe else args.drop_path_rate, dropout=0.0 if args.linprobe else args.dropout,
        global_pool=args.global_pool,
    )


def to_linear_probe(model: nn.Module) -> nn.Module:
    """Freeze everything, then put a fresh BatchNorm1d(D, affine=False, eps=1e-6) + linear head on top."""
    for p in model.parameters():
        p.requires_grad = False
    head = nn.Linear(model.embed_dim, model.num_classes)
    nn.init.trunc_normal_(head.weight, std=0.01)  # MAE's linear-probe init
    nn.init.zeros_(head.bias)
    # The un-affine BatchNorm whitens features whose scale varies a lot between pretrained models.
    model.head = nn.Sequential(nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), head)
    return model


def build_loss(args: argparse.Namespace) -> tuple[VideoMixup | None, nn.Module]:
    """(mixup/cutmix or None, criterion): soft-target CE with mixing, else (smoothed) CE."""
    if args.mixup > 0 or args.cutmix > 0:
        mix = VideoMixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                         num_classes=args.num_classes)
        return mix, SoftTargetCrossEntropy()  # smoothing is already inside the mixed targets
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(args.smoothing)
    return None, nn.CrossEntropyLoss()


def build_test_loader(args: argparse.Namespace, data_path: str, dist) -> tuple[torch.utils.data.DataLoader, int]:
    """Loader over (video, view) items of --eval_split, and the number of videos."""
    dataset = build_video_dataset(
        data_path, args.eval_split, data_root=args.data_root or data_path, mode="test",
        num_frames=args.num_frames, sampling_rate=args.sampling_rate, crop_size=args.input_size,
        num_temporal_views=args.test_num_temporal_views, num_spatial_crops=args.test_num_spatial_crops,
        seed=args.seed, max_failure_rate=args.max_failure_rate,
    )
    # With --no-dist_eval every rank tests everything and only rank 0's scores count (see evaluate).
    sampler = DistributedEvalSampler(len(dataset), dist.world_size if args.dist_eval else 1,
                                     dist.rank if args.dist_eval else 0)
    loader = build_loader(dataset, sampler, args.batch_size * max(args.repeat_aug, 1), collate_clips, args.num_workers,
                          args.mp_context, args.prefetch_factor, pin_memory=args.pin_mem and dist.device.type == "cuda",
                          persistent_workers=False)
    return loader, len(dataset.samples)


def class_names(data_path: str, num_classes: int) -> list[str] | None:
    """Names from classes.txt beside the list files, when present and complete."""
    path = Path(data_path) / "classes.txt"
    names = path.read_text().split() if path.is_file() else []
    return names if len(names) == num_classes else None


def run_test(backend, loader, num_videos: int, args: argparse.Namespace, dist, out: Path, tag: str) -> dict:
    """Multi-view test; rank 0 logs top-1/top-5 and writes OUT/eval_<split>.json and a confusion matrix."""
    amp = (lambda: torch.autocast(dist.device.type, dtype=backend.dtype)) if backend.dtype else contextlib.nullcontext
    views = args.test_num_temporal_views * args.test_num_spatial_crops
    res = evaluate(backend.module, loader, num_videos, args.num_classes, dist.device, amp,
                   expected_views=views, sharded=args.dist_eval)
    metrics = {k: res[k] for k in ("top1", "top5", "videos", "views")}
    if dist.is_main:
        log.info("* Acc@1 %.3f Acc@5 %.3f (%s: %d videos x %d views)", res["top1"], res["top5"], args.eval_split,
                 res["videos"], views)
        matrix = confusion_matrix(res["scores"].argmax(1), res["labels"], args.num_classes)
        png = save_confusion_matrix(matrix, out / f"confusion_{args.eval_split}.png",
                                    class_names(args.data_path, args.num_classes),
                                    title=f"{tag}: top-1 {res['top1']:.1f}%")
        (out / f"eval_{args.eval_split}.json").write_text(json.dumps({**metrics, "tag": tag, "confusion": str(png)}))
    return metrics


def main(args: argparse.Namespace) -> dict:
    """Fine-tune (or only test with --eval); returns a summary with the final test metrics."""
    dist = init_distributed(need_group=args.dist != "ddp")
    set_cpu_threads(dist, args.num_workers)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    model = build_model(args)
    data_path = resolve_data_path(args, dist.is_main)
    args.data_path = args.data_path or data_path
    resume = args.resume or (find_latest(args.output_dir) if args.auto_resume else None)
    if args.finetune and not resume:
        # Before wrapping: FSDP and DeepSpeed shard the parameters that these writes fill.
        report = load_pretrained(model, args.finetune)
        if args.eval and any(k.startswith("head.") for k in report.missing + report.skipped):
            raise ValueError(f"--eval with --finetune {args.finetune}: the file has no {args.num_classes}-way head")
    if args.linprobe:
        to_linear_probe(model)
    if args.lr is None:
        args.lr = effective_lr(args.blr, args.batch_size, args.repeat_aug, args.accum_iter, dist.world_size)
    backend = setup_parallel(model, args, dist)
    state = TrainState()
    if resume:
        state.load_state_dict(load_checkpoint(backend, resume))
        log.info("resumed from %s at epoch %d, step %d of the epoch", resume, state.epoch, state.step_in_epoch)
    elif args.eval and not args.finetune:
        raise ValueError(f"--eval needs weights: --resume DIR, a checkpoint in {out}, or --finetune FILE")
    test_loader, num_test_videos = build_test_loader(args, data_path, dist)
    if args.eval:
        metrics = run_test(backend, test_loader, num_test_videos, args, dist, out, f"eval of {resume or args.finetune}")
        cleanup()
        return {"eval": metrics, "checkpoint": str(resume or args.finetune)}

    dataset = build_video_dataset(
        data_path, "train", data_root=args.data_root or data_path, mode="finetune", num_frames=args.num_frames,
        sampling_rate=args.sampling_rate, crop_size=args.input_size, repeat_aug=args.repeat_aug, seed=args.seed,
        short_side_range=None if args.input_size < 160 else (256, 320), rand_aug=args.rand_aug or None,
        reprob=args.reprob, hflip=args.hflip, scale=(args.min_crop_scale, 1.0), max_failure_rate=args.max_failure_rate,
    )
    sampler = ResumableDistributedSampler(len(dataset), dist.world_size, dist.rank, shuffle=True, seed=args.seed,
                                          batch_size=args.batch_size)
    loader = build_loader(dataset, sampler, args.batch_size, collate_clips, args.num_workers, args.mp_context,
                          args.prefetch_factor, pin_memory=args.pin_mem and dist.device.type == "cuda", drop_last=True)
    steps = steps_in_epoch(len(dataset), args.batch_size, dist.world_size, args.accum_iter)
    videos_per_step = args.batch_size * dist.world_size * args.accum_iter
    mixup, criterion = build_loss(args)
    if mixup is not None and (args.batch_size * args.repeat_aug) % 2:
        raise ValueError("mixup/cutmix pair clips within a batch: batch_size x repeat_aug must be even")
    if dist.is_main:
        save_config(args, out / "config.yaml", get_args_parser())
    total = args.epochs * steps
    logger = TrainLogger(str(out), enabled=dist.is_main, total_steps=min(total, args.max_steps or total))
    tracker = FailureTracker(args.max_failure_rate)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s%s: %.2fM trainable params, %d train videos, %d steps/epoch, %d clips/step, lr %.2e, %s on %d rank(s)",
             args.model, " (linear probe)" if args.linprobe else "", trainable / 1e6, len(dataset), steps,
             videos_per_step * args.repeat_aug, args.lr, args.dist, dist.world_size)
    save = TrainingSaver(backend, args, videos_per_step, last_step=state.global_step)

    def loss_fn(module: nn.Module, batch: dict) -> torch.Tensor:
        clips, target = batch["clips"], batch["label"]
        if mixup is not None:
            # timm's Mixup draws from numpy's global RNG: seed it from the per-step torch seed so a
            # resumed run mixes exactly as the uninterrupted one would have.
            np.random.seed(int(torch.randint(0, 2**31 - 1, (1,))))
            clips, target = mixup(clips, target)
        return criterion(module(clips), target)

    watcher = PreemptionWatcher(args.output_dir)  # SIGUSR2/SIGTERM -> all ranks stop at one step, save, requeue
    start = time.time()
    finished, metrics = True, {}
    while state.epoch < args.epochs and finished:
        sampler.set_epoch(state.epoch)
        sampler.set_consumed(state.step_in_epoch * videos_per_step)
        finished = train_one_epoch(backend, tracked(iter(loader), tracker), loss_fn, state, args, steps, logger,
                                   dist.device, rank=dist.rank, world_size=dist.world_size, save_fn=save,
                                   should_stop=watcher.should_stop)
        if finished:
            state.epoch += 1
            state.step_in_epoch = 0
            if args.eval_every and state.epoch % args.eval_every == 0 and state.epoch < args.epochs:
                metrics = run_test(backend, test_loader, num_test_videos, args, dist, out, f"epoch {state.epoch}")
                logger.scalars(state.global_step, metrics, prefix=f"{args.eval_split}/")
        save.save_if_new(state)
    if finished:
        metrics = run_test(backend, test_loader, num_test_videos, args, dist, out, f"final, step {state.global_step}")
        logger.scalars(state.global_step, metrics, prefix=f"{args.eval_split}/")
    finish_pending_save(wait=True)
    logger.close()
    watcher.finish()  # after a signal-stop: exits for requeue under submitit; returns otherwise
    summary = {"global_step": state.global_step, "epoch": state.epoch, "minutes": (time.time() - start) / 60,
               "output_dir": str(out), "checkpoint": str(find_latest(args.output_dir)), "eval": metrics}
    log.info("done: %s", summary)
    cleanup()
    return summary


if __name__ == "__main__":
    main(parse_args(get_args_parser(), sys.argv[1:], default_config=DEMO_CONFIG))
