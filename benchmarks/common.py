"""What the benchmarks share, so that each of them measures the training code rather than code of its own.

- Running the training scripts: `run_script` runs `main_pretrain.py` / `main_finetune.py` (or any script) to
  completion in a subprocess with its log in a file, and reuses a finished run (its result file exists);
  `launch` is the one subprocess call under it (also for the scripts that run other benchmarks).
- Timing train steps: `build_backend` builds the backend as training does (`util.parallel.setup_parallel` in one
  process), `train_step_fn` steps it with `util.engine.train_step` (the function the training loop calls), and
  `time_in_turn` times several such steps in turn so that machine load hits all alike.
- Task losses: the one place a benchmark takes a task's loss from (see the marked section below).
- Generated videos: `moving_texture_video` (one real-format H.264 file) and `motion_pool` (the generated motion
  videos with a few labelled per class).
- Result files: `write_result_file` writes `<benchmark>_<hardware>_<yyyymmdd>.md` (command, environment, the output
  as printed, the raw JSON); `recording` is how a script's `--results DIR` flag (`add_results_flag`) uses it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets.synthetic import ensure_synthetic_dataset, write_video  # noqa: E402
from tasks.common import MaskingConfig, StartConfig  # noqa: E402
from tasks.mae import MAEConfig, MAETask  # noqa: E402
from tasks.videotext import batch_loss as videotext_batch_loss  # noqa: E402
from util.config import OptimConfig, ParallelConfig  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.engine import LossFn, train_step  # noqa: E402
from util.parallel import Backend, setup_parallel  # noqa: E402


# ============================================================================ running the scripts
def script_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH (and OMP_NUM_THREADS when given)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, **extra}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def shown_command(cmd: list[str]) -> str:
    """`python SCRIPT ARGS` as typed in the repository root: repository paths relative, empty or spaced args quoted."""
    return "python " + " ".join(c if c and " " not in c else repr(c) for c in cmd[1:]).replace(str(ROOT) + "/", "")


def children_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes (and of the data workers they waited for)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Launch:
    """How a subprocess ended: its exit code (None: stopped at the timeout), wall and children's CPU seconds."""

    code: int | None
    seconds: float
    cpu_seconds: float


def launch(cmd: list[str], log: Path | None, env: dict[str, str], timeout: float | None = None) -> Launch:
    """Run `cmd` in the repository root, its output to `log` (headed by the command; None: this terminal)."""
    start, cpu = time.time(), children_cpu_seconds()
    with contextlib.ExitStack() as stack:
        out = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(open(log, "w"))
            out.write(" ".join(cmd) + "\n\n")
            out.flush()
        try:
            code: int | None = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if out
                                              else None, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    return Launch(code, time.time() - start, children_cpu_seconds() - cpu)


