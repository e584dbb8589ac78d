"""Attentive vs linear probe of one frozen MAE-ST encoder over seeds, on the generated motion videos (CPU).

    python benchmarks/probe_compare.py [--seeds 3] [--num_videos 600] [--pretrain_epochs 6] [--probe_steps 150]
    python benchmarks/probe_compare.py --quick        # smoke test of every step (the numbers mean nothing)

The data, the pretraining and the linear probe are benchmarks/pretrain_helps.py's (`common.motion_pool`, `PRETRAIN`,
`FINETUNE`, `LINPROBE`): the motion set's 8 classes are directions and rotation senses, so no single frame tells
the class. One micro MAE-ST encoder is pretrained on the train split (seed 0), then for each seed s both probes
are trained on its frozen features with seed s (the same data order and steps) and tested on the test split
(2 temporal views):
  linear:    `--linprobe` (BatchNorm without affine + linear head, MAE's), pretrain_helps' lr;
  attentive: `--probe attentive` (V-JEPA's cross-attention pooler with one learned query, then linear), a grid of
             `--probe_lrs` trained over one frozen forward pass, its best chosen on the val split.
Printed: each probe's mean test top-1 with its 95% Student-t interval over seeds, and the per-seed difference's.
Every step is a plain main_pretrain.py / main_finetune.py run (common.run_script), reused when finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    CLIP,
    FINETUNE,
    LINPROBE,
    MOTION_SIZE,
    PRETRAIN,
    add_results_flag,
    motion_pool,
    recording,
    run_script,
    summarize,
    training_device,
)
from datasets.synthetic import dataset_fingerprint  # noqa: E402

QUICK = dict(num_videos=48, batch_size=4, pretrain_epochs=1, probe_steps=2, seeds=2)


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/probe_compare")
    p.add_argument("--seeds", type=int, default=3, help="probe seeds (each trains both probes)")
    p.add_argument("--num_videos", type=int, default=600, help="generated videos (70%% train, 15%% val, 15%% test)")
    p.add_argument("--batch_size", type=int, default=32, help="videos per step, pretraining and probes")
    p.add_argument("--pretrain_epochs", type=int, default=6)
    p.add_argument("--probe_steps", type=int, default=150, help="about this many steps per probe (whole epochs)")
    p.add_argument("--probe_lrs", default="1e-2,3e-3", help="the attentive probe's grid of lrs (chosen on val)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny pool and budgets (numbers mean nothing)")
    add_results_flag(p)
    return p


def top1(folder: Path) -> float:
    """Test top-1 (%) main_finetune.py wrote at the end of a run."""
    return json.loads((folder / "eval_test.json").read_text())["top1"]


def main(argv: list[str] | None = None) -> dict:
    """Pretrain once, train both probes per seed, print and return the comparison (also OUT/results.json)."""
    a = get_args_parser().parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    with recording(a.results, "probe_compare", __file__, argv, device=training_device()) as rec:
        out = Path(a.out).resolve()
        # pretrain_helps.py's set (the same settings, so the same cached pool); pool/ has train, val, test lists
        pool, _ = motion_pool(out, a.num_videos, 0, MOTION_SIZE, 2.0, 2.0, "stripes")
        common = ["--batch_size", str(a.batch_size), "--num_workers", "0", "--decode_threads", "1"]
        tag = f"b{a.batch_size}_ep{a.pretrain_epochs}"
        encoder = out / pool.name / f"pretrain_{tag}"
        runs = [run_script("main_pretrain.py", encoder, [*CLIP, *PRETRAIN, *common, "--data_path", str(pool),
                                                         "--mask_type", "frame", "--mask_ratio", "0.5",
                                                         "--decoder_embed_dim", "128", "--decoder_depth", "2",
                                                         "--epochs", str(a.pretrain_epochs), "--seed", "0"],
                           threads=a.threads)]
        n_train = len((pool / "train.csv").read_text().splitlines())
        epochs = max(1, round(a.probe_steps / max(1, n_train // a.batch_size)))
        base = [*CLIP, *FINETUNE, *common, "--data_path", str(pool), "--finetune", str(encoder), "--epochs",
                str(epochs), "--warmup_epochs", "1"]
        arms = {"linear": LINPROBE,
                "attentive": ["--probe", "attentive", "--probe_lrs", a.probe_lrs, "--probe_val_split", "val",
                              "--weight_decay", "0.0"]}
        acc: dict[str, list[float]] = {arm: [] for arm in arms}
        for seed in range(a.seeds):
            for arm, flags in arms.items():
                folder = out / pool.name / f"{tag}_probe{epochs}ep" / f"{arm}_seed{seed}"
                runs.append(run_script("main_finetune.py", folder, [*base, *flags, "--seed", str(seed)],
                                       threads=a.threads))
                acc[arm].append(top1(folder))
        diff = [x - y for x, y in zip(acc["attentive"], acc["linear"], strict=True)]
        stats = {arm: summarize(v) for arm, v in acc.items()} | {"attentive_minus_linear": summarize(diff)}
        print(f"\ndata fingerprint {dataset_fingerprint(str(pool))}; {n_train} train videos, "
              f"{len((pool / 'test.csv').read_text().splitlines())} test videos; {epochs} probe epochs "
              f"({epochs * (n_train // a.batch_size)} steps) per run, {a.seeds} seeds\n")
        print("| probe | test top-1 per seed | mean | 95% interval (t, over seeds) |\n| --- | --- | --- | --- |")
        for name, s in stats.items():
            values = acc.get(name, diff)
            print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {s['mean']:.2f} | "
                  f"[{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] |")
        cpu = sum(r.cpu_minutes for r in runs if not r.reused)
        print(f"\nCPU minutes of the runs made now: {cpu:.1f}")
        report = {"settings": vars(a), "top1": acc, "stats": stats, "probe_epochs": epochs,
                  "commands": [r.command for r in runs]}
        (out / "results.json").write_text(json.dumps(report, indent=1))
        rec.data = report
    return report


if __name__ == "__main__":
    main()
