"""End-to-end pretraining throughput: is the model or the input pipeline the bottleneck, and do they overlap?

Runs the real `main_pretrain.py` path (its dataset, DataLoader, model, parallel backend and the shared
engine) for N steps three ways in one run:
  model-only  the same batch again and again from device memory (`--no-data` alone runs just this)
  loader-only the DataLoader iterated without the model
  end-to-end  both, as training runs
and prints clips/s, data-wait share, MFU and peak memory. Overlap is good when end-to-end reaches
~90% of the slower of model-only and loader-only.

    python benchmarks/bench_train.py                                  # demo config (CPU)
    python benchmarks/bench_train.py --config configs/pretrain/demo.yaml --model mae_vit_small_patch16 \\
        --input_size 112 --num_frames 16 --pred_t_dim 8 --decoder_embed_dim 512 --decoder_depth 4 \\
        --decoder_num_heads 16 --batch_size 2 --repeat_aug 2 --num_workers 1 --synthetic_size 128
    python benchmarks/bench_train.py --config configs/pretrain/vit_l_k400.yaml --data_path K400 \\
        --num_workers 16 --batch_size 8 --repeat_aug 1                # one GPU
Flags after the benchmark's own (--steps, --warmup, --no-data, --modes) are main_pretrain.py flags.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import collate_clips  # noqa: E402
from main_pretrain import (  # noqa: E402
    DEMO_CONFIG,
    build_dataset,
    build_loader,
    build_model,
    get_args_parser,
    resolve_data_path,
)
from util.config import parse_args  # noqa: E402
from util.distributed import init_distributed, set_cpu_threads  # noqa: E402
from util.engine import TrainState, to_device, train_one_epoch  # noqa: E402
from util.flops import device_peak_flops, mae_flops_per_clip  # noqa: E402
from util.logger import TrainLogger, peak_memory_gb  # noqa: E402
from util.lr_sched import effective_lr  # noqa: E402
from util.parallel import setup_parallel  # noqa: E402


def bench_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own flags; the rest go to main_pretrain's parser."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed optimiser steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (workers start, kernels warm)")
    p.add_argument("--no-data", action="store_true", help="model-only: skip the loader and end-to-end modes")
    p.add_argument("--modes", default="model,loader,e2e", help="comma-separated subset of model,loader,e2e")
    return p.parse_known_args(argv)


class Timed:
    """Wraps a batch iterator and adds up the time spent waiting in next()."""

    def __init__(self, it) -> None:
        self.it, self.wait = it, 0.0

    def __iter__(self) -> Timed:
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        batch = next(self.it)
        self.wait += time.perf_counter() - t0
        return batch


def forever(sampler, loader):
    """Batches across epoch boundaries (small datasets end before the benchmark does)."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(backend, batches, args, steps: int, device: torch.device, rank: int, world: int) -> float:
    """Run `steps` optimiser steps through the shared engine; returns wall seconds."""
    state = TrainState()
    quiet = TrainLogger("", enabled=False, total_steps=steps)
    sync(device)
    t0 = time.perf_counter()
    train_one_epoch(backend, batches, loss_fn(args), state, args, steps, quiet, device, rank=rank, world_size=world)
    sync(device)
    return time.perf_counter() - t0


def loss_fn(args: argparse.Namespace):
    """The pretraining loss, as main_pretrain computes it."""
    return lambda module, batch: module(batch["clips"], args.mask_ratio, batch["noise"])[0]


def main(argv: list[str] | None = None) -> None:
    """Measure model-only, loader-only and end-to-end clips/s and print the table."""
    bargs, rest = bench_args(sys.argv[1:] if argv is None else argv)
    args = parse_args(get_args_parser(), rest, default_config=DEMO_CONFIG)
    # Benchmark steps must not log, save or stop early.
    args.log_every, args.save_every, args.max_steps, args.epochs = 10**9, 0, 0, 10**6
    modes = ["model"] if bargs.no_data else bargs.modes.split(",")
    dist = init_distributed(need_group=args.dist != "ddp")
    threads = set_cpu_threads(dist, args.num_workers)
    model = build_model(args)
    dataset = build_dataset(args, resolve_data_path(args, dist.is_main), model.patch_embed.num_patches,
                            normalize=dist.device.type != "cuda")
    if args.lr is None:
        args.lr = effective_lr(args.blr, args.batch_size, args.repeat_aug, args.accum_iter, dist.world_size)
    flops = mae_flops_per_clip(model, args.mask_ratio)["train_step"]
    backend = setup_parallel(model, args, dist)
    peak, peak_source = device_peak_flops(dist.device, args.precision)
    clips_per_step = args.batch_size * args.repeat_aug * args.accum_iter  # per rank
    n = bargs.warmup + bargs.steps
    rows = []

    if "model" in modes:
        # One real batch, built in this process (no workers left running to steal cores).
        fixed = to_device(collate_clips([dataset[(0, i)] for i in range(args.batch_size)]), dist.device)
        run_steps(backend, itertools.repeat(fixed), args, bargs.warmup, dist.device, dist.rank, dist.world_size)
        secs = run_steps(backend, itertools.repeat(fixed), args, bargs.steps, dist.device, dist.rank, dist.world_size)
        rows.append(("model only (--no-data)", clips_per_step * bargs.steps / secs, 0.0, secs / bargs.steps))
    if "loader" in modes:
        it = forever(*build_loader(args, dataset, dist))
        for _ in range(bargs.warmup * args.accum_iter):
            next(it)
        t0 = time.perf_counter()
        for _ in range(bargs.steps * args.accum_iter):
            to_device(next(it), dist.device)
        sync(dist.device)
        secs = time.perf_counter() - t0
        rows.append(("loader only", clips_per_step * bargs.steps / secs, 1.0, secs / bargs.steps))
        del it
    if "e2e" in modes:
        batches = Timed(forever(*build_loader(args, dataset, dist)))
        run_steps(backend, batches, args, bargs.warmup, dist.device, dist.rank, dist.world_size)
        batches.wait = 0.0
        secs = run_steps(backend, batches, args, bargs.steps, dist.device, dist.rank, dist.world_size)
        rows.append(("end to end", clips_per_step * bargs.steps / secs, batches.wait / secs, secs / bargs.steps))

    if not dist.is_main:
        return
    device = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.model} {args.num_frames}x{args.input_size}, mask {args.mask_ratio}, {args.precision}, "
          f"{args.dist} x{dist.world_size}, {clips_per_step} clips/step/rank, {args.num_workers} workers, "
          f"grad_ckpt={args.grad_ckpt}, compile={args.compile} on {device}, {threads} compute thread(s)")
    print(f"{flops / 1e9:.2f} GFLOP per clip (fwd+bwd); peak {peak / 1e12:.3f} TFLOP/s ({peak_source}); "
          f"{n} steps per mode ({bargs.warmup} warm-up)\n")
    print("| mode | clips/s per rank | step (s) | data wait | MFU | peak mem (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rate, wait, step in rows:
        mfu = "" if name == "loader only" else f"{100 * rate * flops / peak:.1f}%"
        print(f"| {name} | {rate:.2f} | {step:.3f} | {100 * wait:.0f}% | {mfu} | {peak_memory_gb(dist.device):.2f} |")
    rates = {name.split()[0]: rate for name, rate, _, _ in rows}
    if {"model", "loader", "end"} <= rates.keys():
        bound = min(rates["model"], rates["loader"])
        print(f"\nend to end / min(model only, loader only) = {rates['end'] / bound:.2f} (target >= 0.90)")


if __name__ == "__main__":
    main()
