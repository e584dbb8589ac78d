"""The task registry and scoped flags (docs/tasks.md): the documented example task runs as written,
--help and YAML checks cover one objective's flags, renamed and foreign flags are refused by name,
a task's fixed flags are applied without touching the caller's config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tasks  # noqa: E402
from util.config import ConfigError, parse_args, run_config  # noqa: E402


def _example_code() -> str:
    text = (ROOT / "docs" / "tasks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "class FrameMAETask" in b)
    assert len(code.strip().splitlines()) < 60  # the promise of the docs: under 60 lines
    return code


def test_documented_example_task_trains_through_main_pretrain(tmp_path: Path) -> None:
    """The docs' code block, saved as a module and registered with one line, trains two steps."""
    (tmp_path / "frame_mae_example.py").write_text(_example_code())
    script = (f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT)!r}]\n"
              "import tasks, main_pretrain\n"
              "tasks.PRETRAIN['frame_mae'] = 'frame_mae_example'\n"
              "main_pretrain.main(tasks.parse('pretrain', sys.argv[1:]))\n")
    out = tmp_path / "run"
    argv = ["--objective", "frame_mae", "--model", "mae_vit_micro_patch8", "--input_size", "32", "--num_frames", "4",
            "--synthetic_videos", "24", "--repeat_aug", "1", "--batch_size", "2", "--num_workers", "0", "--epochs", "1",
            "--max_steps", "2", "--log_every", "1", "--frame_mask_ratio", "0.5", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2] and all(r["loss"] > 0 for r in logged)


def _help(objective: str | None) -> str:
    argv = ["--objective", objective] if objective else []
    return tasks.pretrain_parser(argv).format_help()


def test_help_lists_the_shared_flags_and_only_that_objectives_own() -> None:
    mae, rho, vt = _help(None), _help("rho_byol"), _help("videotext")
    for flag in ("--batch_size", "--dist", "--synthetic_videos", "--init_from"):
        assert flag in mae and flag in rho and flag in vt
    for flag in ("--rho ", "--moco_queue", "--proj_dim", "--text_width", "--train_captions", "--videotext_eval"):
        assert flag not in mae, flag
    assert "--mask_ratio" in mae and "--vis_every" in mae and "--mask_ratio" not in rho and "--rho " in rho
    assert "--text_width" in vt and "--vis_every" not in vt and "generated demo data" in mae


@pytest.mark.parametrize(("argv", "message"), [
    (["--objective", "videotext", "--eval", "retrieval"], "--eval was renamed: use --videotext_eval"),
    (["--objective", "videotext", "--no-hflip"], "--hflip was renamed: use --videotext_hflip"),
    (["--objective", "rho_byol", "--mask_ratio", "0.5"], "--mask_ratio is a flag of --objective mae / videotext"),
    (["--moco_queue", "16"], "--moco_queue is a flag of --objective rho_byol / rho_moco"),
])
def test_renamed_and_foreign_flags_are_refused_by_name(argv: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        tasks.parse("pretrain", argv)
    assert message in capsys.readouterr().err


def test_yaml_keys_of_another_objective_or_renamed_are_refused_naming_the_file(tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    for text, message in (("objective: videotext\nhflip: false\n", "key 'hflip': hflip was renamed: use "
                           "--videotext_hflip"), ("rho: 3\n", "key 'rho': rho is a flag of --objective rho_byol")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        with pytest.raises(SystemExit):
            tasks.parse("pretrain", ["--config", str(cfg)])
        err = capsys.readouterr().err
        assert str(cfg) in err and message in err, err


def test_objective_comes_from_the_config_file_and_picks_its_demo() -> None:
    recipe = str(ROOT / "configs" / "pretrain" / "vit_b_k400_rho_moco.yaml")
    assert tasks.objective_of(["--config", recipe]) == "rho_moco"
    assert tasks.default_config("pretrain", ["--objective", "videotext"]).endswith("videotext_demo.yaml")
    assert tasks.default_config("pretrain", []).endswith("demo.yaml")
    args = tasks.parse("pretrain", ["--objective", "rho_moco"])
    assert args.objective == "rho_moco" and args.config.endswith("rho_demo.yaml")


def test_a_tasks_fixed_flags_are_applied_and_recorded_without_changing_the_callers_config() -> None:
    from tasks.rho import RhoTask
    from util.trainer import apply_overrides

    argv = ["--objective", "rho_byol", "--rho", "3", "--repeat_aug", "1"]
    args = parse_args(tasks.pretrain_parser(argv), argv)
    cfg, values = run_config(args), {"repeat_aug": 1}
    task = tasks.task_module("rho_byol").make_task(args)
    assert isinstance(task, RhoTask)
    fixed = apply_overrides(cfg, task.run_overrides(), values)
    assert fixed.data.repeat_aug == 3 and values["repeat_aug"] == 3 and cfg.data.repeat_aug == 1
    with pytest.raises(ConfigError, match="no shared flag"):
        apply_overrides(cfg, {"rho": 2}, {})
