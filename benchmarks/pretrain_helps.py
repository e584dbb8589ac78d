"""Does MAE-ST pretraining help? Scratch vs pretrained fine-tuning (same budget) and linear probes, on CPU.

    python benchmarks/pretrain_helps.py [--out runs/pretrain_helps] [--threads 2]

Data: the generated motion videos (8 classes = 4 directions x 2 rotation senses; shape, colour and
start position are random, so no single frame tells the class), 32 px, one-colour background, objects
and speeds twice the generator's default (`--object_scale 2 --speed_scale 2`: an object covers a few
tokens and crosses several of them in a clip, so where it goes next is worth predicting).
The train split (840 videos) is the unlabelled pool for MAE-ST; `--labels_per_class` (10) of its
videos per class keep their labels for fine-tuning (the semi-supervised setting of SSL papers); the
test set is the val + test splits (360 videos). The same micro ViT is
  (a) fine-tuned from random init,
  (b) pretrained with MAE-ST on the unlabelled pool, then fine-tuned with the same recipe and steps,
  (c) linearly probed on the frozen pretrained encoder, and on a frozen random encoder for reference.
Pretraining hides whole time slots (`--mask_type frame --mask_ratio 0.5`: two of the four visible):
with spacetime-random masking a hidden token can be filled in from its own time slot, and the
micro model learns appearance only (see the README for the measured comparison).
Every step is a plain main_pretrain.py / main_finetune.py run, so each printed command reruns by hand.
A finished step is reused when its output folder holds a result (delete the folder to rerun it).
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
sys.path.insert(0, str(ROOT))

from datasets.synthetic import ensure_synthetic_dataset  # noqa: E402

NUM_VIDEOS, SIZE, NUM_CLASSES = 1200, 32, 8
CLIP = ["--input_size", str(SIZE), "--num_frames", "8", "--sampling_rate", "2", "--t_patch_size", "2",
        "--num_workers", "1", "--precision", "fp32", "--seed", "0", "--log_every", "50"]
# MAE-ST on 8 frames x 32 px (4 x 4 x 4 tokens). Pixel targets without per-patch normalisation: on a
# one-colour background a flat patch normalised by its own variance is amplified codec noise.
PRETRAIN = ["--model", "mae_vit_micro_patch8", "--mask_type", "MASK_TYPE", "--mask_ratio", "MASK_RATIO",
            "--no-norm_pix_loss", "--pred_t_dim", "8", "--decoder_embed_dim", "128",
            "--decoder_depth", "2", "--decoder_num_heads", "4", "--batch_size", "32", "--repeat_aug", "2",
            "--blr", "1.2e-2", "--warmup_epochs", "3", "--clip_grad", "0", "--vis_every", "0",
            "--save_every", "0"]
# One recipe for both arms: the labels are motions, so no flips, rotations, mixup or erasing.
# Betas 0.9 0.95 as in the run the README table comes from (main_finetune's default is now 0.999).
FINETUNE = ["--opt_betas", "0.9", "0.95", "--model", "vit_micro_patch8", "--num_classes", str(NUM_CLASSES), "--batch_size", "32",
            "--repeat_aug", "1", "--blr", "8e-3", "--layer_decay", "1.0", "--drop_path_rate", "0.0",
            "--smoothing", "0.0", "--min_crop_scale", "0.8", "--no-hflip", "--rand_aug", "",
            "--reprob", "0.0", "--mixup", "0.0", "--cutmix", "0.0", "--clip_grad", "0", "--eval_split", "test",
            "--eval_every", "0", "--test_num_temporal_views", "2", "--test_num_spatial_crops", "1"]
LINPROBE = ["--linprobe", "--blr", "8e-2", "--weight_decay", "0.0"]


def make_data(out: Path, labels_per_class: int, object_scale: float, speed_scale: float,
              num_videos: int = NUM_VIDEOS) -> tuple[Path, Path]:
    """The video pool (generated once) and a folder of lists: a few labelled train videos, a large test set."""
    # Cached under `out` by its generation settings, built atomically: a killed run never leaves half a pool.
    pool = Path(ensure_synthetic_dataset(str(out), num_videos, size=SIZE, seed=0, background="plain",
                                         object_scale=object_scale, speed_scale=speed_scale))
    lists = pool / f"labelled_{labels_per_class or 'all'}"
    lists.mkdir(parents=True, exist_ok=True)
    rows = (pool / "train.csv").read_text().splitlines()
    per_class: dict[str, list[str]] = {}
    for row in rows:
        per_class.setdefault(row.split()[1], []).append(row)
    keep = [r for rs in per_class.values() for r in rs[:labels_per_class or None]]
    (lists / "train.csv").write_text("".join(r + "\n" for r in keep))
    (lists / "test.csv").write_text((pool / "val.csv").read_text() + (pool / "test.csv").read_text())
    return pool, lists


def run(name: str, script: str, args: list[str], out: Path, threads: int) -> tuple[str, float]:
    """Run one script to completion (skipped when its output already holds a final result)."""
    cmd = [sys.executable, script, "--output_dir", str(out / name), *CLIP, *args]
    shown = " ".join(c if c and " " not in c else repr(c) for c in cmd[1:]).replace(str(ROOT) + "/", "")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.time()
    log = out / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    done = out / name / ("eval_test.json" if "finetune" in script else "checkpoints/latest")
    if done.exists():
        return "python " + shown, float("nan")
    print(f"running {name} (log: {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
    return "python " + shown, (time.time() - start) / 60


def top1(out: Path, name: str) -> float:
    """Test top-1 (%) that main_finetune.py wrote at the end of a run."""
    return json.loads((out / name / "eval_test.json").read_text())["top1"]


def main() -> None:
    """Run the pretraining, the two fine-tunings and the two probes; print the table and the commands."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pretrain_helps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--labels_per_class", type=int, default=10, help="labelled train videos per class (0: all)")
    p.add_argument("--object_scale", type=float, default=2.0, help="object radius factor of the generated set")
    p.add_argument("--speed_scale", type=float, default=2.0, help="object speed factor of the generated set")
    p.add_argument("--mask_type", default="frame")
    p.add_argument("--mask_ratio", type=float, default=0.5)
    p.add_argument("--pretrain_epochs", type=int, default=60)
    p.add_argument("--finetune_steps", type=int, default=600)
    p.add_argument("--probe_steps", type=int, default=400)
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool, lists = make_data(out, a.labels_per_class, a.object_scale, a.speed_scale)
    pretrain = [x.replace("MASK_TYPE", a.mask_type).replace("MASK_RATIO", str(a.mask_ratio)) for x in PRETRAIN]
    labelled = ["--data_path", str(lists), "--data_root", str(pool)]
    n_train = len((lists / "train.csv").read_text().splitlines())
    # whole epochs of the small labelled set that give the asked number of steps
    steps_per_epoch = max(1, n_train // 32)
    ft_epochs = max(1, a.finetune_steps // steps_per_epoch)
    ft = FINETUNE + labelled + ["--epochs", str(ft_epochs), "--warmup_epochs", str(max(1, ft_epochs // 10))]
    probe = FINETUNE + labelled + LINPROBE + ["--epochs", str(max(1, a.probe_steps // steps_per_epoch)),
                                              "--warmup_epochs", "1"]
    # One folder per setting, so a finished step is reused only by runs that share all its knobs.
    pt_name = f"{pool.name}/pretrain_{a.mask_type}{a.mask_ratio:g}_ep{a.pretrain_epochs}"
    ft_dir = f"{lists.relative_to(out)}/steps{ft_epochs * steps_per_epoch}"
    rows = []
    cmd, minutes = run(pt_name, "main_pretrain.py", ["--data_path", str(pool), *pretrain, "--epochs",
                                                    str(a.pretrain_epochs)], out, a.threads)
    rows.append((f"MAE-ST pretraining ({a.mask_type} masking {a.mask_ratio:.0%}, {a.pretrain_epochs} epochs of "
                 f"the unlabelled pool)", None, minutes, cmd))
    ckpt = str(out / pt_name)
    tag = Path(pt_name).name
    for name, label, extra in (
        ("scratch", f"fine-tune from random init ({ft_epochs * steps_per_epoch} steps)", ft),
        (f"finetuned_{tag}", "fine-tune from MAE-ST pretraining (same recipe and steps)", ft + ["--finetune", ckpt]),
        ("probe_random", "linear probe, random frozen encoder", probe),
        (f"probe_{tag}", "linear probe, MAE-ST frozen encoder", probe + ["--finetune", ckpt]),
    ):
        cmd, minutes = run(f"{ft_dir}/{name}", "main_finetune.py", extra, out, a.threads)
        rows.append((label, top1(out, f"{ft_dir}/{name}"), minutes, cmd))
    n_test = len((lists / "test.csv").read_text().splitlines())
    print(f"\n{n_train} labelled train videos, {n_test} test videos, "
          f"chance {100 / NUM_CLASSES:.1f}%\n")
    print("| run | test top-1 (%) | minutes |\n| --- | ---: | ---: |")
    for label, acc, minutes, _ in rows:
        took = "reused" if minutes != minutes else f"{minutes:.1f}"  # nan: an earlier run's result
        print(f"| {label} | {'' if acc is None else f'{acc:.1f}'} | {took} |")
    gain = rows[2][1] - rows[1][1]
    print(f"\npretraining gain in fine-tuning top-1: {gain:+.1f} points (target >= +10)\n\ncommands:")
    for label, _, _, cmd in rows:
        print(f"# {label}\n{cmd}")


if __name__ == "__main__":
    main()
