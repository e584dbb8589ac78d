"""One GPU report: every speed and memory figure of issue 13 on one GPU, with its targets, as one table.

    python benchmarks/gpu_report.py                          # one GPU, under 10 minutes (rows 10-11: issue 30)
    python benchmarks/gpu_report.py --data_path /data/k400   # end to end on your videos (train.csv)
    python benchmarks/gpu_report.py --quick --device cpu     # the same code paths at tiny sizes (a smoke run)

Every figure is measured through the training path, each by its own script in a subprocess that
writes JSON (`--json`), so nothing here times code of its own:
  4  end to end: `bench_train.py` -> `main_pretrain.py --bench model,loader,e2e` (ViT-L recipe, 14
     workers, forkserver) on real-format H.264 that this script writes once, the moving texture of
     bench_data.py (`benchmarks.common.moving_texture_video`): 568x320, 10 s, 30 fps, a keyframe every
     250 frames, as Kinetics ships after the usual resize to 320p; or on `--data_path`;
  5  model only, ViT-L 16x224 bf16, 8 clips: `bench_step.py`, eager, compiled per block, whole, and whole
     with CUDA graphs (`--compile none,blocks,model,model-cudagraphs`, timed in turn), against Hugging
     Face VideoMAE when `transformers` is installed;
  6  the same at 32 clips;
  7  the mask sweep 0 / 0.75 / 0.9 / 0.95 at 8 clips;
  8  ViT-H, FSDP2 + activation checkpointing, 16 clips (eager and per-block compile; HF with
     gradient checkpointing when installed);
  9  memory of ViT-L at 8 clips, measured (`memory_plan.py --measure`) against computed;
 10  ViT-g/14 model only, FSDP2 + activation checkpointing per block, 8 clips per GPU, eager (issue 30);
 11  the same as HSDP when the machine has more than one GPU: `torchrun --nproc_per_node G bench_step.py
     --hsdp-shard-size G/2` (2 replicas x G/2 shards, clips per GPU as row 10);
then the issue's targets with PASS or MISS. Before any row, the packages the rows import are checked
(`NEEDED`; a missing one stops the report naming it and the offline install of docs/performance.md), and
each optional one missing (`OPTIONAL`) is named with the rows it skips. Rows run in that order of cost-benefit; a row that fails
or times out says so in its cell and the others still run; rows that would start after `--budget_s`
are listed as not run. The table, the JSON of every row and each script's log go to `--out`;
`--results DIR` also writes them as one result file (`benchmarks/common.py`, `write_result_file`).
`--quick` shrinks every size (micro model, also standing in for ViT-H and ViT-g, 4x32 clips, two short
96x54 videos, 1 worker; row 11 as 2 gloo processes on the CPU: a 2 x 1 mesh) and
compiles one model only (the whole model at the small batch: inductor's C++ builds cost about a
minute of CPU per model), so a 2-core CPU runs it in about 3 minutes; its figures check the code,
not a GPU. (Per-block compile under FSDP2 + checkpointing is tests/test_parallel_compile.py's.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))
# What every row's script imports besides torch (pip names; each loads the project's models and data code),
# and the optional packages with the rows they add. A bare GPU machine often has torch only.
NEEDED = ("torchvision", "timm", "av", "numpy", "pyyaml", "pillow", "tqdm")
OPTIONAL = {"transformers": "the Hugging Face VideoMAE rows (5, 8) and the 1.3x target"}
OFFLINE = "docs/performance.md, 'A GPU machine without internet'"


def missing_packages(names: tuple[str, ...] | list[str]) -> list[str]:
    """The pip packages of `names` not installed in this Python."""
    from importlib.metadata import PackageNotFoundError, distribution

    out = []
    for name in names:
        try:
            distribution(name)
        except PackageNotFoundError:
            out.append(name)
    return out


def optional_skips() -> list[str]:
    """One line per optional package not installed: the rows skipped, and how to add them."""
    return [f"skipping {rows}: {name} is not installed (pip install -r requirements-bench.txt, or from wheels: "
            f"{OFFLINE})" for name, rows in OPTIONAL.items() if missing_packages([name])]


def check_requirements() -> list[str]:
    """Exit naming the missing packages every row needs and how to install them offline; returns the
    messages of the optional rows that will be skipped (also printed)."""
    missing = missing_packages(NEEDED)
    if missing:
        sys.exit(f"gpu_report: every row needs {', '.join(missing)}, not installed in Python "
                 f"{platform.python_version()} ({sys.executable}). Install them: pip install -r requirements.txt, "
                 f"or without internet from wheels prepared for this Python ({OFFLINE}): "
                 f"pip install --no-index --find-links wheels/ {' '.join(missing)}")
    skipped = optional_skips()
    for line in skipped:
        print(f"[gpu_report] {line}", flush=True)
    return skipped


if __name__ == "__main__":
    check_requirements()  # before importing the project's code, which needs them

from benchmarks.common import (  # noqa: E402
    add_results_flag,
    launch,
    log_tail,
    moving_texture_video,
    recording,
    script_env,
)
from datasets.synthetic import cached_build  # noqa: E402

COMPILED = ("blocks", "model")


@dataclass(frozen=True)
class Sizes:
    """What each row runs: the issue's shapes, or tiny ones for --quick."""

    model: str = "mae_vit_large_patch16"
    huge: str = "mae_vit_huge_patch16"
    frames: int = 16
    img: int = 224
    small_batch: int = 8
    large_batch: int = 32
    huge_batch: int = 16
    giant: str = "mae_vit_giant_patch14"
    giant_batch: int = 8
    dtype: str = "bf16"
    steps: int = 20
    warmup: int = 3
    # compile modes per row ("none" = eager): both compile paths are timed against eager
    small_compile: str = "none,blocks,model,model-cudagraphs"
    large_compile: str = "none,blocks,model,model-cudagraphs"
    huge_compile: str = "none,blocks"
    budget_s: float = 600.0  # default --budget_s: no row starts after it
    # end to end: recipe, overrides, timed steps per mode, generated videos
    e2e_args: tuple[str, ...] = ("--config", "configs/pretrain/vit_l_k400.yaml", "--batch_size", "4",
                                 "--num_workers", "14", "--repeat_aug", "4")
    e2e_steps: int = 40
    video_size: tuple[int, int] = (568, 320)  # width, height: 320p
    video_seconds: int = 10
    videos: int = 8
    list_lines: int = 256
    memory_args: tuple[str, ...] = ("--batch_size", "2", "--repeat_aug", "4")  # 8 clips
    mm_size: int = 8192


