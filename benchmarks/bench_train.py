"""End-to-end pretraining throughput: is the model or the input pipeline the bottleneck, and do they overlap?

Runs `main_pretrain.py --bench model,loader,e2e`: the real training run (its task, dataset, DataLoader,
backend, compile and the run loop itself) measured three ways in one process:
  model-only  the same batch again and again from device memory (`--modes model`)
  loader-only the DataLoader iterated without the model
  end-to-end  both, through the training loop
and prints clips/s, data-wait share, MFU and peak memory. Overlap is good when end-to-end reaches
~90% of the slower of model-only and loader-only.

    python benchmarks/bench_train.py                                  # demo config (CPU)
    python benchmarks/bench_train.py --model mae_vit_small_patch16 --input_size 112 --num_frames 16 \\
        --pred_t_dim 8 --decoder_embed_dim 512 --decoder_depth 4 --decoder_num_heads 16 --batch_size 2 \\
        --repeat_aug 2 --num_workers 1 --synthetic_size 128
    python benchmarks/bench_train.py --nproc 8 --config configs/pretrain/vit_l_k400.yaml --data_path K400 \\
        --num_workers 14 --batch_size 8 --repeat_aug 1                # one 8-GPU node
Flags other than the benchmark's own (--steps, --modes, --nproc, --out, --json, --results) are main_pretrain.py
flags. `--results DIR` also writes a result file (`benchmarks/common.py`, `write_result_file`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_results_flag, hardware_name, launch, recording, script_env  # noqa: E402


def bench_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own flags; the rest go to main_pretrain.py."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed optimiser steps per mode")
    p.add_argument("--modes", default="model,loader,e2e", help="comma-separated subset of model,loader,e2e")
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --nproc_per_node)")
    p.add_argument("--out", default="", help="output folder of the measured run (default: a temporary one)")
    p.add_argument("--json", default="", help="also write the measured dict (OUT/bench.json) to this file")
    add_results_flag(p)
    return p.parse_known_args(argv)


def run(argv: list[str], steps: int, modes: str, nproc: int, out: str) -> dict:
    """Run main_pretrain.py in --bench mode and return what it wrote to OUT/bench.json."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    cmd = [*launcher, str(ROOT / "main_pretrain.py"), *argv, "--bench", modes, "--bench_steps", str(steps),
           "--output_dir", out, "--no-auto_resume", "--save_every", "0", "--vis_every", "0"]
    code = launch(cmd, None, script_env()).code
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)
    return json.loads((Path(out) / "bench.json").read_text())


def table(res: dict, argv: list[str]) -> str:
    """The markdown table of one --bench run."""
    lines = [f"\nmain_pretrain.py {' '.join(argv)}", f"{res['device']}, {res['world_size']} rank(s), "
             f"{res['threads']} compute thread(s), {res['clips_per_step_per_rank']} clips/step/rank, "
             f"{(res['flops_per_clip'] or 0) / 1e9:.2f} GFLOP per clip (fwd+bwd), peak "
             f"{res['peak_flops'] / 1e12:.3f} TFLOP/s, {res['steps']} timed steps per mode\n",
             "| mode | clips/s per rank | step (s) | data wait | MFU |", "| --- | ---: | ---: | ---: | ---: |"]
    names = {"model": "model only", "loader": "loader only", "e2e": "end to end"}
    for mode, row in res["bench"].items():
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else ""
        lines.append(f"| {names[mode]} | {row['clips_per_s']:.2f} | {row['step_s']:.3f} | "
                     f"{100 * row['data_wait']:.0f}% | {mfu} |")
    rows = res["bench"]
    if {"model", "loader", "e2e"} <= rows.keys():
        bound = min(rows["model"]["clips_per_s"], rows["loader"]["clips_per_s"])
        lines.append(f"\nend to end / min(model only, loader only) = {rows['e2e']['clips_per_s'] / bound:.2f} "
                     "(target >= 0.90)")
    lines.append(f"peak memory {res['peak_mem_gb']:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Measure and print the table; returns the measured dict."""
    bargs, rest = bench_args(sys.argv[1:] if argv is None else argv)
    with recording(bargs.results, "bench_train", __file__, argv) as rec:
        with tempfile.TemporaryDirectory() as tmp:
            res = run(rest, bargs.steps, bargs.modes, bargs.nproc, bargs.out or tmp)
        print(table(res, rest))
        rec.data = {**res, "argv": rest}
        if not res["device"].startswith("CPU"):  # the GPUs it ran on: h200, or 8xh200 for 8 ranks
            rec.device = "cuda"
            rec.hardware = f"{res['world_size']}x{hardware_name('cuda')}" if res["world_size"] > 1 else ""
    if bargs.json:
        Path(bargs.json).write_text(json.dumps(rec.data, indent=1))
    return res


if __name__ == "__main__":
    main()
