"""Masking ablation at toy scale, run through the training scripts: mask type x ratio -> linear-probe
accuracy and step time; where AdaMAE looks; what the sampler and decoder masking cost on a ViT-B step.

    python benchmarks/masking_ablation.py --quick          # see the README for its runtime
    python benchmarks/masking_ablation.py                  # longer pretraining and probes

1. Ablation (the toy counterpart of MAE-ST's mask-type / mask-ratio tables): each (mask type, ratio)
   cell is one `main_pretrain.py` run of the CPU demo recipe (`configs/pretrain/demo.yaml`: micro MAE,
   8 x 64 x 64 clips of the generated motion videos, whose label is the motion: one frame says
   nothing) for `--steps` steps, then `main_finetune.py --linprobe --finetune RUN` on the frozen
   encoder. Pretraining and probe train on the same class-balanced 2/3 of the videos; the probe is tested
   on the other 1/3, also class-balanced (`RUN/linprobe_*/eval_test.json`). The step time is the
   run's own (log.jsonl: compute time per optimiser step, data wait taken out). Prints a table and
   writes `ablation.png`.
2. Where AdaMAE looks: `main_pretrain.py --mask_type adaptive` and `random` on videos with one moving
   object on a static background (`single_object=True`, boxes in boxes.json); the runs' weights are
   loaded here (`util.checkpoint.read_weights`) and the visible tokens of unaugmented clips are matched
   against the object's boxes. Alone: `--quick --where-only`.
3. ViT-B 16x224 train step (batch 1, fp32, 90% masking): random vs adaptive sampler, decoder masking
   0 vs 0.5, each built as training builds it (`util.parallel.setup_parallel`) and stepped with
   `util.engine.train_step`, the four timed in turn so machine load hits all alike.

Every run prints its command line (rerun one by hand with it); a finished run is reused when its
folder holds its result (delete the folder to rerun it).
`--results DIR` also writes a result file (`benchmarks/common.py`, `write_result_file`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_results_flag,
    build_backend,
    mae_loss,
    recording,
    run_script,
    time_in_turn,
    train_step_fn,
    training_device,
)
from datasets import normalize_clips, read_list_file  # noqa: E402
from datasets.synthetic import CLASS_NAMES, ensure_synthetic_dataset  # noqa: E402
from models import create_model  # noqa: E402
from models.convert import load_pretrained  # noqa: E402
from util.checkpoint import find_latest, read_trainer_state  # noqa: E402
from util.weights import read_weights  # noqa: E402

MASK_TYPES = ("random", "tube", "frame", "cube", "adaptive", "adaptive_detached")
RATIOS = (0.75, 0.9, 0.95)
PRETRAIN_CONFIG = "configs/pretrain/demo.yaml"  # micro MAE on 8 frames x 64 px, every 2nd frame
FINETUNE_CONFIG = "configs/finetune/demo.yaml"  # micro ViT, no flips/mixup (the labels are motions)
# Decoding 64 px clips in the main process: starting a worker costs more than these short runs decode
# (~40 s per loader on the loaded 2-core machine), and both cores go to compute.
COMMON = ["--num_workers", "0"]
# The linear probe: BatchNorm + linear head on the frozen encoder (MAE's recipe), no decay, and a large lr
# (AdamW, not MAE's LARS at batch 16384): at blr 0.1 the head hardly moved in 40 steps (train loss 2.09 -> 1.85).
PROBE_BLR = 0.5
LINPROBE = ["--linprobe", "--blr", str(PROBE_BLR), "--weight_decay", "0.0", "--smoothing", "0.0",
            "--warmup_epochs", "1", "--eval_split", "test", "--save_every", "0"]


# ----------------------------------------------------------------------------- running the scripts
def run(script: str, args: list[str], out: Path, is_done: Callable[[], bool], threads: int = 1) -> tuple[str, float]:
    """Run one script to completion unless `is_done()`; returns (command line, minutes; nan when reused)."""
    # One thread by default: on a shared CPU two threads of these tiny matmuls wait for each other at
    # every op (measured here under load 10: 7.7 s/step with two, 1.5 s with one).
    r = run_script(script, out, args, threads=threads, log=out / "run.log", done=is_done, label=out.name)
    return f"OMP_NUM_THREADS={threads} {r.command}", r.minutes


def finished_steps(run_dir: Path) -> int:
    """Optimiser steps of a pretraining run's latest complete checkpoint (0: none)."""
    latest = find_latest(run_dir)
    return int(read_trainer_state(latest)["global_step"]) if latest is not None else 0