def log_tail(log: Path, lines: int = 20) -> str:
    """The last non-empty lines of a log file (or 'no output')."""
    text = [line for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return "\n".join(text[-lines:]) or "no output"


@dataclass
class ScriptRun:
    """A finished run of a script: its command line, its wall and CPU minutes (nan: an earlier run was reused)."""

    command: str
    minutes: float = math.nan
    cpu_minutes: float = math.nan

    @property
    def reused(self) -> bool:
        """True when no run was made now (an earlier, finished one was reused)."""
        return self.minutes != self.minutes


def finished_marker(script: str, output_dir: Path) -> Path:
    """The file a finished run leaves: main_finetune.py's test result, else (pretraining) its latest checkpoint."""
    return output_dir / ("eval_test.json" if "finetune" in Path(script).name else "checkpoints/latest")


def run_script(script: str, output_dir: Path, args: list[str], *, threads: int = 1, log: Path | None = None,
               done: Callable[[], bool] | None = None, result: Callable[[], bool] | None = None,
               label: str = "", launcher: tuple[str, ...] = ()) -> ScriptRun:
    """Run `python [LAUNCHER] SCRIPT --output_dir OUT ARGS` to completion, unless `done()` says a finished run is
    there to reuse (LAUNCHER: e.g. `-m torch.distributed.run --nproc_per_node 8`).

    `done` defaults to `finished_marker` existing, `result` (what must hold after the run) to `done`, `log` to OUT's
    parent / '<OUT's name>.log'. A failed run, or one that ends without its result, stops the benchmark
    (SystemExit) naming its log.
    """
    cmd = [sys.executable, *launcher, script, "--output_dir", str(output_dir), *args]
    shown, label = shown_command(cmd), label or output_dir.name
    is_done = done or finished_marker(script, output_dir).exists
    if is_done():
        print(f"reusing {label} (a finished run in {output_dir}; delete it to rerun)", flush=True)
        return ScriptRun(shown)
    log = log or output_dir.parent / f"{output_dir.name}.log"
    print(f"running {label}: {shown}\n  (log: {log})", flush=True)
    run = launch(cmd, log, script_env(threads))
    if run.code != 0:
        raise SystemExit(f"{label} failed (exit {run.code}); see {log}:\n{log_tail(log)}")
    if not (result or is_done)():
        raise SystemExit(f"{label} finished without its result; see {log}")
    return ScriptRun(shown, run.seconds / 60, run.cpu_seconds / 60)


# ============================================================================ task losses
# The benchmarks' losses are the tasks' own (tasks/mae.py, tasks/videotext.py), for a plain batch in one process.
def mae_loss(mask_ratio: float) -> LossFn:
    """MAETask.loss (random masking, no AMT attention maps) at `mask_ratio`: the loss of batch['clips'], batch['noise']."""
    return MAETask(StartConfig(), MaskingConfig(mask_ratio=mask_ratio), MAEConfig()).loss


def videotext_loss_fn(mask_ratio: float) -> LossFn:
    """VideoTextTask's loss in one process: InfoNCE (+ the MAE term, when built with it) at `mask_ratio`."""
    return functools.partial(videotext_batch_loss, mask_ratio=mask_ratio)


# ============================================================================ timing train steps
def one_process(device: torch.device) -> DistInfo:
    """Rank 0 of a one-process run on `device`."""
    return DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)


