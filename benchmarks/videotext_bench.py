"""Masked video-text pretraining on generated captioned videos: FLIP's speed/accuracy claim, MAE-ST init, retrieval.

    python benchmarks/videotext_bench.py [--out runs/videotext_bench] [--budget_steps 520] [--threads 2]

Data: the motion-labelled generated videos of datasets/synthetic.py (32 px, one-colour background, objects
and speeds twice the generator's default), captioned by datasets/captions.py: every caption states the
motion (direction and rotation sense: the 8 classes), some also the shape, colour, size and speed. The
train split's captions use one set of sentence templates; the test captions (one per video, MSR-VTT
1k-A style) and the zero-shot class prompts use held-out templates. All runs are `main_pretrain.py
--config configs/pretrain/videotext_demo.yaml` with the flags printed beside them (a finished run is
reused: delete its folder to rerun it).

1. Speed: train steps of the same model at 0% and 50% masking (fixed real batch, forward + backward +
   AdamW), timed in turn so that the machine's load hits both alike; the ratio of medians.
2. Equal wall-clock budget (FLIP's comparison): the unmasked run gets `--budget_steps` steps, the masked
   run that many times the measured speed-up. Step counts, not timers, set the budget, so a busy shared
   machine does not decide the outcome; the table also prints each run's measured minutes.
3. MAE-ST pretraining (frame masking 50% on the same training videos, no captions), then the masked
   video-text run again from those weights, with the same steps as the masked run from random init.
Every video-text run ends with retrieval on the held-out test captions and zero-shot classification of
the val + test videos (`eval_retrieval.json`, `eval_zeroshot.json`, `retrieval_examples.png`).
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from datasets.captions import CaptionVideoDataset, ensure_videotext_dataset, read_caption_list  # noqa: E402
from datasets.text_tokenizer import train_tokenizer  # noqa: E402
from datasets.video_dataset import collate_clips  # noqa: E402
from models.videotext import videotext_model  # noqa: E402
from util.config import OptimConfig  # noqa: E402

NUM_VIDEOS, SIZE = 1200, 32
DEMO = str(ROOT / "configs" / "pretrain" / "videotext_demo.yaml")
# One recipe for every video-text run (the demo config plus these); the budget sets --epochs.
VIDEOTEXT = ["--config", DEMO, "--num_workers", "1", "--save_every", "0", "--log_every", "25",
             "--eval_list", "val_test.csv", "--seed", "0"]
# MAE-ST on the same videos: whole time slots hidden (frame masking 50%), pixel targets (README, pretrain_helps).
MAE = ["--objective", "mae", "--config", str(ROOT / "configs" / "pretrain" / "demo.yaml"), "--input_size", str(SIZE),
       "--num_frames", "4", "--sampling_rate", "4", "--pred_t_dim", "4", "--mask_type", "frame", "--mask_ratio", "0.5",
       "--no-norm_pix_loss", "--repeat_aug", "2", "--batch_size", "32", "--blr", "1.2e-2", "--warmup_epochs", "3",
       "--clip_grad", "0", "--vis_every", "0", "--save_every", "0", "--log_every", "25", "--num_workers", "1",
       "--decoder_embed_dim", "128", "--decoder_depth", "2", "--decoder_num_heads", "4", "--seed", "0"]


def make_data(out: Path) -> Path:
    """The captioned set (generated once into `out`) plus a val + test list for zero-shot classification."""
    data = Path(ensure_videotext_dataset(str(out), NUM_VIDEOS, size=SIZE))
    both = data / "val_test.csv"
    if not both.is_file():
        both.write_text((data / "val.csv").read_text() + (data / "test.csv").read_text())
    return data


def time_steps(data: Path, rounds: int, threads: int) -> dict:
    """Median seconds of a train step at 0% and 50% masking, interleaved; the demo config's model and batch."""
    torch.set_num_threads(threads)
    caps = read_caption_list(str(data / "train_captions.csv"), str(data))
    tok = train_tokenizer(caps.all_captions())
    ds = CaptionVideoDataset(caps, tok, 24, mode="pretrain", num_frames=4, sampling_rate=4, crop_size=SIZE,
                             seed=0, mask_noise_tokens=32, short_side_range=None, hflip=False)
    batch = collate_clips([ds[(0, i)] for i in range(32)])
    torch.manual_seed(0)
    model = videotext_model("mae_vit_micro_patch8", tok.vocab_size, context_length=24, text_width=128, text_depth=2,
                            text_heads=4, embed_dim=128, img_size=SIZE, num_frames=4, t_patch_size=2, pred_t_dim=2)
    # The training backend and step (one process, fp32, AdamW with the default groups; no clipping, as before).
    cpu = torch.device("cpu")
    backend = common.build_backend(model, cpu, optim=OptimConfig(clip_grad=0.0))
    steps = {ratio: common.train_step_fn(backend, batch, common.videotext_loss_fn(ratio)) for ratio in (0.0, 0.5)}
    # The first rounds warm the allocator and caches; the order alternates too.
    times = common.time_in_turn(steps, rounds, cpu, warmup=2, alternate=True)
    t0, t50 = statistics.median(times[0.0]), statistics.median(times[0.5])
    return {"step_s_mask0": t0, "step_s_mask50": t50, "speedup": t0 / t50, "rounds": rounds,
            "flops_ratio": model.flops_per_clip(0.0)["train_step"] / model.flops_per_clip(0.5)["train_step"]}


