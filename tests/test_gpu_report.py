"""benchmarks/gpu_report.py: the targets are judged from the scripts' JSON, and the smoke mode runs every row.

The smoke run is `--quick --device cpu --compile none`: every row's script through the training path at
tiny sizes, eager only (inductor's C++ builds take minutes on 2 cores). It and the full `--quick`, with
the compiled rows, are slow tests: the default suite keeps the targets' unit test. Neither checks a speed:
the figures only have to exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_report  # noqa: E402


def step_json(*results: tuple[str, str, float, float]) -> dict:
    """A bench_step --json payload with (name, compile, median_s, mfu) results."""
    return {"device": "NVIDIA H200", "torch": "2.11.0", "results": [
        {"name": n, "compile": c, "median_s": t, "mfu": m} for n, c, t, m in results]}


def by_target(data: dict, hf: bool = True) -> dict[str, tuple[str, str]]:
    return {what.split(":")[0].split(" (")[0]: (value, state) for what, value, _, state in gpu_report.targets(data, hf)}


def test_targets_pass_and_miss_from_the_scripts_json() -> None:
    """Each target reads its row: the best compile mode for MFU, eager against eager for HF, 0% vs 90% masking."""
    data = {
        "step_small": step_json(("ours (eager)", "none", 0.052, 0.074), ("ours (model)", "model", 0.012, 0.31),
                                ("hf VideoMAE", "none", 0.077, 0.05)),
        "step_large": step_json(("ours (eager)", "none", 0.10, 0.20), ("ours (model)", "model", 0.054, 0.285)),
        "sweep": {"mask_sweep": [{"ratio": 0.0, "median_s": 0.086, "flops_per_step": 7.9},
                                 {"ratio": 0.75, "median_s": 0.058, "flops_per_step": 2.5},
                                 {"ratio": 0.9, "median_s": 0.060, "flops_per_step": 1.0}]},
        "huge": None,
        "e2e": {"bench": {"model": {"clips_per_s": 332.0}, "loader": {"clips_per_s": 141.0},
                          "e2e": {"clips_per_s": 135.0}}},
    }
    got = by_target(data)
    assert got["model-only MFU at the small batch"] == ("31.0%", "PASS")
    assert got["model-only MFU at the large batch"] == ("28.5%", "MISS")
    assert got["masking"] == ("1.43x / 7.90x = 0.18", "MISS")
    assert got["ViT-H, FSDP2 + act. ckpt"] == ("-", "not measured")
    assert got["ours vs HF VideoMAE at the small batch, both eager"] == ("1.48x", "PASS")
    assert got["end to end / min(model only, loader only)"] == ("0.96", "PASS")
    assert by_target({}, hf=False)["ours vs HF VideoMAE at the small batch, both eager"] == (
        "-", "skipped (transformers not installed)")


def test_vit_g_rows_fsdp_with_checkpointing_and_hsdp_over_the_gpus() -> None:
    """Row 10 is ViT-g/14 under FSDP2 + checkpointing; row 11 its HSDP twin under torchrun (2 replicas), planned
    only with two or more ranks; the smoke sizes stand in the micro model and 2 CPU processes for both."""
    rows = dict(gpu_report.plan_rows(gpu_report.FULL, "cuda", "d", False, False, hsdp=8))
    giant, hsdp = rows["giant"], rows["giant_hsdp"]
    assert giant[giant.index("--model") + 1] == "mae_vit_giant_patch14" and "--grad-ckpt" in giant
    assert giant[giant.index("--dist") + 1] == "fsdp" and "--hsdp-shard-size" not in giant
    assert hsdp[:2] == ["-m", "torch.distributed.run"] and hsdp[hsdp.index("--nproc_per_node") + 1] == "8"
    assert hsdp[hsdp.index("--hsdp-shard-size") + 1] == "4" and hsdp[hsdp.index("--batch") + 1] == "8"
    assert "giant_hsdp" not in dict(gpu_report.plan_rows(gpu_report.FULL, "cuda", "d", False, False, hsdp=0))
    assert gpu_report.hsdp_ranks("cpu", quick=True) == 2 and gpu_report.hsdp_ranks("cpu", quick=False) == 0
    quick = dict(gpu_report.plan_rows(gpu_report.QUICK, "cpu", "d", False, True, hsdp=2))["giant_hsdp"]
    assert quick[quick.index("--model") + 1] == "mae_vit_micro_patch8" and quick[quick.index("--hsdp-shard-size") + 1] == "1"
    text = gpu_report.table(gpu_report.FULL, {}, False, "### h", "n", hsdp_planned=False)
    assert "| 11 | giant/14, HSDP + act. ckpt, 8 clips per GPU |  | skipped (one GPU: HSDP needs two or more)" in text
    assert "| 10 | giant/14, FSDP2 + act. ckpt, 8 clips | " in text and "not run (time budget)" in text


def run_quick(out: Path, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "MAE_ST_CACHE": str(out / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--quick", "--device", "cpu",
                           "--out", str(out / "report"), "--budget_s", "3000", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def check_table(stdout: str, out: Path, compiled: bool) -> list[str]:
    """Every row measured (none failed or skipped for time), the heading names the versions; returns the rows."""
    table = stdout[stdout.index("### --quick"):]
    assert "torch " in table.splitlines()[0] and "PyAV " in table.splitlines()[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]
    numbers = {line.split(" | ")[0].strip("| ") for line in rows}
    assert numbers == {"4", "5", "6", "7", "8", "9", "10", "11", "target"}
    assert any(r.startswith("| 11 |") and "2 ranks, HSDP 1" in r for r in rows), rows  # 2 gloo processes
    assert not [r for r in rows if "failed" in r or "timed out" in r or "not run" in r], rows
    assert "end to end" in table and "clips/s (data wait" in table and "ATen ops/step" in table
    assert ("compile model" in table) == compiled
    assert len([r for r in rows if r.startswith("| target")]) == 6
    assert table.split("\n\nTotal")[0] in (out / "report" / "report.md").read_text()  # the file holds the table
    return rows


@pytest.mark.slow  # 6 subprocess runs of the scripts: minutes on 2 cores (19 min at load 17-25), over the default suite's budget
def test_quick_cpu_smoke_run_measures_every_row(tmp_path: Path) -> None:
    """--quick --device cpu --compile none: rows 4-11 each measured by its script, and the six targets judged."""
    check_table(run_quick(tmp_path, "--compile", "none"), tmp_path, compiled=False)


@pytest.mark.slow
def test_quick_cpu_run_with_compiled_rows(tmp_path: Path) -> None:
    """The full --quick: also the whole-model compile (row 5), with fewer host ops than eager."""
    rows = check_table(run_quick(tmp_path), tmp_path, compiled=True)
    ops = {("model" if "compile model" in r else "eager"): int(r.split(" ATen ops/step")[0].rsplit(", ", 1)[1])
           for r in rows if r.startswith("| 5 |") and "ATen ops/step" in r}
    assert ops["model"] < ops["eager"] / 2  # the compiled step dispatches a fraction of the eager step's ops


def test_report_refuses_a_python_without_its_packages_naming_them_and_the_offline_install() -> None:
    """A bare machine's Python (here: site-packages off, `-S`) has none of the rows' packages: the report says which
    before any row starts, and how to install them from wheels prepared elsewhere."""
    proc = subprocess.run([sys.executable, "-S", "-I", str(ROOT / "benchmarks" / "gpu_report.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "every row needs torchvision, timm, av, numpy, pyyaml, pillow, tqdm" in proc.stderr
    assert "pip install --no-index --find-links wheels/" in proc.stderr and "without internet" in proc.stderr
    assert "[gpu_report]" not in proc.stdout  # no row started


def test_missing_optional_packages_are_listed_as_skipped_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each optional package not installed gives one line naming its rows and the fix (printed and under the table)."""
    assert gpu_report.missing_packages(["numpy", "no-such-package-for-gpu-report"]) == ["no-such-package-for-gpu-report"]
    monkeypatch.setitem(gpu_report.OPTIONAL, "no-such-package-for-gpu-report", "row 99")
    lines = gpu_report.optional_skips()
    assert [line for line in lines if "row 99" in line] == [
        "skipping row 99: no-such-package-for-gpu-report is not installed (pip install -r requirements-bench.txt, "
        f"or from wheels: {gpu_report.OFFLINE})"]
