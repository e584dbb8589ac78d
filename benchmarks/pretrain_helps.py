"""Does MAE-ST pretraining help? Scratch vs pretrained fine-tuning and linear probes over seeds, on CPU.

    python benchmarks/pretrain_helps.py [--seeds 3 --finetune_seeds 2] [--labels_per_class 10] [--threads 1]
    python benchmarks/pretrain_helps.py --quick          # smoke test of every step, about a minute

Data: the generated motion videos (8 classes = 4 directions x 2 rotation senses; shape, colour and
start position are random, so no single frame tells the class), 32 px, one-colour background, objects
and speeds twice the generator's default. They are stored losslessly and byte-reproducibly
(datasets/synthetic.py), so every machine trains on the same pixels; the pool's fingerprint is printed.
The train split (70%) is the unlabelled pool for MAE-ST; `--labels_per_class` of its videos per class
keep their labels for fine-tuning (the semi-supervised setting of SSL papers); the test set is the
val + test splits (30%, 1080 videos by default, so one accuracy's standard error is about 1.5 points).

For every pretraining seed p (of `--seeds`) and fine-tuning index s (of `--finetune_seeds`) the same
micro ViT is fine-tuned with the same recipe, steps and seed k = p * finetune_seeds + s
  (a) from random init, and
  (b) from MAE-ST pretraining seed p,
so each pair (a, b) shares its data order and head init and differs only in the encoder's start; and
per pretraining seed a linear probe of the frozen MAE-ST encoder is compared with one of a frozen
random encoder (seed p). The gain of a pretraining seed is the mean over its pairs; the table gives
mean, standard deviation and a 95% Student-t interval over pretraining seeds (the unit that repeats).

Every step is a plain main_pretrain.py / main_finetune.py run, so each printed command reruns by hand;
results and commands are also written to OUT/results.json. A finished step is reused when its output
folder holds a result (delete the folder to rerun it); folders are named by every knob that changes it.
Determinism: same data bytes everywhere; with the same torch build, CPU kind and `--threads`, a rerun
gives the same numbers; another thread count or CPU changes float rounding and so single runs a little.
`--results DIR` also writes a result file (`benchmarks/common.py`, `write_result_file`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402  (the motion-set recipes and statistics are shared with probe_compare.py)
    CLIP,
    FINETUNE,
    LINPROBE,
    MOTION_CLASSES,
    MOTION_SIZE,
    PRETRAIN,
    add_results_flag,
    motion_pool,
    recording,
    run_script,
    summarize,
    training_device,
)
from datasets.synthetic import OBJECT_TEXTURES, dataset_fingerprint  # noqa: E402

NUM_VIDEOS, SIZE, NUM_CLASSES = 3600, MOTION_SIZE, MOTION_CLASSES
# --quick: every step of the full benchmark on a few videos for a few steps (the numbers mean nothing).
QUICK = dict(num_videos=48, batch_size=4, pretrain_epochs=1, finetune_steps=2, probe_steps=2, labels_per_class=1)


def make_data(out: Path, labels_per_class: int, object_scale: float, speed_scale: float,
              num_videos: int = NUM_VIDEOS, object_texture: str = "stripes") -> tuple[Path, Path]:
    """The video pool (generated once) and a folder of lists: a few labelled train videos, a large test set."""
    # Cached under `out` by its generation settings, built atomically: a killed run never leaves half a pool.
    return motion_pool(out, num_videos, labels_per_class, SIZE, object_scale, speed_scale, object_texture)


def finetune_seed(pretrain_seed: int, index: int, finetune_seeds: int) -> int:
    """Seed of fine-tuning `index` paired with pretraining seed p: distinct for every (p, index)."""
    return pretrain_seed * finetune_seeds + index


def run(name: str, script: str, args: list[str], out: Path, threads: int) -> tuple[str, float]:
    """Run one script to completion (skipped when its output already holds a final result)."""
    r = run_script(script, out / name, [*CLIP, *args], threads=threads, log=out / f"{name}.log", label=name)
    return r.command, r.minutes


def run_all(tasks: list[tuple], out: Path, threads: int, jobs: int) -> list[dict]:
    """Run the tasks, `jobs` at a time, each after the folder it needs; one record per task, in task order."""
    futures: dict[str, concurrent.futures.Future] = {}

    def one(arm: str, name: str, script: str, args: list[str], pretrain_seed: int, seed: int,
            needs: str | None) -> dict:
        if needs is not None:
            futures[needs].result()  # started earlier (tasks start in order), so this never deadlocks
        cmd, minutes = run(name, script, args, out, threads)
        acc = top1(out, name) if script == "main_finetune.py" else None
        return dict(arm=arm, pretrain_seed=pretrain_seed, seed=seed, top1=acc, minutes=minutes,
                    dir=str(out / name), cmd=cmd)

    pool = concurrent.futures.ThreadPoolExecutor(max(1, jobs))
    try:
        for task in tasks:
            futures[task[1]] = pool.submit(one, *task)
        return [futures[task[1]].result() for task in tasks]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure: finish the running runs, start no more


def top1(out: Path, name: str) -> float:
    """Test top-1 (%) that main_finetune.py wrote at the end of a run."""
    return json.loads((out / name / "eval_test.json").read_text())["top1"]


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pretrain_helps")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with --threads threads)")
    p.add_argument("--num_workers", type=int, default=0,
                   help="data-loading processes per run (0: load in the run's own process)")
    p.add_argument("--seeds", type=int, default=3, help="pretraining seeds")
    p.add_argument("--finetune_seeds", type=int, default=2, help="fine-tunings (and scratch runs) per pretraining seed")
    p.add_argument("--labels_per_class", type=int, default=10, help="labelled train videos per class (0: all)")
    p.add_argument("--num_videos", type=int, default=NUM_VIDEOS, help="generated videos (70%% pool, 30%% test)")
    p.add_argument("--object_scale", type=float, default=2.0, help="object radius factor of the generated set")
    p.add_argument("--speed_scale", type=float, default=2.0, help="object speed factor of the generated set")
    p.add_argument("--object_texture", default="stripes", choices=OBJECT_TEXTURES,
                   help="objects of the generated set: two-colour stripes or one colour")
    p.add_argument("--mask_type", default="frame")
    p.add_argument("--mask_ratio", type=float, default=0.5)
    p.add_argument("--decoder_embed_dim", type=int, default=128)
    p.add_argument("--decoder_depth", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32, help="videos per step, pretraining and fine-tuning")
    p.add_argument("--pretrain_epochs", type=int, default=20)
    p.add_argument("--finetune_steps", type=int, default=600)
    p.add_argument("--probe_steps", type=int, default=400)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny pool and budgets (numbers mean nothing)")
    add_results_flag(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run every pretraining, fine-tuning and probe; print the table, the statistics and the commands."""
    a = get_args_parser().parse_args(argv)
    name = "pretrain_helps" + ("-quick" if a.quick else "")
    with recording(a.results, name, __file__, argv, device=training_device()) as rec:
        rec.data = run_benchmark(a)
    return rec.data


