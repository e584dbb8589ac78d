"""MAE-ST pretraining: masked spacetime autoencoding of video clips.

    python main_pretrain.py                                   # CPU demo on generated video
    torchrun --nproc_per_node 8 main_pretrain.py --config configs/pretrain/vit_l_k400.yaml --data_path DIR

With no `--config`, `configs/pretrain/demo.yaml` is used. The loop itself lives in `util/engine.py`
(shared with fine-tuning); parallelism is applied from outside the model by `util/parallel.py`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from datasets import (
    FailureTracker,
    ResumableDistributedSampler,
    build_video_dataset,
    collate_clips,
    ensure_synthetic_dataset,
)
from datasets.image_folder import build_image_folder_dataset, ensure_synthetic_image_folder
from datasets.loader import build_loader as make_loader
from datasets.loader import decode_threads_for
from models import create_model
from models.masking import MASK_TYPES
from util.checkpoint import TrainingSaver, find_latest, finish_pending_save, load_checkpoint
from util.config import BOOL, add_common_args, parse_args, save_config
from util.distributed import DistInfo, barrier, cleanup, init_distributed, set_cpu_threads
from util.engine import TrainState, steps_in_epoch, to_device, train_one_epoch
from util.flops import device_peak_flops, mae_flops_per_clip
from util.logger import TrainLogger
from util.lr_sched import effective_lr
from util.parallel import setup_parallel
from util.preemption import PreemptionWatcher
from util.visualize import save_reconstruction

DEMO_CONFIG = str(Path(__file__).resolve().parent / "configs" / "pretrain" / "demo.yaml")
log = logging.getLogger("mae_st.pretrain")


def get_args_parser() -> argparse.ArgumentParser:
    """Every pretraining flag (shared ones come from util.config)."""
    parser = argparse.ArgumentParser("MAE-ST pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    g = parser.add_argument_group("masked autoencoder")
    g.add_argument("--mask_ratio", type=float, default=0.9, help="share of tokens hidden from the encoder")
    g.add_argument("--mask_type", default="random", choices=sorted(MASK_TYPES),
                   help="mask sampler; adaptive: AdaMAE's learned sampler (models/adamae.py)")
    g.add_argument("--sampler_loss_weight", type=float, default=1e-4, help="weight of the adaptive sampler's loss")
    g.add_argument("--decoder_mask_ratio", type=float, default=0.0,
                   help="share of hidden tokens the decoder skips (running cell; 0: off, 0.5 recommended)")
    g.add_argument("--data_format", default="video", choices=["video", "image_folder"],
                   help="video list files, or a folder of class subfolders of images (image MAE, num_frames 1)")
    g.add_argument("--norm_pix_loss", action=BOOL, default=True, help="regress per-patch normalised pixels")
    g.add_argument("--pred_t_dim", type=int, default=8, help="frames the decoder predicts (every T/pred_t_dim-th)")
    g.add_argument("--trunc_init", action=BOOL, default=False, help="trunc-normal instead of xavier init")
    g.add_argument("--decoder_embed_dim", type=int, default=512)
    g.add_argument("--decoder_depth", type=int, default=4)
    g.add_argument("--decoder_num_heads", type=int, default=16)
    g.add_argument("--vis_every", type=int, default=1, help="epochs between reconstruction images (0: off)")
    return parser


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The plain single-device MAE named by --model with the clip and decoder flags."""
    return create_model(
        args.model,
        img_size=args.input_size,
        num_frames=args.num_frames,
        t_patch_size=args.t_patch_size,
        pred_t_dim=args.pred_t_dim,
        mask_type=args.mask_type,
        sampler_loss_weight=args.sampler_loss_weight,
        decoder_mask_ratio=args.decoder_mask_ratio,
        norm_pix_loss=args.norm_pix_loss,
        cls_embed=args.cls_embed,
        sep_pos_embed=args.sep_pos_embed,
        trunc_init=args.trunc_init,
        decoder_embed_dim=args.decoder_embed_dim,
        decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads,
    )


def resolve_data_path(args: argparse.Namespace, is_main: bool) -> str:
    """--data_path, or generated motion videos (made once by rank 0, cached) when it is empty."""
    if args.data_path:
        return args.data_path
    if getattr(args, "data_format", "video") == "image_folder":  # fine-tuning has no such flag
        if is_main:
            ensure_synthetic_image_folder(size=args.synthetic_size)
        barrier()
        return ensure_synthetic_image_folder(size=args.synthetic_size)
    kw = dict(num_videos=args.synthetic_videos, size=args.synthetic_size, seed=0)
    if is_main:
        ensure_synthetic_dataset(**kw)
    barrier()
    return ensure_synthetic_dataset(**kw)


def tracked(batches: Iterator[dict], tracker: FailureTracker) -> Iterator[dict]:
    """Count undecodable videos as batches arrive and stop when too many fail."""
    for batch in batches:
        tracker.update_from_batch(batch)
        tracker.check()
        yield batch


def build_dataset(
    args: argparse.Namespace, data_path: str, num_tokens: int, normalize: bool = True
) -> torch.utils.data.Dataset:
    """The training set (videos or an image folder) with per-sample mask noise for `num_tokens` tokens."""
    if args.data_format == "image_folder":
        return build_image_folder_dataset(data_path, "train", crop_size=args.input_size, repeat_aug=args.repeat_aug,
                                          seed=args.seed, mask_noise_tokens=num_tokens)
    return build_video_dataset(
        data_path, "train", data_root=args.data_root or data_path, mode="pretrain",
        num_frames=args.num_frames, sampling_rate=args.sampling_rate, crop_size=args.input_size,
        repeat_aug=args.repeat_aug, seed=args.seed, mask_noise_tokens=num_tokens, normalize=normalize,
        short_side_range=None if args.input_size < 160 else (256, 320),
        max_failure_rate=args.max_failure_rate,
    )


