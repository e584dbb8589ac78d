"""benchmarks/common.py's result files: the name, the sections, a JSON block that round-trips, no overwriting;
and a real benchmark (memory_plan.py, computed: no training) writing one with `--results`."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, memory_plan  # noqa: E402

DATA = {"rows": [{"backend": "ddp", "total": 3.3128380775451660, "ok": True}], "note": None, "n": 7}
SECTIONS = ("## Command", "## Environment", "## Output (as printed)", "## Raw JSON")


def test_result_file_has_the_name_the_sections_and_json_that_round_trips(tmp_path: Path) -> None:
    output = "| a | b |\n| --- | --- |\n| 1 | 2 |\na fence inside: ```json\n"
    path = common.write_result_file(tmp_path / "results", "bench_step-mask-sweep", output, DATA,
                                    "python benchmarks/bench_step.py --results results", "cpu")
    assert path.name == f"bench_step-mask-sweep_{common.hardware_name('cpu')}_{time.strftime('%Y%m%d')}.md"
    assert re.fullmatch(r"[a-z0-9_-]+_[a-z0-9]+_20\d{6}\.md", path.name)
    text = path.read_text()
    assert [text.index(s) for s in SECTIONS] == sorted(text.index(s) for s in SECTIONS)
    assert "python benchmarks/bench_step.py --results results" in text and output.strip() in text
    for field in ("Device: CPU", "Cores:", "Python ", "torch ", "PyAV ", "FFmpeg ", "Git commit:", "Load average"):
        assert field in text, field
    assert common.read_result_json(path) == DATA


def test_result_file_never_overwrites(tmp_path: Path) -> None:
    first = common.write_result_file(tmp_path, "demo", "one", {"run": 1}, "python x.py", hardware="cpu2core",
                                     day="20261201")
    second = common.write_result_file(tmp_path, "demo", "two", {"run": 2}, "python x.py", hardware="cpu2core",
                                      day="20261201")
    third = common.write_result_file(tmp_path, "demo", "three", {"run": 3}, "python x.py", hardware="cpu2core",
                                     day="20261201")
    assert [p.name for p in (first, second, third)] == [
        "demo_cpu2core_20261201.md", "demo_cpu2core_20261201-2.md", "demo_cpu2core_20261201-3.md"]
    assert [common.read_result_json(p)["run"] for p in (first, second, third)] == [1, 2, 3]
    with pytest.raises(ValueError):
        common.write_result_file(tmp_path, "Bad Name", "", {}, "python x.py")


def test_hardware_is_cores_on_the_cpu_and_the_gpu_model_slugged(monkeypatch: pytest.MonkeyPatch) -> None:
    assert re.fullmatch(r"cpu\d+core", common.hardware_name("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, slug in (("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA H100 80GB HBM3", "h100"),
                       ("NVIDIA GeForce RTX 4090", "rtx4090")):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None, n=name: n)
        assert common.hardware_name("cuda") == slug


def test_recording_without_a_folder_keeps_and_writes_nothing(tmp_path: Path) -> None:
    stdout = sys.stdout
    with common.recording("", "demo", __file__, []) as rec:
        assert sys.stdout is stdout
        rec.data = {"x": 1}
    assert rec.path is None and not any(tmp_path.iterdir())


@pytest.mark.slow  # end-to-end subprocess runs (10-60 s on 2 cores): .ci/run's slow step runs it
def test_memory_plan_results_flag_writes_what_the_script_returns(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "mae_vit_large_patch16", "--fit_gib", "68", "--results", str(tmp_path)]  # as docs/performance.md
    data = memory_plan.main(argv)
    printed = capsys.readouterr().out
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"memory_plan_computed_{time.strftime('%Y%m%d')}.md"]
    assert common.read_result_json(files[0]) == json.loads(json.dumps(data)) == data
    text = files[0].read_text()
    assert "python benchmarks/memory_plan.py " + " ".join(argv) in text
    table = printed.split("result file:")[0].strip()
    assert "| zero3 |" in table and table in text  # the table exactly as printed
    memory_plan.main(argv)
    assert len(list(tmp_path.iterdir())) == 2  # a second run the same day: a second file


BENCHMARKS = ("bench_step", "bench_train", "bench_data", "gpu_report", "memory_plan", "masking_ablation",
              "objectives_bench", "pretrain_helps", "videotext_bench", "downstream",
              "probe_compare")


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_has_the_results_flag_and_records_through_common(script: str) -> None:
    """Each script adds --results (off by default) and writes through common.recording, nothing of its own."""
    import argparse
    import importlib

    source = (Path(common.ROOT) / "benchmarks" / f"{script}.py").read_text()
    assert "add_results_flag(" in source and "recording(" in source, script
    assert 'add_argument("--results"' not in source, f"{script} defines --results itself"
    assert callable(importlib.import_module(f"benchmarks.{script}").main)  # importable, nothing run
    p = argparse.ArgumentParser()
    common.add_results_flag(p)
    assert p.parse_args([]).results == ""  # off unless asked