FULL = Sizes()
TINY_MODEL = ("--model", "mae_vit_micro_patch8", "--input_size", "32", "--num_frames", "4", "--pred_t_dim", "2",
              "--decoder_embed_dim", "64", "--decoder_depth", "1", "--decoder_num_heads", "4")
QUICK = Sizes(model="mae_vit_micro_patch8", huge="mae_vit_micro_patch8", giant="mae_vit_micro_patch8", giant_batch=2,
              budget_s=230.0, frames=4, img=32, small_batch=2, large_batch=4, huge_batch=4, steps=3, warmup=1, small_compile="none,model", large_compile="none",
              huge_compile="none",
              e2e_args=("--config", "configs/pretrain/vit_l_k400.yaml", *TINY_MODEL, "--batch_size", "2",
                        "--num_workers", "1", "--repeat_aug", "2"),
              e2e_steps=3, video_size=(96, 54), video_seconds=2, videos=2, list_lines=16,
              memory_args=("--batch_size", "2", "--repeat_aug", "1"), mm_size=256)


# ----------------------------------------------------------------------------- data for row 4
def ensure_video_set(sizes: Sizes) -> str:
    """A cached folder of generated H.264 videos and a train.csv listing them `list_lines` times in all."""
    width, height = sizes.video_size
    params = dict(width=width, height=height, seconds=sizes.video_seconds, videos=sizes.videos,
                  lines=sizes.list_lines, gop=250, fps=30, version=2)  # 2: benchmarks.common's moving texture

    def build(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "videos"))
        # One at a time: libx264 already encodes on every core. (Encoding here is fork-safe for the rows:
        # they start as new programs, never as forks of this process.)
        for i in range(sizes.videos):
            moving_texture_video(os.path.join(tmp, "videos", f"{i:03d}.mp4"), width, height, sizes.video_seconds,
                                 seed=i)
        rows = [f"videos/{i % sizes.videos:03d}.mp4 {i % 4}" for i in range(sizes.list_lines)]
        Path(tmp, "train.csv").write_text("\n".join(rows) + "\n")

    return cached_build("gpu_report_videos", params, "train.csv", build)