def job_info(device: str) -> DistInfo:
    """This process's place: a rank of the job when started by torchrun with several ranks (joining its process
    group: util.distributed picks cuda:LOCAL_RANK or the CPU with gloo), else one process on `device`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from util.distributed import init_distributed

        return init_distributed()
    return one_process(torch.device(device))


def build_backend(model: nn.Module, device: torch.device, precision: str = "fp32", dist: str = "ddp",
                  grad_ckpt: bool = False, compile: str = "none", micro_batch: int = 1,
                  optim: OptimConfig | None = None, info: DistInfo | None = None,
                  hsdp_shard_size: str = "0") -> Backend:
    """The training backend of `model` as main_pretrain.py builds it (AdamW at lr 1e-4): in one process, or as
    rank `info` of a job (`job_info`; `hsdp_shard_size` as --hsdp_shard_size)."""
    parallel = ParallelConfig(dist=dist, precision=precision, grad_ckpt=grad_ckpt, compile=compile,
                              hsdp_shard_size=hsdp_shard_size)
    return setup_parallel(model, parallel, optim or OptimConfig(), 1e-4, info or one_process(device), accum_iter=1,
                          micro_batch=micro_batch)


def train_step_fn(backend: Backend, batch: dict, loss_fn: LossFn) -> Callable[[], torch.Tensor]:
    """One optimiser step on `batch` through util.engine.train_step, as the training loop takes it; returns the loss."""
    def step() -> torch.Tensor:
        return train_step(backend, [batch], loss_fn, 1)[0]

    return step


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turn(steps: dict[str, Callable[[], Any]], rounds: int, device: torch.device, warmup: int = 0,
                 alternate: bool = False) -> dict[str, list[float]]:
    """Seconds of each step over `rounds` rounds, the steps timed in turn (A, B, A, B, ...) so that machine load
    hits all alike; `warmup` more rounds come first, untimed; `alternate` reverses the order every other round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(warmup + rounds):
        for name in (reversed(names) if alternate and r % 2 == 0 else names):
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window (CUDA allocator, or the process's resident-memory high-water mark)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets VmHWM
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def current_memory(device: torch.device) -> int:
    """Bytes in use now (CUDA allocator, or the process's resident memory)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(device: torch.device) -> int:
    """Peak bytes since reset_peak_memory (CUDA allocator, or the process's VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ============================================================================ generated videos
def moving_texture_video(path: str, width: int, height: int, seconds: int = 10, fps: int = 30, gop: int = 250,
                         seed: int = 0) -> str:
    """Write a textured, moving H.264 video once (fixed GOP; atomically); reuse it if present.

    A texture panning over the whole frame plus a moving bright disc: motion everywhere, like real footage.
    """
    if os.path.isfile(path):
        return path
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    texture = np.kron(base, np.ones((8, 8, 1), np.uint8))[:height, :width]
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((seconds * fps, height, width, 3), np.uint8)
    for t in range(len(frames)):
        f = np.roll(texture, (t * 2, t * 3), axis=(0, 1))
        f[(xx - (t * 7) % width) ** 2 + (yy - height / 2) ** 2 < (height / 6) ** 2] = 255
        frames[t] = f
    tmp = path + ".tmp.mp4"
    write_video(tmp, frames, fps, gop_size=gop)
    os.replace(tmp, path)
    return path


def motion_pool(out: Path, num_videos: int, labels_per_class: int, size: int = 32, object_scale: float = 2.0,
                speed_scale: float = 2.0, object_texture: str = "stripes") -> tuple[Path, Path]:
    """The generated motion videos (one-colour background; made once, cached under `out` by their settings) and a
    folder of lists: `labels_per_class` labelled train videos per class (0: all), and val + test as the test list."""
    pool = Path(ensure_synthetic_dataset(str(out), num_videos, size=size, seed=0, background="plain",
                                         object_scale=object_scale, speed_scale=speed_scale,
                                         object_texture=object_texture))
    lists = pool / f"labelled_{labels_per_class or 'all'}"
    lists.mkdir(parents=True, exist_ok=True)
    per_class: dict[str, list[str]] = {}
    for row in (pool / "train.csv").read_text().splitlines():
        per_class.setdefault(row.split()[1], []).append(row)
    keep = [r for rs in per_class.values() for r in rs[:labels_per_class or None]]
    (lists / "train.csv").write_text("".join(r + "\n" for r in keep))
    (lists / "test.csv").write_text((pool / "val.csv").read_text() + (pool / "test.csv").read_text())
    return pool, lists


# ============================================================================ the motion-set probes' recipes
# pretrain_helps.py's and probe_compare.py's: the micro MAE-ST, its fine-tuning and its linear probe on the generated
# motion videos (motion_pool), and the statistics over seeds they report.
MOTION_SIZE, MOTION_CLASSES = 32, 8
CLIP = ["--input_size", str(MOTION_SIZE), "--num_frames", "8", "--sampling_rate", "2", "--t_patch_size", "2",
        "--precision", "fp32", "--log_every", "50"]
# MAE-ST on 8 frames x 32 px (4 x 4 x 4 tokens). Pixel targets without per-patch normalisation: on a
# one-colour background a flat patch normalised by its own variance is amplified noise.
PRETRAIN = ["--model", "mae_vit_micro_patch8", "--no-norm_pix_loss", "--pred_t_dim", "8",
            "--decoder_num_heads", "4", "--repeat_aug", "2", "--blr", "1.2e-2", "--warmup_epochs", "1",
            "--clip_grad", "0", "--vis_every", "0", "--save_every", "0"]
# One recipe for both arms: the labels are motions, so no flips, rotations, mixup or erasing.
FINETUNE = ["--opt_betas", "0.9", "0.95", "--model", "vit_micro_patch8", "--num_classes", str(MOTION_CLASSES),
            "--repeat_aug", "1", "--blr", "8e-3", "--layer_decay", "1.0", "--drop_path_rate", "0.0",
            "--smoothing", "0.0", "--min_crop_scale", "0.8", "--no-hflip", "--rand_aug", "",
            "--reprob", "0.0", "--mixup", "0.0", "--cutmix", "0.0", "--clip_grad", "0", "--eval_split", "test",
            "--eval_every", "0", "--test_num_temporal_views", "2", "--test_num_spatial_crops", "1"]
LINPROBE = ["--linprobe", "--blr", "8e-2", "--weight_decay", "0.0"]

def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution (bisection on its CDF; the CDF by Simpson's rule)."""
    # No scipy in requirements.txt; the integrand is smooth, so 2000 Simpson panels are plenty.
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        n = 2000
        h = x / n
        f = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation and 95% Student-t interval of the mean (nan when one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


# ============================================================================ result files
# One measurement, one file: benchmarks/results/<benchmark>_<hardware>_<yyyymmdd>.md, written by the script itself.
RESULTS_HELP = ("also write a result file DIR/<benchmark>_<hardware>_<yyyymmdd>.md: the command, the environment, "
                "the output as printed and the raw JSON (never overwrites: a second one that day gets -2, -3, ...)")
_GPU_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "intel"}


def add_results_flag(parser: argparse.ArgumentParser) -> None:
    """Add `--results DIR` (default off) to a benchmark's parser."""
    parser.add_argument("--results", default="", metavar="DIR", help=RESULTS_HELP)


def _slug(text: str) -> str:
    """Lower-case letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def hardware_name(device: str | torch.device = "cpu") -> str:
    """The file name's hardware: 'cpu<N>core' for the CPU, the GPU's model slugged for CUDA ('NVIDIA H200' -> 'h200')."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        words = [w for w in torch.cuda.get_device_name(dev).split() if w.lower() not in _GPU_VENDOR_WORDS]
        model = []
        for word in words:  # up to the first word with a digit: 'RTX 4090' -> rtx4090, 'A100-SXM4-80GB' -> a100
            model.append(word.split("-")[0])
            if any(c.isdigit() for c in word):
                break
        return _slug("".join(model)) or "gpu"
    return f"cpu{os.cpu_count()}core"


def training_device() -> str:
    """Where main_pretrain.py's runs train (util.distributed): 'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _git(*args: str) -> str:
    """Output of a git command in the repository root ('' when git or the repository is missing)."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _load() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None


def environment(device: str | torch.device = "cpu", load_start: float | None = None) -> dict[str, Any]:
    """What a result depends on: device, cores, Python, torch, PyAV, FFmpeg, git commit and state, load average."""
    from importlib.metadata import PackageNotFoundError, version

    dev = torch.device(device)
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    if dev.type == "cuda" and torch.cuda.is_available():
        name = f"{torch.cuda.get_device_name(dev)} ({torch.cuda.device_count()} visible), CUDA {torch.version.cuda}"
    else:
        name = f"CPU: {_cpu_model()}"
    try:
        pyav = version("av")
    except PackageNotFoundError:
        pyav = "not installed"
    ffmpeg = "unknown"
    with contextlib.suppress(ImportError, AttributeError):
        import av

        info = getattr(av, "ffmpeg_version_info", None)
        codec = av.library_versions.get("libavcodec")
        ffmpeg = info or ("libavcodec " + ".".join(map(str, codec)) if codec else "unknown")
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"device": name, "cores": cores, "cores_usable": usable, "python": platform.python_version(),
            "torch": torch.__version__, "pyav": pyav, "ffmpeg": ffmpeg, "platform": platform.platform(),
            "git_commit": commit or "unknown", "git_dirty": dirty, "load_start": load_start, "load_end": _load()}


def _fenced(text: str, lang: str) -> str:
    """`text` in a fenced block whose fence is longer than any backtick run inside it."""
    runs = [len(m) for m in re.findall(r"`{3,}", text)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _claim(path: Path, text: str) -> Path:
    """Write `text` to `path` or, when taken, to the first free `<stem>-2`, `-3`, ...; never overwrites."""
    for n in range(1, 10_000):
        candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            with open(candidate, "x", encoding="utf-8") as f:  # exclusive create: no race, no overwrite
                f.write(text)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name for {path}")


def command_line(script: str, argv: list[str] | None = None) -> str:
    """`python SCRIPT ARGS` as typed in the repository root (argv: the script's arguments; None: sys.argv[1:])."""
    path = Path(script).resolve()
    shown = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return shlex.join(["python", shown, *(sys.argv[1:] if argv is None else argv)])


def write_result_file(results_dir: str | Path, benchmark: str, output: str, data: Any, command: str,
                      device: str | torch.device = "cpu", *, hardware: str = "", load_start: float | None = None,
                      day: str = "") -> Path:
    """Write `<benchmark>_<hardware>_<yyyymmdd>.md` into `results_dir` (a free name: never overwrites); returns it."""
    hardware = hardware or hardware_name(device)
    day = day or time.strftime("%Y%m%d")
    if not re.fullmatch(r"[a-z0-9_-]+", benchmark) or not re.fullmatch(r"[a-z0-9]+", hardware) \
            or not re.fullmatch(r"\d{8}", day):
        raise ValueError(f"bad result file name parts: {benchmark!r}, {hardware!r}, {day!r}")
    env = environment(device, load_start)
    git = env["git_commit"] + {True: " (dirty: tracked files modified)", False: " (clean)", None: ""}[env["git_dirty"]]
    load = ", ".join(f"{when} {v:.2f}" for when, v in (("at start", env["load_start"]), ("at end", env["load_end"]))
                     if v is not None) or "not available"
    text = "\n\n".join([
        f"# {benchmark} ({hardware}), {day[:4]}-{day[4:6]}-{day[6:]}",
        "Written by the benchmark's `--results` flag (`benchmarks/common.py`, `write_result_file`); not edited by hand.",
        "## Command", _fenced(command, "bash"),
        "## Environment",
        "\n".join([f"- Device: {env['device']}",
                   f"- Cores: {env['cores']} ({env['cores_usable']} usable by the process at the end)",
                   f"- Python {env['python']}, torch {env['torch']}, PyAV {env['pyav']}, FFmpeg {env['ffmpeg']}",
                   f"- Platform: {env['platform']}",
                   f"- Git commit: {git}",
                   f"- Load average (1 min): {load}",
                   f"- Written: {time.strftime('%Y-%m-%d %H:%M:%S %z')}"]),
        "## Output (as printed)", _fenced(output, "text"),
        "## Raw JSON", _fenced(json.dumps(data, indent=1, default=str), "json"),
    ]) + "\n"
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _claim(out / f"{benchmark}_{hardware}_{day}.md", text)


def read_result_json(path: str | Path) -> Any:
    """The raw JSON of a result file written by write_result_file."""
    text = Path(path).read_text(encoding="utf-8")
    m = re.search(r"^## Raw JSON\n\n(`{3,})json\n(.*?)\n\1$", text, re.S | re.M)
    if m is None:
        raise ValueError(f"{path} has no raw JSON block")
    return json.loads(m.group(2))


class _Tee:
    """A text stream that writes to `stream` and keeps a copy."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@dataclass
class Recording:
    """What a `recording` block writes at its end: set `data` (and `benchmark`, `device`, `hardware` if they change)."""

    benchmark: str
    command: str
    device: str | torch.device = "cpu"
    hardware: str = ""
    data: Any = None
    path: Path | None = None


@contextlib.contextmanager
def recording(results_dir: str | Path | None, benchmark: str, script: str, argv: list[str] | None = None,
              device: str | torch.device = "cpu", hardware: str = "") -> Iterator[Recording]:
    """Keep what the block prints; at its end (no exception) write it with `rec.data` to a result file in
    `results_dir` (None or '': nothing is kept or written). `script`, `argv`: the command line to record."""
    rec = Recording(benchmark, command_line(script, argv), device, hardware)
    if not results_dir:
        yield rec
        return
    load_start, stdout = _load(), sys.stdout
    tee = sys.stdout = _Tee(stdout)
    try:
        yield rec
    finally:
        sys.stdout = stdout
    rec.path = write_result_file(results_dir, rec.benchmark, "".join(tee.parts), rec.data, rec.command, rec.device,
                                 hardware=rec.hardware, load_start=load_start)
    print(f"result file: {rec.path}", flush=True)