def build_loader(
    args: argparse.Namespace, dataset: torch.utils.data.Dataset, dist: DistInfo
) -> tuple[ResumableDistributedSampler, torch.utils.data.DataLoader]:
    """Resumable sampler + DataLoader: persistent workers, prefetching, pinned memory on GPU."""
    sampler = ResumableDistributedSampler(
        len(dataset), dist.world_size, dist.rank, shuffle=True, seed=args.seed, batch_size=args.batch_size
    )
    if hasattr(dataset, "decode_threads"):
        dataset.decode_threads = decode_threads_for(args.num_workers, args.decode_threads,
                                                    int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    loader = make_loader(dataset, sampler, args.batch_size, collate_clips, args.num_workers, args.mp_context,
                          args.prefetch_factor, pin_memory=args.pin_mem and dist.device.type == "cuda", drop_last=True)
    return sampler, loader


def main(args: argparse.Namespace) -> dict:
    """Pretrain; returns a summary (final step, last loss, output paths)."""
    dist = init_distributed(need_group=args.dist != "ddp")
    set_cpu_threads(dist, args.num_workers)
    watcher = PreemptionWatcher(args.output_dir)  # SIGUSR2/SIGTERM -> all ranks stop at one step, save, requeue
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    model = build_model(args)
    num_tokens = model.patch_embed.num_patches
    data_path = resolve_data_path(args, dist.is_main)
    # On a GPU the loader ships uint8 clips and the engine normalises them on the device.
    dataset = build_dataset(args, data_path, num_tokens, normalize=dist.device.type != "cuda")
    if args.lr is None:
        args.lr = effective_lr(args.blr, args.batch_size, args.repeat_aug, args.accum_iter, dist.world_size)
    backend = setup_parallel(model, args, dist)
    sampler, loader = build_loader(args, dataset, dist)
    steps = steps_in_epoch(len(dataset), args.batch_size, dist.world_size, args.accum_iter)
    videos_per_step = args.batch_size * dist.world_size * args.accum_iter

    state = TrainState()
    resume = args.resume or (find_latest(args.output_dir) if args.auto_resume else None)
    if resume:
        trainer_state = load_checkpoint(backend, resume)
        state.load_state_dict(trainer_state)
        log.info("resumed from %s at epoch %d, step %d of the epoch", resume, state.epoch, state.step_in_epoch)
    if dist.is_main:
        save_config(args, out / "config.yaml", get_args_parser())
    logger = TrainLogger(str(out), enabled=dist.is_main, total_steps=min(
        args.epochs * steps, args.max_steps or args.epochs * steps))
    tracker = FailureTracker(args.max_failure_rate)
    flops = mae_flops_per_clip(model, args.mask_ratio)["train_step"]
    peak, peak_source = device_peak_flops(dist.device, args.precision)
    log.info(
        "%s: %.1fM params, %d train videos, %d steps/epoch, %d clips/step, lr %.2e, %s on %d rank(s); "
        "%.1f GFLOP per clip (fwd+bwd), MFU against %.1f TFLOP/s (%s)",
        args.model, sum(p.numel() for p in model.parameters()) / 1e6, len(dataset), steps,
        videos_per_step * args.repeat_aug, args.lr, args.dist, dist.world_size, flops / 1e9, peak / 1e12, peak_source,
    )
    vis_item = dataset[(0, 0)]  # a fixed clip and mask for the reconstruction images
    vis = to_device({"clips": vis_item["clips"][:1], "noise": vis_item["noise"][:1]}, dist.device)
    vis_clips, vis_noise = vis["clips"], vis["noise"]
    save = TrainingSaver(backend, args, videos_per_step, last_step=state.global_step)

    def loss_fn(module: torch.nn.Module, batch: dict) -> torch.Tensor | tuple[torch.Tensor, dict]:
        loss = module(batch["clips"], args.mask_ratio, batch["noise"])[0]
        # The adaptive sampler leaves its entropy and loss on the plain model (same object when wrapped).
        return (loss, backend.unwrapped.sampler_metrics) if args.mask_type == "adaptive" else loss

    start = time.time()
    finished = True
    while state.epoch < args.epochs and finished:
        sampler.set_epoch(state.epoch)
        sampler.set_consumed(state.step_in_epoch * videos_per_step)
        finished = train_one_epoch(
            backend, tracked(iter(loader), tracker), loss_fn, state, args, steps, logger, dist.device,
            rank=dist.rank, world_size=dist.world_size, save_fn=save, flops_per_clip=flops, peak_flops=peak,
            should_stop=watcher.should_stop,
        )
        if finished:
            if args.vis_every and (state.epoch + 1) % args.vis_every == 0:
                path = out / "vis" / f"epoch-{state.epoch:04d}.png" if dist.is_main else None
                grid = save_reconstruction(backend.module, backend.unwrapped, vis_clips, vis_noise, args.mask_ratio,
                                           path, backend.autocast)
                logger.image("reconstruction", grid, state.global_step)
            state.epoch += 1
            state.step_in_epoch = 0
        save.save_if_new(state)
    finish_pending_save(wait=True)
    logger.close()
    watcher.finish()  # after a signal-stop: exits for requeue under submitit; returns otherwise
    summary = {"global_step": state.global_step, "epoch": state.epoch, "minutes": (time.time() - start) / 60,
               "output_dir": str(out), "checkpoint": str(find_latest(args.output_dir))}
    log.info("done: %s", summary)
    cleanup()
    return summary


if __name__ == "__main__":
    main(parse_args(get_args_parser(), sys.argv[1:], default_config=DEMO_CONFIG))
