"""Does MAE-ST pretraining help? Scratch vs pretrained fine-tuning (same budget) and linear probes, on CPU.

    python benchmarks/pretrain_helps.py [--out runs/pretrain_helps] [--threads 2]

On the generated motion videos (8 classes: direction x rotation sense; no single frame tells the
class), the same micro ViT is
  (a) fine-tuned from random init,
  (b) pretrained with MAE-ST on the train videos (labels unused), then fine-tuned with the same budget,
  (c) linearly probed on the frozen pretrained encoder, and on a frozen random encoder for reference.
Each row is tested on the test split (temporal views averaged). Prints a table with the commands.
Every step is a plain main_pretrain.py / main_finetune.py run, so the commands can be rerun by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--synthetic_videos", "320", "--synthetic_size", "64", "--input_size", "32", "--num_frames", "8",
        "--sampling_rate", "2", "--t_patch_size", "2", "--num_workers", "1", "--precision", "fp32",
        "--log_every", "20", "--seed", "0"]
PRETRAIN = ["--config", "configs/pretrain/demo.yaml", "--model", "mae_vit_micro_patch8", "--mask_ratio", "0.75",
            "--pred_t_dim", "8", "--decoder_embed_dim", "128", "--decoder_depth", "2", "--decoder_num_heads", "4",
            "--batch_size", "32", "--repeat_aug", "2", "--blr", "5e-3", "--warmup_epochs", "3",
            "--clip_grad", "0", "--vis_every", "0", "--save_every", "0"]
FINETUNE = ["--config", "configs/finetune/demo.yaml", "--batch_size", "16", "--repeat_aug", "2",
            "--blr", "4e-3", "--warmup_epochs", "2", "--min_crop_scale", "0.5", "--eval_split", "test",
            "--eval_every", "0", "--test_num_temporal_views", "2", "--test_num_spatial_crops", "1"]
LINPROBE = ["--linprobe", "--blr", "2e-2", "--weight_decay", "0.0", "--layer_decay", "1.0", "--smoothing", "0.0"]


def run(name: str, script: str, args: list[str], out: Path, threads: int) -> tuple[str, float]:
    """Run one script to completion (skipped when its output already holds a final result)."""
    cmd = [sys.executable, script, "--output_dir", str(out / name), *DATA, *args]
    shown = " ".join(c if " " not in c else repr(c) for c in cmd[1:]).replace(str(ROOT) + "/", "")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.time()
    log = out / f"{name}.log"
    done = out / name / ("eval_test.json" if "finetune" in script else "checkpoints/latest")
    if done.exists():  # finished earlier: reuse it (delete the folder to rerun)
        return "python " + shown, float("nan")
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
    return "python " + shown, (time.time() - start) / 60


def top1(out: Path, name: str) -> float:
    return json.loads((out / name / "eval_test.json").read_text())["top1"]


def main() -> None:
    """Run the four trainings and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pretrain_helps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pretrain_epochs", type=int, default=30)
    p.add_argument("--finetune_epochs", type=int, default=15)
    p.add_argument("--probe_epochs", type=int, default=10)
    a = p.parse_args()
    out = Path(a.out).resolve()
    ft = FINETUNE + ["--epochs", str(a.finetune_epochs)]
    probe = FINETUNE + LINPROBE + ["--epochs", str(a.probe_epochs)]
    rows = []
    cmd, minutes = run("pretrain", "main_pretrain.py", PRETRAIN + ["--epochs", str(a.pretrain_epochs)], out, a.threads)
    rows.append(("MAE-ST pretraining (no labels)", None, minutes, cmd))
    for name, label, extra in (
        # No layer-wise decay from random init: there are no pretrained lower layers to protect.
        ("scratch", "fine-tune from random init", ft + ["--layer_decay", "1.0"]),
        ("finetuned", "fine-tune from MAE-ST pretraining", ft + ["--finetune", str(out / "pretrain")]),
        ("probe_random", "linear probe, random frozen encoder", probe),
        ("probe_pretrained", "linear probe, MAE-ST frozen encoder", probe + ["--finetune", str(out / "pretrain")]),
    ):
        cmd, minutes = run(name, "main_finetune.py", extra, out, a.threads)
        rows.append((label, top1(out, name), minutes, cmd))
    print("\n| run | test top-1 (%) | minutes |\n| --- | ---: | ---: |")
    for label, acc, minutes, _ in rows:
        print(f"| {label} | {'' if acc is None else f'{acc:.1f}'} | {minutes:.1f} |")
    gain = rows[2][1] - rows[1][1]
    print(f"\npretraining gain in fine-tuning top-1: {gain:+.1f} points (target >= +10)\n\ncommands:")
    for label, _, _, cmd in rows:
        print(f"# {label}\n{cmd}")


if __name__ == "__main__":
    main()