def run(name: str, args: list[str], out: Path, data: Path, threads: int) -> dict:
    """One main_pretrain.py run to completion (reused when its results exist); returns its timing."""
    folder = out / name
    done = folder / "bench_run.json"
    r = common.run_script("main_pretrain.py", folder, ["--data_path", str(data), *args], threads=threads,
                          done=done.is_file, result=common.finished_marker("main_pretrain.py", folder).exists,
                          label=name)
    if r.reused:
        return json.loads(done.read_text())
    info = {"minutes": r.minutes, "cpu_minutes": r.cpu_minutes, "command": r.command}
    done.write_text(json.dumps(info))
    return info


def results(folder: Path) -> dict:
    """Zero-shot and retrieval metrics a video-text run wrote."""
    zs = json.loads((folder / "eval_zeroshot.json").read_text())
    rt = json.loads((folder / "eval_retrieval.json").read_text())
    steps = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    return {"zeroshot": zs["top1"], "steps": max(steps), **{k: rt[k] for k in rt if k.startswith(("t2v", "v2t"))}}


def main(argv: list[str] | None = None) -> dict:
    """Time the masked and unmasked steps, run the four pretrainings and print the table and the checks."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "videotext_bench"))
    p.add_argument("--budget_steps", type=int, default=520, help="steps of the unmasked run (20 epochs of 26)")
    p.add_argument("--mae_epochs", type=int, default=30, help="MAE-ST pretraining epochs (26 steps of 64 clips each)")
    p.add_argument("--threads", type=int, default=2, help="compute threads per run")
    p.add_argument("--speed_rounds", type=int, default=20)
    common.add_results_flag(p)
    a = p.parse_args(argv)
    with common.recording(a.results, "videotext_bench", __file__, argv, device=common.training_device()) as rec:
        rec.data = run_benchmark(a)
    return rec.data


def run_benchmark(a: argparse.Namespace) -> dict:
    """Everything main does after parsing; returns summary.json's dict (with the checks and settings)."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    load = os.getloadavg()[0]
    data = make_data(out)
    steps_per_epoch = len((data / "train.csv").read_text().splitlines()) // 32
    speed_file = out / "speed.json"
    speed = json.loads(speed_file.read_text()) if speed_file.is_file() else time_steps(data, a.speed_rounds, a.threads)
    speed_file.write_text(json.dumps(speed))
    epochs0 = max(1, round(a.budget_steps / steps_per_epoch))
    epochs50 = max(1, round(epochs0 * speed["speedup"]))
    runs = {
        "mask0": ["--epochs", str(epochs0), "--unmasked_epochs", str(epochs0)],
        "mask50": ["--epochs", str(epochs50)],
        "mae": [*MAE, "--epochs", str(a.mae_epochs)],
    }
    runs["mask50_mae_init"] = [*runs["mask50"], "--init_from", str(out / "mae")]
    timing = {}
    for name, extra in runs.items():
        timing[name] = run(name, extra if name == "mae" else [*VIDEOTEXT, *extra], out, data, a.threads)
    res = {n: results(out / n) for n in runs if n != "mae"}

    print(f"\nvideo-text benchmark: {NUM_VIDEOS} generated videos ({SIZE} px), micro ViT (128-d x 4) + text 128-d x 2, "
          f"batch 32, test = {len((data / 'test.csv').read_text().splitlines())} videos with held-out captions; "
          f"zero-shot on val + test ({len((data / 'val_test.csv').read_text().splitlines())} videos, 8 classes, "
          f"chance 12.5%); load average at start {load:.1f} on {os.cpu_count()} cores")
    print(f"speed: 50% masking {speed['step_s_mask50'] * 1e3:.0f} ms/step vs 0% {speed['step_s_mask0'] * 1e3:.0f} ms "
          f"-> {speed['speedup']:.2f}x faster (median of {speed['rounds']} interleaved steps each; FLOPs ratio "
          f"{speed['flops_ratio']:.2f}x)\n")
    print("| run | masking | init | steps | minutes | CPU min | zero-shot top-1 | t2v R@1 / R@5 / R@10 | "
          "v2t R@1 / R@5 / R@10 |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for name, mask, init in (("mask0", "0%", "random"), ("mask50", "50% random", "random"),
                             ("mask50_mae_init", "50% random", "MAE-ST")):
        r, t = res[name], timing[name]
        print(f"| {name} | {mask} | {init} | {r['steps']} | {t['minutes']:.1f} | {t['cpu_minutes']:.1f} | "
              f"{r['zeroshot']:.1f} | {r['t2v_R@1']:.1f} / {r['t2v_R@5']:.1f} / {r['t2v_R@10']:.1f} | "
              f"{r['v2t_R@1']:.1f} / {r['v2t_R@5']:.1f} / {r['v2t_R@10']:.1f} |")
    t = timing["mae"]
    mae_steps = max(json.loads(line)["step"] for line in (out / "mae" / "log.jsonl").read_text().splitlines()
                    if '"loss"' in line)
    print(f"| mae (MAE-ST pretraining, frame masking 50%, 64 clips per step) | | | {mae_steps} | "
          f"{t['minutes']:.1f} | {t['cpu_minutes']:.1f} | | | |")
    checks = [
        ("zero-shot >= 60% (best run)", max(r["zeroshot"] for r in res.values()), 60.0),
        ("50% masking step speed-up >= 1.6x", speed["speedup"], 1.6),
        ("50% masking >= unmasked zero-shot at equal budget (points)", res["mask50"]["zeroshot"] - res["mask0"]["zeroshot"],
         0.0),
        ("MAE-ST init - random init, zero-shot (points)", res["mask50_mae_init"]["zeroshot"] - res["mask50"]["zeroshot"],
         1e-9),
        ("MAE-ST init - random init, t2v R@5 (points)", res["mask50_mae_init"]["t2v_R@5"] - res["mask50"]["t2v_R@5"],
         1e-9),
    ]
    print()
    for what, value, need in checks:
        print(f"{'PASS' if value >= need else 'MISS'}  {what}: {value:.2f} (target {'>' if need == 1e-9 else '>='} "
              f"{0 if need == 1e-9 else need:g})")
    print(f"\ntotal {(time.time() - start) / 60:.1f} min; outputs in {out}")
    (out / "summary.json").write_text(json.dumps({"speed": speed, "results": res, "timing": timing}, indent=1))
    return {"args": vars(a), "speed": speed, "results": res, "timing": timing, "mae_steps": mae_steps,
            "checks": [{"check": what, "value": value, "target": need, "pass": value >= need}
                       for what, value, need in checks], "load_average_start": load}


if __name__ == "__main__":
    main()