def run_benchmark(a: argparse.Namespace) -> dict:
    """Everything main does after parsing; returns the report (OUT/results.json)."""
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool, lists = make_data(out, a.labels_per_class, a.object_scale, a.speed_scale, a.num_videos,
                             a.object_texture)
    fingerprint = dataset_fingerprint(str(pool))
    # Small runs side by side scale better than one run on several threads: a 32 px clip decodes in
    # well under a millisecond, so each run loads its own data and uses one core.
    common = ["--batch_size", str(a.batch_size), "--num_workers", str(a.num_workers), "--decode_threads", "1"]
    pretrain = [*PRETRAIN, *common, "--mask_type", a.mask_type, "--mask_ratio", str(a.mask_ratio),
                "--decoder_embed_dim", str(a.decoder_embed_dim), "--decoder_depth", str(a.decoder_depth),
                "--data_path", str(pool), "--epochs", str(a.pretrain_epochs)]
    labelled = ["--data_path", str(lists), "--data_root", str(pool)]
    n_train = len((lists / "train.csv").read_text().splitlines())
    # whole epochs of the small labelled set that give about the asked number of steps
    steps_per_epoch = max(1, n_train // a.batch_size)
    ft_epochs = max(1, round(a.finetune_steps / steps_per_epoch))
    ft = [*FINETUNE, *common, *labelled, "--epochs", str(ft_epochs), "--warmup_epochs", str(max(1, ft_epochs // 10))]
    probe_epochs = max(1, round(a.probe_steps / steps_per_epoch))
    probe = [*FINETUNE, *common, *labelled, *LINPROBE, "--epochs", str(probe_epochs), "--warmup_epochs", "1"]
    # One folder per setting, so a finished step is reused only by runs that share all its knobs.
    tag = (f"pretrain_{a.mask_type}{a.mask_ratio:g}_dec{a.decoder_embed_dim}x{a.decoder_depth}"
           f"_b{a.batch_size}_ep{a.pretrain_epochs}")
    ft_dir = f"{lists.relative_to(out)}/b{a.batch_size}_steps{ft_epochs * steps_per_epoch}"
    probe_dir = f"{lists.relative_to(out)}/b{a.batch_size}_probe{probe_epochs * steps_per_epoch}"

    tasks = []  # (arm, folder, script, args, pretraining seed, seed, folder it needs first)
    for p in range(a.seeds):
        tasks.append(("pretrain", f"{pool.name}/{tag}/seed{p}", "main_pretrain.py", [*pretrain, "--seed", str(p)],
                      p, p, None))
    for p in range(a.seeds):
        for s in range(a.finetune_seeds):
            k = finetune_seed(p, s, a.finetune_seeds)
            tasks.append(("scratch", f"{ft_dir}/scratch/seed{k}", "main_finetune.py", [*ft, "--seed", str(k)],
                          p, k, None))
        tasks.append(("probe_random", f"{probe_dir}/random/seed{p}", "main_finetune.py",
                      [*probe, "--seed", str(p)], p, p, None))
    for p in range(a.seeds):
        ckpt = f"{pool.name}/{tag}/seed{p}"
        init = ["--finetune", str(out / ckpt)]
        for s in range(a.finetune_seeds):
            k = finetune_seed(p, s, a.finetune_seeds)
            tasks.append(("finetuned", f"{ft_dir}/{tag}/pt{p}_seed{k}", "main_finetune.py",
                          [*ft, "--seed", str(k), *init], p, k, ckpt))
        tasks.append(("probe_pretrained", f"{probe_dir}/{tag}/pt{p}_seed{p}", "main_finetune.py",
                      [*probe, "--seed", str(p), *init], p, p, ckpt))
    runs = run_all(tasks, out, a.threads, a.jobs)

    report = build_report(runs, a.seeds)
    report.update(settings={k: v for k, v in vars(a).items()}, data_fingerprint=fingerprint,
                  labelled_videos=n_train, test_videos=len((lists / "test.csv").read_text().splitlines()),
                  finetune_steps=ft_epochs * steps_per_epoch, probe_steps=probe_epochs * steps_per_epoch, runs=runs)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print_report(report)
    return report


def by_seed(runs: list[dict], arm: str) -> dict[int, list[dict]]:
    """The runs of one arm grouped by pretraining seed, each group in seed order."""
    groups: dict[int, list[dict]] = {}
    for r in runs:
        if r["arm"] == arm:
            groups.setdefault(r["pretrain_seed"], []).append(r)
    return {p: sorted(rs, key=lambda r: r["seed"]) for p, rs in sorted(groups.items())}


def paired_gains(runs: list[dict], arm: str, baseline: str) -> dict[int, list[float]]:
    """Per pretraining seed: top-1 of `arm` minus `baseline` for each shared fine-tuning seed."""
    base = {(r["pretrain_seed"], r["seed"]): r["top1"] for r in runs if r["arm"] == baseline}
    gains: dict[int, list[float]] = {}
    for p, rs in by_seed(runs, arm).items():
        gains[p] = [r["top1"] - base[(p, r["seed"])] for r in rs]
    return gains


def build_report(runs: list[dict], seeds: int) -> dict:
    """Arm statistics over all runs, paired gains per pretraining seed and over seeds, the target check."""
    arms = {}
    for arm in ("scratch", "finetuned", "probe_random", "probe_pretrained"):
        accs = [r["top1"] for r in runs if r["arm"] == arm]
        arms[arm] = {**summarize(accs), "runs": accs}
    gain = paired_gains(runs, "finetuned", "scratch")
    probe_gain = paired_gains(runs, "probe_pretrained", "probe_random")
    per_seed = [statistics.fmean(gain[p]) for p in range(seeds)]
    probe_per_seed = [statistics.fmean(probe_gain[p]) for p in range(seeds)]
    ft_gain, pr_gain = summarize(per_seed), summarize(probe_per_seed)
    target = {"mean_gain_ge_10": ft_gain["mean"] >= 10, "every_seed_positive": all(g > 0 for g in per_seed),
              "probe_gain_ge_5": pr_gain["mean"] >= 5, "seeds_ge_3": seeds >= 3}
    minutes = {arm: [r["minutes"] for r in runs if r["arm"] == arm] for arm in ("pretrain", *arms)}
    return dict(arms=arms, gain_per_seed={str(p): g for p, g in gain.items()}, gain=ft_gain,
                probe_gain_per_seed={str(p): g for p, g in probe_gain.items()}, probe_gain=pr_gain,
                target=target, target_met=all(target.values()), minutes=minutes)


def _pm(s: dict) -> str:
    """'mean +- std' to one decimal."""
    return f"{s['mean']:.1f} +- {s['std']:.1f}"


def _ci(s: dict) -> str:
    """'[lo, hi]' of a 95% interval."""
    return f"[{s['ci95'][0]:+.1f}, {s['ci95'][1]:+.1f}]"


def _took(values: list[float]) -> str:
    """Mean minutes of the runs that ran now ('reused' when none did)."""
    ran = [v for v in values if v == v]  # nan: an earlier run's result, reused
    return f"{statistics.fmean(ran):.1f}" if ran else "reused"


def print_report(rep: dict) -> None:
    """The markdown table, the paired gains with intervals, the target check and every command."""
    s = rep["settings"]
    print(f"\ndata fingerprint {rep['data_fingerprint']}; {rep['labelled_videos']} labelled train videos, "
          f"{rep['test_videos']} test videos, chance {100 / NUM_CLASSES:.1f}%; {s['seeds']} pretraining seeds x "
          f"{s['finetune_seeds']} fine-tuning seeds; {s['threads']} thread(s) per run\n")
    labels = {"scratch": f"fine-tune from random init ({rep['finetune_steps']} steps)",
              "finetuned": "fine-tune from MAE-ST pretraining (same recipe, steps, seeds)",
              "probe_random": f"linear probe, random frozen encoder ({rep['probe_steps']} steps)",
              "probe_pretrained": "linear probe, MAE-ST frozen encoder"}
    print("| run | runs | test top-1 (%), mean +- std | single runs | minutes per run |\n| --- | ---: | ---: | --- | ---: |")
    print(f"| MAE-ST pretraining ({s['mask_type']} masking {s['mask_ratio']:.0%}, {s['pretrain_epochs']} epochs "
          f"of the unlabelled pool) | {s['seeds']} | | | {_took(rep['minutes']['pretrain'])} |")
    for arm, label in labels.items():
        st = rep["arms"][arm]
        print(f"| {label} | {st['n']} | {_pm(st)} | {', '.join(f'{v:.1f}' for v in st['runs'])} | "
              f"{_took(rep['minutes'][arm])} |")
    for name, per, st in (("fine-tuning", rep["gain_per_seed"], rep["gain"]),
                          ("linear-probe", rep["probe_gain_per_seed"], rep["probe_gain"])):
        seeds = "; ".join(f"seed {p}: {statistics.fmean(g):+.1f} ({', '.join(f'{x:+.1f}' for x in g)})"
                          for p, g in per.items())
        print(f"\npaired {name} gain per pretraining seed: {seeds}")
        print(f"{name} gain over pretraining seeds: {st['mean']:+.1f} +- {st['std']:.1f}, 95% interval {_ci(st)}")
    t = rep["target"]
    print(f"\ntarget (mean gain >= +10, every seed's gain > 0, probe gain >= +5, >= 3 seeds): "
          f"{'met' if rep['target_met'] else 'not met'} ({', '.join(f'{k}={v}' for k, v in t.items())})")
    total = sum(v for r in rep["runs"] if (v := r["minutes"]) == v)
    print(f"total minutes of the runs made now: {total:.1f}\n\ncommands:")
    for r in rep["runs"]:
        print(f"# {r['arm']} (pretraining seed {r['pretrain_seed']}, seed {r['seed']})\n{r['cmd']}")


if __name__ == "__main__":
    main()