def pretrain(run_dir: Path, data: str, mask_type: str, ratio: float, steps: int, batch: int,
             extra: list[str] = (), threads: int = 1) -> dict:
    """One `main_pretrain.py` run of `steps` optimiser steps (cosine schedule over them); returns its stats."""
    n_train = len(read_list_file(f"{data}/train.csv"))
    steps_per_epoch = n_train // batch  # one rank, no accumulation, incomplete batches dropped
    epochs = math.ceil(steps / steps_per_epoch)
    args = ["--config", PRETRAIN_CONFIG, *COMMON, "--data_path", data, "--mask_type", mask_type,
            "--mask_ratio", str(ratio), "--batch_size", str(batch), "--epochs", str(epochs), "--max_steps", str(steps),
            "--warmup_epochs", f"{0.1 * epochs:g}", "--save_every", "0", "--vis_every", "0", *extra]
    cmd, minutes = run("main_pretrain.py", args, run_dir, lambda: finished_steps(run_dir) >= steps, threads)
    return {"command": cmd, "minutes": minutes, **run_stats(run_dir)}


def run_stats(run_dir: Path) -> dict:
    """From a run's log.jsonl: final loss, median compute ms per step (data wait removed), last sampler entropy."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "clips_per_s" in r]
    clips_per_step = yaml.safe_load((run_dir / "config.yaml").read_text())
    clips_per_step = clips_per_step["batch_size"] * clips_per_step["repeat_aug"]
    # The first window holds worker start-up and first-call overheads; a resumed run repeats no window.
    timed = train[1:] or train
    step_ms = [1000 * clips_per_step / r["clips_per_s"] * (1 - r["data_wait"]) for r in timed]
    return {"loss": train[-1]["loss"], "step_ms": statistics.median(step_ms),
            "entropy": train[-1].get("sampler_entropy", float("nan"))}


def linear_probe(run_dir: Path, pool: str, lists: Path, epochs: int, threads: int = 1) -> dict:
    """`main_finetune.py --linprobe --finetune RUN`: top-1 (%) on the test list."""
    out = run_dir / f"linprobe_ep{epochs}_blr{PROBE_BLR:g}"
    args = ["--config", FINETUNE_CONFIG, *COMMON, "--finetune", str(run_dir), "--data_path", str(lists),
            "--data_root", pool, "--epochs", str(epochs), *LINPROBE]
    cmd, minutes = run("main_finetune.py", args, out, (out / "eval_test.json").exists, threads)
    return {"probe_command": cmd, "probe_minutes": minutes,
            "probe_top1": json.loads((out / "eval_test.json").read_text())["top1"]}


def flags_tag(flags: list[str]) -> str:
    """A short folder suffix naming extra flags, so a run is reused only by runs with the same ones."""
    return "_" + hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8] if flags else ""


def balanced_lists(pool: str, out: Path, test_share: float = 1 / 3, seed: int = 0) -> Path:
    """Train and test lists (under `out`: the video cache is shared) drawn from all of the pool's videos with
    the same number of each class in each: the generated splits are a random cut, and with ~4 test videos a
    class, a class frequent in test is rare in train, which drives a probe that learned nothing below chance."""
    rows = [line for split in ("train", "val", "test") if Path(pool, f"{split}.csv").is_file()
            for line in Path(pool, f"{split}.csv").read_text().splitlines() if line.strip()]
    per_class: dict[str, list[str]] = {}
    for row in sorted(rows):
        per_class.setdefault(row.split()[-1], []).append(row)
    n = min(len(v) for v in per_class.values())
    n_test = max(1, round(n * test_share))
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(per_class, key=int):
        videos = per_class[label]
        rng.shuffle(videos)
        test += videos[:n_test]
        train += videos[n_test:n]
    lists = out / Path(pool).name / "balanced_lists"
    lists.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        (lists / f"{name}.csv").write_text("".join(r + "\n" for r in sorted(part)))
    return lists


def ablation(args: argparse.Namespace, out: Path) -> list[dict]:
    """Pretrain + linearly probe every (mask type, ratio); returns the table rows."""
    pool = args.data_path or ensure_synthetic_dataset(num_videos=args.videos)
    lists = balanced_lists(pool, out)  # pretraining and the probe train on the same videos
    n_train, n_test = (len(read_list_file(str(lists / f"{s}.csv"))) for s in ("train", "test"))
    print(f"data: {n_train} train, {n_test} test videos (balanced classes) from {pool}", flush=True)
    rows = []
    for ratio in args.ratios:
        for mask_type in args.mask_types:
            extra = args.pretrain_flags.split()
            run_dir = out / Path(pool).name / f"{mask_type}{ratio:g}_steps{args.steps}_b{args.batch}{flags_tag(extra)}"
            row = {"mask_type": mask_type, "ratio": ratio,
                   **pretrain(run_dir, str(lists), mask_type, ratio, args.steps, args.batch,
                              ["--data_root", pool, *extra], args.threads)}
            row.update(linear_probe(run_dir, pool, lists, args.probe_epochs, args.threads))
            rows.append(row)
            ran = [m for m in (row["minutes"], row["probe_minutes"]) if m == m]  # nan: reused
            took = f"{sum(ran):.1f} min" if ran else "reused"
            print(f"  {mask_type:8s} {ratio:.2f}  probe {row['probe_top1']:5.1f}%  loss {row['loss']:.3f}  "
                  f"step {row['step_ms']:.0f} ms  ({took})", flush=True)
    return rows


# ----------------------------------------------------------------------------- where AdaMAE looks
def load_split(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode every video of a split: uint8 [N, T, H, W, 3], labels [N], paths relative to `root`."""
    videos, labels, rels = [], [], []
    for path, label in read_list_file(f"{root}/{split}.csv", root):
        with av.open(path) as c:
            videos.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
        labels.append(label)
        rels.append(str(Path(path).relative_to(root)))
    return torch.from_numpy(np.stack(videos)), torch.tensor(labels), rels