# ----------------------------------------------------------------------------- running the scripts
@dataclass
class RowRun:
    """One script's run: its JSON, or why there is none, and how long it took."""

    key: str
    data: dict | None = None
    error: str = ""
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)


def run_script(key: str, argv: list[str], out: Path, timeout: float, env: dict[str, str]) -> RowRun:
    """Run `python <argv> --json OUT/<key>.json`; its output goes to OUT/logs/<key>.log."""
    json_path, log_path = out / f"{key}.json", out / "logs" / f"{key}.log"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, *argv, "--json", str(json_path)]
    run = RowRun(key, command=cmd)
    done = launch(cmd, log_path, env, timeout)
    run.seconds = done.seconds
    if done.code is None:
        run.error = f"timed out after {timeout:.0f} s (log: {log_path})"
    elif done.code != 0 or not json_path.exists():
        run.error = f"failed (exit {done.code}): {log_tail(log_path, 1)[:160]} (log: {log_path})"
    else:
        run.data = json.loads(json_path.read_text())
    return run


def step_argv(s: Sizes, device: str, model: str, batch: int, compile_modes: str, *extra: str) -> list[str]:
    """bench_step.py at the report's shapes."""
    return [str(BENCH / "bench_step.py"), "--device", device, "--dtype", s.dtype, "--model", model,
            "--frames", str(s.frames), "--img", str(s.img), "--batch", str(batch), "--mask-ratio", "0.9",
            "--steps", str(s.steps), "--warmup", str(s.warmup), "--compile", compile_modes,
            "--mm-size", str(s.mm_size), *extra]


def hsdp_ranks(device: str, quick: bool) -> int:
    """Ranks of row 11 (HSDP): every GPU when there are 2 or more; 2 gloo processes for the CPU smoke run; else 0."""
    if device == "cpu":
        return 2 if quick else 0
    import torch

    n = torch.cuda.device_count()
    return n if n > 1 else 0


