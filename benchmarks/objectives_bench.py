"""MAE-ST (random 90%), AMT, rho-BYOL (rho = 2 and 4) and rho-MoCo at one budget on generated motion videos (CPU).

    python benchmarks/objectives_bench.py [--out runs/objectives_bench] [--threads 1] [--epochs 6]

Data: the pool of pretrain_helps.py (1200 generated videos, 32 px, one-colour background, objects and
speeds twice the generator's default; 8 classes = 4 directions x 2 rotation senses). Every objective
pretrains the same micro ViT (128-d, 4 blocks, 8 frames x 32 px = 4 x 4 x 4 tokens) on the 840
unlabelled train videos for the same number of epochs with the same 16 videos per step (the budget:
videos seen, as the rho study compares rho = 2 and 4; clips per video and cost per clip differ, hence
the minutes and clips/s columns). Then, with 10 labelled videos per class, each encoder is
  (a) linearly probed (frozen encoder, BatchNorm + linear head: main_finetune.py --linprobe), and
  (b) fine-tuned with one recipe and the same steps,
and tested on the 360 val + test videos (2 temporal views). Reference rows: fine-tuning from random
init, and the probe of a random encoder. Before that, one train step of random masking and of AMT
at the same mask ratio are timed in turn in this process (the same batch, alternating), which is the
per-step speed comparison the shared CPU allows. Every run is a plain main_pretrain.py /
main_finetune.py command, printed at the end; a finished run is reused (delete its folder to rerun).
`--results DIR` also writes a result file (`benchmarks/common.py`, `write_result_file`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NUM_VIDEOS, SIZE, NUM_CLASSES, VIDEOS_PER_STEP = 1200, 32, 8, 16
CLIP = ["--input_size", str(SIZE), "--num_frames", "8", "--sampling_rate", "2", "--t_patch_size", "2",
        "--num_workers", "1", "--precision", "fp32", "--seed", "0", "--log_every", "10"]
COMMON = ["--model", "mae_vit_micro_patch8", "--batch_size", str(VIDEOS_PER_STEP), "--save_every", "0"]
# MAE-ST at 90% (pixel targets: on a one-colour background a flat patch normalised by its own variance
# is amplified codec noise); AMT at the same 90% hidden from the encoder, 40% of the tokens thrown.
MAE = ["--vis_every", "0", "--repeat_aug", "2", "--mask_ratio", "0.9", "--no-norm_pix_loss", "--pred_t_dim", "8",
       "--decoder_embed_dim", "128", "--decoder_depth", "2", "--decoder_num_heads", "4", "--blr", "1.2e-2",
       "--clip_grad", "0"]
AMT = ["--mask_type", "amt", "--throw_ratio", "0.4"]
# rho objectives: AdamW as MoCo v3 trains ViTs; a short schedule, so a lower target momentum (0.99), a
# queue about the size of an epoch's keys, and a larger lr than the long K400 recipe.
RHO = ["--proj_dim", "128", "--proj_hidden_dim", "512", "--pred_hidden_dim", "512", "--ema_momentum", "0.99",
       "--moco_queue", "1024", "--blr", "2e-3", "--weight_decay", "0.1", "--opt_betas", "0.9", "0.999",
       "--clip_grad", "0"]
FINETUNE = ["--model", "vit_micro_patch8", "--num_classes", str(NUM_CLASSES), "--batch_size", "16",
            "--repeat_aug", "1", "--blr", "8e-3", "--layer_decay", "1.0", "--drop_path_rate", "0.0",
            "--smoothing", "0.0", "--min_crop_scale", "0.8", "--no-hflip", "--rand_aug", "", "--reprob", "0.0",
            "--mixup", "0.0", "--cutmix", "0.0", "--clip_grad", "0", "--eval_split", "test", "--eval_every", "0",
            "--test_num_temporal_views", "2", "--test_num_spatial_crops", "1", "--opt_betas", "0.9", "0.95"]
LINPROBE = ["--linprobe", "--blr", "8e-2", "--weight_decay", "0.0"]


def make_data(out: Path, labels_per_class: int) -> tuple[Path, Path]:
    """The video pool (generated once, cached by its settings) and lists: a few labelled videos, the test set."""
    return common.motion_pool(out, NUM_VIDEOS, labels_per_class)


def run(name: str, script: str, args: list[str], out: Path, threads: int) -> tuple[str, float, float]:
    """Run one script to completion (reused when its output holds a final result): (command, minutes, CPU minutes).

    On a shared machine the wall minutes grow with the load; the CPU minutes do not (much).
    """
    r = common.run_script(script, out / name, [*CLIP, *args], threads=threads, log=out / f"{name}.log", label=name)
    return r.command, r.minutes, r.cpu_minutes


def clips_per_s(run_dir: Path) -> float:
    """Training clips/s of a pretraining run: the mean over its log lines (the loop's own measurement)."""
    rates = [json.loads(line).get("clips_per_s") for line in (run_dir / "log.jsonl").read_text().splitlines()]
    rates = [r for r in rates if r]
    return statistics.mean(rates) if rates else float("nan")


def interleaved_step_times(steps: int, threads: int) -> dict[str, float]:
    """Median train-step seconds of random masking and AMT at 90% hidden, timed in turn on one fixed batch."""
    import torch

    from models import create_model

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    kw = dict(img_size=SIZE, num_frames=8, norm_pix_loss=False, pred_t_dim=8, decoder_embed_dim=128,
              decoder_depth=2, decoder_num_heads=4)
    g = torch.Generator().manual_seed(0)
    batch = {"clips": torch.randn(2 * VIDEOS_PER_STEP, 3, 8, SIZE, SIZE, generator=g),
             "noise": torch.rand(2 * VIDEOS_PER_STEP, 64, generator=g)}
    arms, step_fns = {}, {}
    for name, extra in (("random", {}), ("amt", {"mask_type": "amt", "throw_ratio": 0.4})):
        torch.manual_seed(0)
        arms[name] = common.build_backend(create_model("mae_vit_micro_patch8", **kw, **extra), cpu)
        step_fns[name] = common.train_step_fn(arms[name], batch, common.mae_loss(0.9))
    times = common.time_in_turn(step_fns, steps, cpu, warmup=2)  # alternate, so load changes hit both arms alike
    flops = {name: backend.unwrapped.flops_per_clip(0.9)["train_step"] for name, backend in arms.items()}
    return {**{name: statistics.median(t) for name, t in times.items()}, **{f"{k}_flops": v for k, v in flops.items()}}


def top1(path: Path) -> float:
    """Test top-1 (%) that main_finetune.py wrote at the end of a run."""
    return json.loads((path / "eval_test.json").read_text())["top1"]


def main(argv: list[str] | None = None) -> dict:
    """Time random vs AMT steps, run the five pretrainings, their probes and fine-tunings; print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/objectives_bench")
    p.add_argument("--threads", type=int, default=1, help="compute threads per run (one data worker beside it)")
    p.add_argument("--epochs", type=int, default=6, help="pretraining epochs of the 840-video pool, every objective")
    p.add_argument("--labels_per_class", type=int, default=10)
    p.add_argument("--finetune_steps", type=int, default=150)
    p.add_argument("--probe_steps", type=int, default=150)
    p.add_argument("--speed_steps", type=int, default=10, help="timed steps per arm of the interleaved speed test")
    common.add_results_flag(p)
    a = p.parse_args(argv)
    with common.recording(a.results, "objectives_bench", __file__, argv, device=common.training_device()) as rec:
        rec.data = run_benchmark(a)
    return rec.data


def run_benchmark(a: argparse.Namespace) -> dict:
    """Everything main does after parsing; returns the figures it prints."""
    start = time.time()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool, lists = make_data(out, a.labels_per_class)
    speed = interleaved_step_times(a.speed_steps, a.threads)
    print(f"one train step of {2 * VIDEOS_PER_STEP} clips, timed in turn: random {speed['random']:.3f} s, "
          f"AMT {speed['amt']:.3f} s ({speed['random'] / speed['amt']:.2f}x; FLOP ratio "
          f"{speed['random_flops'] / speed['amt_flops']:.2f}x)", flush=True)
    # AMT: attention passes after epochs E/4, E/2, 3E/4 (the paper: every 40 of 400 epochs after 40).
    every = max(1, a.epochs // 4)
    arms = [
        ("mae_random90", "MAE-ST, random masking 90%", MAE),
        ("amt90_throw40", "AMT, 90% hidden (40% thrown, 50% masked)", MAE + AMT + [
            "--amt_warmup_epochs", str(every), "--amt_refresh_epochs", str(every)]),
        ("rho_byol_2", "rho-BYOL, rho = 2", ["--objective", "rho_byol", "--rho", "2", *RHO]),
        ("rho_byol_4", "rho-BYOL, rho = 4", ["--objective", "rho_byol", "--rho", "4", *RHO]),
        ("rho_moco_2", "rho-MoCo, rho = 2", ["--objective", "rho_moco", "--rho", "2", *RHO]),
    ]
    n_train = len((lists / "train.csv").read_text().splitlines())
    steps_per_epoch = max(1, n_train // 16)
    labelled = ["--data_path", str(lists), "--data_root", str(pool)]
    ft_epochs, probe_epochs = max(1, a.finetune_steps // steps_per_epoch), max(1, a.probe_steps // steps_per_epoch)
    ft = FINETUNE + labelled + ["--epochs", str(ft_epochs), "--warmup_epochs", str(max(1, ft_epochs // 10))]
    probe = FINETUNE + labelled + LINPROBE + ["--epochs", str(probe_epochs), "--warmup_epochs", "1"]
    rows, commands = [], []
    for name, label, extra in arms:
        pre = f"pretrain_ep{a.epochs}/{name}"
        cmd, minutes, cpu = run(pre, "main_pretrain.py", ["--data_path", str(pool), *COMMON, *extra, "--epochs",
                                                     str(a.epochs), "--warmup_epochs", str(max(1, a.epochs // 4))],
                           out, a.threads)
        commands.append((label + ", pretraining", cmd))
        accs = []
        for kind, args in (("probe", probe), ("finetune", ft)):
            sub = f"pretrain_ep{a.epochs}/{kind}_{name}"
            cmd_k, _, _ = run(sub, "main_finetune.py", [*args, "--finetune", str(out / pre)], out, a.threads)
            commands.append((f"{label}, {kind}", cmd_k))
            accs.append(top1(out / sub))
        rows.append((label, *accs, minutes, cpu, clips_per_s(out / pre)))
    for kind, args, label in (("probe", probe, "random frozen encoder (probe)"),
                              ("finetune", ft, "no pretraining (fine-tune from random init)")):
        sub = f"pretrain_ep{a.epochs}/{kind}_scratch"
        cmd, _, _ = run(sub, "main_finetune.py", args, out, a.threads)
        commands.append((label, cmd))
        rows.append((label, top1(out / sub) if kind == "probe" else None, top1(out / sub) if kind == "finetune"
                     else None, None, None, None))
    n_test = len((lists / "test.csv").read_text().splitlines())
    print(f"\n{a.epochs} pretraining epochs of {NUM_VIDEOS * 7 // 10} unlabelled videos, {VIDEOS_PER_STEP} videos per "
          f"step; {n_train} labelled videos ({a.labels_per_class} per class), probe {probe_epochs * steps_per_epoch} "
          f"and fine-tuning {ft_epochs * steps_per_epoch} steps; {n_test} test videos, chance "
          f"{100 / NUM_CLASSES:.1f}%; load average {os.getloadavg()[0]:.1f}\n")
    print("| pretraining | linear probe top-1 (%) | fine-tune top-1 (%) | pretraining minutes | CPU minutes | "
          "clips/s |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda v, f: "" if v is None else ("reused" if v != v else f.format(v))  # noqa: E731
    for label, probe_acc, ft_acc, minutes, cpu, rate in rows:
        print(f"| {label} | {fmt(probe_acc, '{:.1f}')} | {fmt(ft_acc, '{:.1f}')} | {fmt(minutes, '{:.1f}')} | "
              f"{fmt(cpu, '{:.1f}')} | {fmt(rate, '{:.1f}')} |")
    print(f"\nAMT vs random masking, one step timed in turn: {speed['random'] / speed['amt']:.2f}x faster "
          f"(FLOPs {speed['random_flops'] / speed['amt_flops']:.2f}x)")
    print(f"total {(time.time() - start) / 60:.1f} minutes, {common.children_cpu_seconds() / 60:.1f} CPU minutes in the runs\n\ncommands:")
    for label, cmd in commands:
        print(f"# {label}\n{cmd}")
    keys = ("label", "probe_top1", "finetune_top1", "pretrain_minutes", "cpu_minutes", "clips_per_s")
    return {"args": vars(a), "speed": speed, "rows": [dict(zip(keys, row, strict=True)) for row in rows],
            "commands": [{"label": label, "command": cmd} for label, cmd in commands],
            "minutes": (time.time() - start) / 60, "load_average": os.getloadavg()[0]}


if __name__ == "__main__":
    main()