def clips_at(videos: torch.Tensor, starts: torch.Tensor, frames: int, stride: int) -> torch.Tensor:
    """Normalised full-frame clips [N, 3, frames, H, W] of every video from frame `starts[n]` (no crop or flip,
    so the boxes hold as written)."""
    t = starts[:, None] + stride * torch.arange(frames)
    x = videos[torch.arange(len(videos))[:, None], t]  # [N, T, H, W, 3] uint8
    return normalize_clips(x.permute(0, 4, 1, 2, 3).contiguous())


def token_box_overlap(boxes: list, starts: torch.Tensor, model: torch.nn.Module, stride: int) -> torch.Tensor:
    """[N, L] bool: token (t, h, w) of the clip from `starts[n]` overlaps the object's box in one of its frames."""
    t_grid, h_grid, w_grid = model.grid_size
    t_patch, patch = model.patch_embed.t_patch_size, model.patch_size
    out = torch.zeros(len(starts), t_grid, h_grid, w_grid, dtype=torch.bool)
    for n, s in enumerate(starts.tolist()):
        for t in range(t_grid):
            for f in range(t * t_patch, (t + 1) * t_patch):  # the frames of one tubelet
                x0, y0, x1, y1 = boxes[n][s + stride * f][0]
                out[n, t, y0 // patch:(y1 - 1) // patch + 1, x0 // patch:(x1 - 1) // patch + 1] = True
    return out.flatten(1)


@torch.no_grad()
def visible_on_object(model: torch.nn.Module, videos: torch.Tensor, boxes: list, ratio: float, stride: int,
                      draws: int = 4, seed: int = 1) -> float:
    """Share of the visible tokens that touch the moving object, over `draws` random clips per video."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    frames = model.num_frames
    span = videos.shape[1] - stride * (frames - 1)
    hits = total = 0
    for _ in range(draws):
        starts = torch.randint(span, (len(videos),), generator=gen)
        noise = torch.rand(len(videos), model.patch_embed.num_patches, generator=gen)
        mask = model.forward_encoder(clips_at(videos, starts, frames, stride), ratio, noise)[1].mask
        visible = mask == 0
        hits += int((token_box_overlap(boxes, starts, model, stride) & visible).sum())
        total += int(visible.sum())
    return hits / total


def load_run(run_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The MAE of a main_pretrain.py run, built from its config.yaml and filled with its last weights."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = create_model(cfg["model"], img_size=cfg["input_size"], num_frames=cfg["num_frames"],
                         t_patch_size=cfg["t_patch_size"], cls_embed=cfg["cls_embed"],
                         sep_pos_embed=cfg["sep_pos_embed"], pred_t_dim=cfg["pred_t_dim"], mask_type=cfg["mask_type"],
                         norm_pix_loss=cfg["norm_pix_loss"], decoder_embed_dim=cfg["decoder_embed_dim"],
                         decoder_depth=cfg["decoder_depth"], decoder_num_heads=cfg["decoder_num_heads"],
                         init_values=cfg["init_values"])
    # The encoder and the sampler decide which tokens are visible; the decoder plays no part here.
    report = load_pretrained(model, read_weights(run_dir), source=str(run_dir), load_decoder=False)
    lost = [k for k in report.missing if k.startswith("adaptive_sampler.")]
    if lost:  # an untrained sampler would silently measure random masking
        raise ValueError(f"{run_dir}: the adaptive sampler's weights were not loaded: {lost}")
    return model, cfg


def where_it_looks(out: Path, steps: int, ratio: float = 0.9, batch: int = 8, background: str = "plain",
                   num_videos: int = 96, extra: list[str] = (), threads: int = 1,
                   adaptive_mask_type: str = "adaptive_detached") -> dict:
    """Pretrain random and adaptive on single-object videos; share of visible tokens on the object for each."""
    data = ensure_synthetic_dataset(num_videos=num_videos, single_object=True, background=background)
    all_boxes = json.loads(Path(data, "boxes.json").read_text())
    parts = [load_split(data, s) for s in ("val", "test")]  # videos no run trained on
    videos, boxes = torch.cat([p[0] for p in parts]), [all_boxes[r] for p in parts for r in p[2]]
    result: dict = {"data": data, "steps": steps, "ratio": ratio, "flags": list(extra)}
    # The README's measurement was made with the detached variant; `adaptive_mask_type` adaptive runs the published one.
    for name, mask_type in (("random", "random"), ("adaptive", adaptive_mask_type)):
        run_dir = out / Path(data).name / f"{mask_type}{ratio:g}_steps{steps}_b{batch}{flags_tag(list(extra))}"
        stats = pretrain(run_dir, data, mask_type, ratio, steps, batch, ["--no-norm_pix_loss", *extra], threads)
        model, cfg = load_run(run_dir)
        result[name] = visible_on_object(model, videos, boxes, ratio, cfg["sampling_rate"])
        result[f"{name}_run"] = {**stats, "dir": str(run_dir), "mask_type": mask_type}
        if mask_type == "random":  # every token's share of being on the object: what uniform sampling gives
            result["tokens"] = model.patch_embed.num_patches
            starts = torch.zeros(len(videos), dtype=torch.long)
            result["object_token_share"] = float(token_box_overlap(boxes, starts, model, cfg["sampling_rate"])
                                                 .float().mean())
    result["ratio_adaptive_over_random"] = result["adaptive"] / max(result["random"], 1e-9)
    return result


# ----------------------------------------------------------------------------- ViT-B step cost
def vitb_step_times(repeats: int, device: str = "cpu") -> dict:
    """Median ViT-B 16x224 train-step seconds (batch 1, fp32, 90% masking) of each variant, timed in turn."""
    variants = {"random": ("random", 0.0), "random, decoder mask 0.5": ("random", 0.5),
                "adaptive": ("adaptive", 0.0), "adaptive, decoder mask 0.5": ("adaptive", 0.5)}
    dev = torch.device(device)
    batch = {"clips": torch.randn(1, 3, 16, 224, 224, device=dev), "noise": torch.rand(1, 1568, device=dev)}
    steps = {}
    for name, (mask_type, decoder_mask) in variants.items():
        torch.manual_seed(0)
        model = create_model("mae_vit_base_patch16", num_frames=16, t_patch_size=2, pred_t_dim=8, mask_type=mask_type,
                             decoder_mask_ratio=decoder_mask).to(dev).train()
        # The backend training uses (DDP in one process, fp32, AdamW with the default groups and clipping).
        steps[name] = train_step_fn(build_backend(model, dev), batch, mae_loss(0.9))
    # The first round warms allocators and kernels up and builds AdamW's state.
    times = time_in_turn(steps, repeats, dev, warmup=1)
    return {n: statistics.median(t) for n, t in times.items()}


# ----------------------------------------------------------------------------- report
def plot(rows: list[dict], path: Path) -> None:
    """Probe accuracy and step time vs mask ratio, one line per mask type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for mt in dict.fromkeys(r["mask_type"] for r in rows):
        sel = [r for r in rows if r["mask_type"] == mt]
        axes[0].plot([r["ratio"] for r in sel], [r["probe_top1"] for r in sel], "o-", label=mt)
        axes[1].plot([r["ratio"] for r in sel], [r["step_ms"] for r in sel], "o-", label=mt)
    axes[0].set(xlabel="mask ratio", ylabel="linear probe top-1 (%)",
                title=f"probe accuracy ({len(CLASS_NAMES)} motion classes)")
    axes[1].set(xlabel="mask ratio", ylabel="ms / step", title="micro MAE step time (CPU, compute only)")
    axes[0].axhline(100 / len(CLASS_NAMES), color="gray", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(rows: list[dict], mask_types: list[str], ratios: list[float]) -> None:
    """Markdown table: probe top-1 per ratio, then ms/step per ratio, one row per mask type."""
    print("\n| mask type | " + " | ".join(f"{r:.2f}" for r in ratios) + " | ms/step at " +
          " / ".join(f"{r:.2f}" for r in ratios) + " |")
    print("|---|" + "---|" * (len(ratios) + 1))
    for mt in mask_types:
        sel = {r["ratio"]: r for r in rows if r["mask_type"] == mt}
        print(f"| {mt} | " + " | ".join(f"{sel[r]['probe_top1']:.1f}" for r in ratios) + " | " +
              " / ".join(f"{sel[r]['step_ms']:.0f}" for r in ratios) + " |")


def main(argv: list[str] | None = None) -> dict:
    """Run the three parts and print their tables; returns results.json's dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (the README states how long)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps per cell (120; quick 40)")
    p.add_argument("--batch", type=int, default=8, help="videos per step (x repeat_aug 2 clips)")
    p.add_argument("--probe_epochs", type=int, default=None, help="epochs of the linear probe (30; quick 10)")
    p.add_argument("--videos", type=int, default=96, help="generated videos (2/3 train, 1/3 probe test, both class-balanced)")
    p.add_argument("--data_path", default="", help="a list-file folder instead of the generated videos")
    p.add_argument("--mask_types", nargs="+", default=list(MASK_TYPES), choices=MASK_TYPES)
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--pretrain_flags", default="", help="more main_pretrain.py flags for the ablation cells, one "
                   "string (--pretrain_flags='--blr 2e-2')")
    p.add_argument("--motion_steps", type=int, default=None, help="pretraining steps of part 2 (150; full 300)")
    p.add_argument("--motion_ratio", type=float, default=0.9)
    p.add_argument("--motion_background", choices=["texture", "smooth", "plain"], default="plain",
                   help="static background of the single-object videos")
    p.add_argument("--motion_flags", default="", help="more main_pretrain.py flags for part 2, one string")
    p.add_argument("--where-only", dest="where_only", action="store_true", help="run only part 2")
    p.add_argument("--threads", type=int, default=1, help="compute threads of each training run (OMP_NUM_THREADS)")
    p.add_argument("--vitb_repeats", type=int, default=3, help="timed ViT-B steps per variant (0: skip)")
    p.add_argument("--vitb_device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--skip", nargs="*", default=[], choices=["ablation", "motion", "vitb"])
    p.add_argument("--out", default=None, help="runs/masking_ablation (quick: runs/masking_ablation_quick)")
    add_results_flag(p)
    args = p.parse_args(argv)
    with recording(args.results, "masking_ablation" + ("-quick" if args.quick else ""), __file__, argv,
                   device=training_device()) as rec:
        rec.data = run_benchmark(args)
    return rec.data


def run_benchmark(args: argparse.Namespace) -> dict:
    """The three parts the flags ask for, their tables printed; returns the results."""
    if args.where_only:
        args.skip = sorted(set(args.skip) | {"ablation", "vitb"})
    args.steps = args.steps or (40 if args.quick else 120)
    args.probe_epochs = args.probe_epochs or (10 if args.quick else 30)
    args.motion_steps = args.motion_steps or (150 if args.quick else 300)
    out = Path(args.out or ("runs/masking_ablation_quick" if args.quick else "runs/masking_ablation")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args)}
    t0 = time.time()

    if "ablation" not in args.skip:
        print(f"== ablation: {args.steps} pretraining steps x {args.batch} videos, linear probe "
              f"{args.probe_epochs} epochs", flush=True)
        rows = results["ablation"] = ablation(args, out)
        print_table(rows, args.mask_types, args.ratios)
        plot(rows, out / "ablation.png")
        print(f"plot: {out / 'ablation.png'}  (chance: {100 / len(CLASS_NAMES):.1f}%)", flush=True)

    if "motion" not in args.skip:
        print(f"\n== where the encoder looks: one moving object ({args.motion_background} background), "
              f"{args.motion_steps} steps at {args.motion_ratio}", flush=True)
        m = results["motion"] = where_it_looks(out, args.motion_steps, args.motion_ratio, args.batch,
                                               args.motion_background, args.videos, args.motion_flags.split(),
                                               args.threads)
        print(f"tokens touching the object: {m['object_token_share']:.1%} of all")
        print(f"visible tokens on the object: random {m['random']:.1%}, adaptive {m['adaptive']:.1%} "
              f"({m['ratio_adaptive_over_random']:.2f}x; sampler entropy {m['adaptive_run']['entropy']:.2f} nats, "
              f"uniform {math.log(m['tokens']):.2f})", flush=True)
        print(f"commands:\n{m['random_run']['command']}\n{m['adaptive_run']['command']}")

    if "vitb" not in args.skip and args.vitb_repeats:
        print("\n== ViT-B 16x224 train step (batch 1, fp32, mask 0.9), the variants in turn", flush=True)
        v = results["vitb_step_s"] = vitb_step_times(args.vitb_repeats, args.vitb_device)
        base = v["random"]
        print("| variant | s/step | vs random without decoder masking |\n|---|---|---|")
        for name, s in v.items():
            print(f"| {name} | {s:.2f} | {base / s:.2f}x |")
    results["minutes"] = (time.time() - t0) / 60
    results["load_average"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\ndone in {results['minutes']:.1f} min (load average at the end {results['load_average'][0]:.1f}); "
          f"{out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