def plan_rows(s: Sizes, device: str, data_path: str, hf: bool, eager_only: bool,
              hsdp: int = 0) -> list[tuple[str, list[str]]]:
    """(key, script argv) of every row, in the order they run; `hsdp` ranks for row 11 (0: not run)."""
    def modes(m: str) -> str:
        return "none" if eager_only else m

    peer = ["--peer", "hf"] if hf else []
    return [
        ("e2e", [str(BENCH / "bench_train.py"), "--steps", str(s.e2e_steps), *s.e2e_args, "--data_path", data_path,
                 "--precision", s.dtype]),
        ("step_small", step_argv(s, device, s.model, s.small_batch, modes(s.small_compile), *peer, "--profile")),
        ("sweep", step_argv(s, device, s.model, s.small_batch, "none", "--mask-sweep", "0,0.75,0.9,0.95")),
        ("step_large", step_argv(s, device, s.model, s.large_batch, modes(s.large_compile), "--profile")),
        ("huge", step_argv(s, device, s.huge, s.huge_batch, modes(s.huge_compile), "--dist", "fsdp", "--grad-ckpt",
                           *peer)),
        ("memory", [str(BENCH / "memory_plan.py"), "--model", s.model, "--num_frames", str(s.frames), "--input_size",
                    str(s.img), *s.memory_args, "--world_size", "1",
                    "--backend", "ddp", "--precision", s.dtype, "--measure", "--device", device]),
        ("giant", step_argv(s, device, s.giant, s.giant_batch, "none", "--dist", "fsdp", "--grad-ckpt")),
    ] + ([("giant_hsdp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(hsdp),
                          *step_argv(s, device, s.giant, s.giant_batch, "none", "--dist", "fsdp", "--grad-ckpt",
                                     "--hsdp-shard-size", str(hsdp // 2))])] if hsdp > 1 else [])


# ----------------------------------------------------------------------------- the table
def ours(step: dict | None) -> list[dict]:
    """Our models' results of a bench_step JSON (not the peer's)."""
    return [r for r in (step or {}).get("results", []) if not r["name"].startswith("hf")]


def best_mfu(step: dict | None) -> float | None:
    """The best MFU over our compile modes, or None when not measured."""
    values = [r["mfu"] for r in ours(step)]
    return max(values) if values else None


def hf_ratio(step: dict | None) -> float | None:
    """HF VideoMAE's median step over our eager median at the same shapes (>= 1: ours faster)."""
    results = (step or {}).get("results", [])
    peer = [r for r in results if r["name"].startswith("hf")]
    eager = [r for r in ours(step) if r["compile"] == "none"]
    return peer[0]["median_s"] / eager[0]["median_s"] if peer and eager else None


def sweep_efficiency(sweep: dict | None) -> tuple[float, float, float] | None:
    """(speed-up of 90% masking over 0%, FLOP ratio, speed-up / FLOP ratio) of a mask sweep."""
    rows = {round(r["ratio"], 2): r for r in (sweep or {}).get("mask_sweep", [])}
    if 0.0 not in rows or 0.9 not in rows:
        return None
    speedup = rows[0.0]["median_s"] / rows[0.9]["median_s"]
    flops = rows[0.0]["flops_per_step"] / rows[0.9]["flops_per_step"]
    return speedup, flops, speedup / flops


def e2e_share(e2e: dict | None) -> float | None:
    """End-to-end clips/s over min(model only, loader only)."""
    rows = (e2e or {}).get("bench", {})
    if not {"model", "loader", "e2e"} <= rows.keys():
        return None
    return rows["e2e"]["clips_per_s"] / min(rows["model"]["clips_per_s"], rows["loader"]["clips_per_s"])


def status(value: float | None, target: float, why_missing: str = "not measured") -> str:
    """PASS / MISS against a lower bound, or why there is no value."""
    if value is None:
        return why_missing
    return "PASS" if value >= target else "MISS"


def targets(data: dict[str, dict | None], hf: bool) -> list[tuple[str, str, str, str]]:
    """The issue's targets: (what, measured, target, PASS / MISS / why not)."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    mfu_large, mfu_small, mfu_huge = (best_mfu(data.get(k)) for k in ("step_large", "step_small", "huge"))
    sweep, ratio, share = sweep_efficiency(data.get("sweep")), hf_ratio(data.get("step_small")), e2e_share(data.get("e2e"))
    no_hf = "skipped (transformers not installed)" if not hf else "not measured"
    return [
        ("model-only MFU at the large batch (best compile mode)", pct(mfu_large), ">= 45%", status(mfu_large, 0.45)),
        ("model-only MFU at the small batch (best compile mode)", pct(mfu_small), ">= 30%", status(mfu_small, 0.30)),
        ("masking: (step at 0%) / (step at 90%) over the FLOP ratio", "-" if sweep is None else
         f"{sweep[0]:.2f}x / {sweep[1]:.2f}x = {sweep[2]:.2f}", ">= 0.60", status(None if sweep is None else sweep[2], 0.6)),
        ("ViT-H, FSDP2 + act. ckpt: MFU (best compile mode)", pct(mfu_huge), ">= 40%", status(mfu_huge, 0.40)),
        ("ours vs HF VideoMAE at the small batch, both eager", "-" if ratio is None else f"{ratio:.2f}x", ">= 1.30x",
         status(ratio, 1.3, no_hf)),
        ("end to end / min(model only, loader only)", "-" if share is None else f"{share:.2f}", ">= 0.90",
         status(share, 0.9)),
    ]


def step_cells(step: dict | None) -> list[tuple[str, str]]:
    """(setting, result) per model of a bench_step JSON."""
    cells = []
    for r in (step or {}).get("results", []):
        mode = "eager" if r["compile"] == "none" else f"compile {r['compile']}"
        ops = f", {r['ops']['aten_ops']} ATen ops/step" if r.get("ops") else ""
        cells.append((f"{r['name'].split(' (')[0]}, {mode}",
                      f"{r['median_s']:.4f} s/step, {r['clips_per_s']:.1f} clips/s, {r['tflops']:.2f} TFLOP/s, "
                      f"MFU {100 * r['mfu']:.1f}%, peak {r['peak_mem_gib']:.2f} GiB{ops}"))
    return cells


def table(s: Sizes, runs: dict[str, RowRun], hf: bool, header: str, data_note: str,
          hsdp_planned: bool = True) -> str:
    """The one markdown table: measurements (rows 4-11) then the targets; `hsdp_planned`: row 11 was to run."""
    lines = [header, "", "| # | measurement | setting | result | target | status | s |",
             "| --- | --- | --- | --- | --- | --- | ---: |"]

    def add(num: str, what: str, setting: str, result: str, target: str = "", state: str = "", secs: str = "") -> None:
        lines.append(f"| {num} | {what} | {setting} | {result} | {target} | {state} | {secs} |")

    def missing(run: RowRun | None) -> str:
        return "not run (time budget)" if run is None else run.error

    model = s.model.replace("mae_vit_", "").replace("_patch", "/")
    geometry = f"{model} {s.frames}x{s.img}, mask 0.9, {s.dtype}"
    e2e = runs.get("e2e")
    if e2e and e2e.data:
        b = e2e.data["bench"]
        add("4", "end to end, real-format H.264", f"{data_note}; {e2e.data['clips_per_step_per_rank']} clips/step, "
            f"{' '.join(s.e2e_args[2:])}", f"model only {b['model']['clips_per_s']:.1f}, loader only "
            f"{b['loader']['clips_per_s']:.1f}, end to end {b['e2e']['clips_per_s']:.1f} clips/s (data wait "
            f"{100 * b['e2e']['data_wait']:.0f}%)", secs=f"{e2e.seconds:.0f}")
    else:
        add("4", "end to end, real-format H.264", data_note, missing(e2e))
    for num, key, what in (("5", "step_small", f"model only, {s.small_batch} clips"),
                           ("6", "step_large", f"model only, {s.large_batch} clips")):
        run = runs.get(key)
        if run and run.data:
            for i, (setting, result) in enumerate(step_cells(run.data)):
                add(num, what, f"{geometry}; {setting}", result, secs=f"{run.seconds:.0f}" if i == 0 else "")
        else:
            add(num, what, geometry, missing(run))
        if key == "step_small" and not hf:
            add(num, "HF VideoMAE, same shapes", geometry, "skipped (transformers not installed)")
    sweep = runs.get("sweep")
    if sweep and sweep.data:
        rows = sweep.data["mask_sweep"]
        add("7", f"mask sweep, {s.small_batch} clips", f"{model} {s.frames}x{s.img}, {s.dtype}, eager",
            " / ".join(f"{r['ratio']:g}: {r['median_s']:.4f} s" for r in rows), secs=f"{sweep.seconds:.0f}")
    else:
        add("7", "mask sweep", geometry, missing(sweep))
    huge = runs.get("huge")
    huge_name = s.huge.replace("mae_vit_", "").replace("_patch", "/")
    if huge and huge.data:
        for i, (setting, result) in enumerate(step_cells(huge.data)):
            add("8", f"{huge_name}, FSDP2 + act. ckpt, {s.huge_batch} clips", setting, result,
                secs=f"{huge.seconds:.0f}" if i == 0 else "")
    else:
        add("8", f"{huge_name}, FSDP2 + act. ckpt", f"{s.huge_batch} clips", missing(huge))
    mem = runs.get("memory")
    if mem and mem.data and mem.data.get("measured"):
        for m in mem.data["measured"]:
            add("9", f"memory, {mem.data['clips_per_gpu']} clips, 1 device", f"{model}, {s.dtype}, act. ckpt "
                f"{'on' if m['grad_ckpt'] else 'off'}", f"measured {m['peak']:.2f} GiB (states {m['states']:.2f}), "
                f"computed {m['computed_1gpu']:.2f} GiB [{m['method']}]", secs=f"{mem.seconds:.0f}" if not m['grad_ckpt'] else "")
    else:
        add("9", "memory, measured vs computed", geometry, missing(mem))
    giant_name = s.giant.replace("mae_vit_", "").replace("_patch", "/")
    for num, key, what in (("10", "giant", f"{giant_name}, FSDP2 + act. ckpt, {s.giant_batch} clips"),
                           ("11", "giant_hsdp", f"{giant_name}, HSDP + act. ckpt, {s.giant_batch} clips per GPU")):
        run = runs.get(key)
        if run and run.data:
            ranks = run.data.get("world_size", 1)
            mesh = f"{ranks} ranks, HSDP {run.data['args']['hsdp_shard_size']}; " if key == "giant_hsdp" else ""
            for i, (setting, result) in enumerate(step_cells(run.data)):
                add(num, what, f"{mesh}{setting}", result, secs=f"{run.seconds:.0f}" if i == 0 else "")
        elif key == "giant_hsdp" and run is None and not hsdp_planned:
            add(num, what, "", "skipped (one GPU: HSDP needs two or more)")
        else:
            add(num, what, geometry, missing(run))
    data = {k: r.data for k, r in runs.items()}
    for what, value, target, state in targets(data, hf):
        add("target", what, "", value, target, state)
    return "\n".join(lines)


def versions(device: str, runs: dict[str, RowRun]) -> str:
    """Device name (as the scripts saw it), torch, PyAV, Python and CUDA versions: the table's heading."""
    from importlib.metadata import PackageNotFoundError, version

    seen = [r.data for r in runs.values() if r.data and "device" in r.data]
    name = seen[0]["device"] if seen else ("a GPU (no row ran)" if device == "cuda" else f"CPU ({os.cpu_count()} cores)")
    torch_v = seen[0].get("torch") if seen and seen[0].get("torch") else version("torch")
    try:
        av_v = version("av")
    except PackageNotFoundError:
        av_v = "not installed"
    cuda = next((d["cuda"] for d in seen if d.get("cuda")), None)
    return f"{name}, torch {torch_v}, PyAV {av_v}, Python {platform.python_version()}{f', CUDA {cuda}' if cuda else ''}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the same code paths in minutes (CPU smoke run)")
    p.add_argument("--data_path", default="", help="videos with a train.csv for row 4 (default: generated H.264)")
    p.add_argument("--out", default="runs/gpu_report", help="the table, each row's JSON and each script's log")
    p.add_argument("--budget_s", type=float, default=0.0,
                   help="start no row after this many seconds (default 600, --quick 230)")
    p.add_argument("--compile", choices=["all", "none"], default="all",
                   help="none: eager rows only (skips every torch.compile build; a fast smoke run)")
    add_results_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Run every row, print the table (also OUT/report.md, OUT/report.json); returns the table."""
    args = parse_args(argv)
    name = "gpu_report-quick" if args.quick else "gpu_report"
    with recording(args.results, name, __file__, argv, device=args.device) as rec:
        report, rec.data = measure(args)
    return report


def measure(args: argparse.Namespace) -> tuple[str, dict]:
    """Run every row and print the table; returns it and report.json's dict."""
    start = time.time()
    sizes = QUICK if args.quick else FULL
    budget = args.budget_s or sizes.budget_s
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = script_env(PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        # Tiny CPU models are dispatch-bound: a second intra-op thread only spins (and hides no GPU).
        env.setdefault("OMP_NUM_THREADS", "1")
        env["CUDA_VISIBLE_DEVICES"] = ""
    hf = importlib.util.find_spec("transformers") is not None
    if args.data_path:
        data_path, data_note = args.data_path, f"--data_path {args.data_path}"
    else:
        data_path = ensure_video_set(sizes)
        w, h = sizes.video_size
        data_note = (f"{sizes.videos} generated {w}x{h} H.264 videos ({sizes.video_seconds} s, 30 fps, keyframe "
                     f"every 250 frames) x {sizes.list_lines // sizes.videos} list lines")
    runs: dict[str, RowRun] = {}
    hsdp = hsdp_ranks(args.device, args.quick)
    for key, argv_row in plan_rows(sizes, args.device, data_path, hf, args.compile == "none", hsdp):
        left = budget - (time.time() - start)
        if left <= 0:
            print(f"[gpu_report] {key}: not run (past the {budget:.0f} s budget)", flush=True)
            continue
        # A row may overrun the budget by up to a minute on its own; a hung one is stopped.
        run = run_script(key, argv_row, out, timeout=left + 60, env=env)
        runs[key] = run
        print(f"[gpu_report] {key}: {'ok' if run.data else run.error} ({run.seconds:.0f} s)", flush=True)
    header = f"### {'--quick: tiny sizes, code paths only; ' if args.quick else ''}{versions(args.device, runs)}"
    report = table(sizes, runs, hf, header, data_note, hsdp_planned=hsdp > 1)
    skipped = optional_skips()
    if skipped:
        report += "\n\n" + "\n".join(f"Not measured: {line}." for line in skipped)
    report += f"\n\nTotal {time.time() - start:.0f} s. Logs and JSON: {out}/"
    print("\n" + report)
    (out / "report.md").write_text(report + "\n")
    data = {k: {"data": r.data, "error": r.error, "seconds": r.seconds, "command": r.command} for k, r in runs.items()}
    (out / "report.json").write_text(json.dumps(data, indent=1))
    return report, data


if __name__ == "__main__":
    main()
