"""The README's demo figures from a finished pretraining run: its loss curve and last reconstruction image.

    python main_pretrain.py --output_dir runs/demo            # the demo (configs/pretrain/demo.yaml)
    python benchmarks/demo_figures.py runs/demo --out benchmarks/figures

Writes OUT/demo_loss.png (training loss per logged step, from RUN/log.jsonl) and OUT/demo_reconstruction.png
(a copy of the run's last RUN/vis/epoch-*.png), and prints the loss at the first, middle and last log lines.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster or in CI
import matplotlib.pyplot as plt  # noqa: E402


def read_losses(run: Path) -> tuple[list[int], list[float]]:
    """Steps and losses of the training log's step records (other records, e.g. evaluation, are skipped)."""
    steps, losses = [], []
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            steps.append(int(rec["step"]))
            losses.append(float(rec["loss"]))
    if not steps:
        raise SystemExit(f"{run / 'log.jsonl'} holds no training steps: is {run} a finished pretraining run?")
    return steps, losses


def main() -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="output folder of a pretraining run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/figures"))
    args = p.parse_args()
    steps, losses = read_losses(args.run)
    images = sorted((args.run / "vis").glob("epoch-*.png"))
    if not images:
        raise SystemExit(f"no reconstruction images in {args.run / 'vis'}: run with --vis_every > 0")
    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    ax.plot(steps, losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (masked patches, MSE)")
    ax.set_ylim(0, max(losses[1:] or losses) * 1.1)  # the first log line is far above the rest
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "demo_loss.png")
    shutil.copyfile(images[-1], args.out / "demo_reconstruction.png")
    mid = len(losses) // 2
    print(f"loss: step {steps[0]} {losses[0]:.3f}, step {steps[mid]} {losses[mid]:.3f}, "
          f"step {steps[-1]} {losses[-1]:.3f}; image {images[-1].name}; wrote {args.out}")


if __name__ == "__main__":
    main()
