"""Configuration: YAML defaults under CLI flags, clear errors before any work, resolved config saved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from main_pretrain import DEMO_CONFIG, get_args_parser
from util.config import flag_values, parse_args, save_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_sets_defaults_and_cli_overrides(tmp_path: Path) -> None:
    cfg = write(tmp_path, "batch_size: 7\nmask_ratio: 0.95\nnorm_pix_loss: false\ndist: fsdp\n")
    args = parse_args(get_args_parser(), ["--config", cfg, "--batch_size", "3"])
    assert args.batch_size == 3 and args.mask_ratio == 0.95 and args.dist == "fsdp"
    assert args.norm_pix_loss is False
    # A boolean set in YAML can be switched back on (and off) from the command line.
    assert parse_args(get_args_parser(), ["--config", cfg, "--norm_pix_loss"]).norm_pix_loss is True
    assert parse_args(get_args_parser(), ["--no-grad_ckpt"]).grad_ckpt is False


def test_demo_config_is_the_default() -> None:
    args = parse_args(get_args_parser(), [], default_config=DEMO_CONFIG)
    assert args.model == "mae_vit_micro_patch8" and args.config == DEMO_CONFIG


@pytest.mark.parametrize(
    "text,needle",
    [
        ("batch_sise: 4\n", "batch_sise"),
        ("dist: horovod\n", "dist"),
        ("mask_type: checkerboard\n", "mask_type"),
        ("epochs: many\n", "epochs"),
        ("grad_ckpt: 1\n", "grad_ckpt"),
        ("batch_size: 2.5\n", "batch_size"),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path: Path, text: str, needle: str, capsys) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(SystemExit):
        parse_args(get_args_parser(), ["--config", cfg])
    err = capsys.readouterr().err
    assert needle in err and "cfg.yaml" in err


def test_bad_choice_on_the_command_line_lists_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(get_args_parser(), ["--precision", "fp8"])
    assert "fp32" in capsys.readouterr().err


def test_saved_config_round_trips(tmp_path: Path) -> None:
    parser = get_args_parser()
    args = parse_args(parser, ["--batch_size", "5", "--no-cls_embed"], default_config=DEMO_CONFIG)
    args.lr = 0.123  # derived values that are real flags are kept
    save_config(flag_values(args, parser), tmp_path / "config.yaml")
    again = parse_args(get_args_parser(), ["--config", str(tmp_path / "config.yaml")])
    assert vars(again) | {"config": None} == vars(args) | {"config": None}
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["cls_embed"] is False


@pytest.mark.parametrize("text,needle", [("unknown_key: 1\n", "unknown_key"), ("dist: mpi\n", "dist")])
def test_script_rejects_bad_config_before_any_work(tmp_path: Path, text: str, needle: str) -> None:
    cfg = write(tmp_path, text + f"output_dir: {tmp_path / 'out'}\n")
    proc = subprocess.run(
        [sys.executable, "main_pretrain.py", "--config", cfg], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


# ----------------------------------------------------------------------------- hostile config files
def _error(tmp_path: Path, text: str | bytes, capsys, argv: tuple[str, ...] = ()) -> str:
    """parse_args on a config file holding `text`: the usage error it exits with."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit):
        parse_args(get_args_parser(), ["--config", str(cfg), *argv])
    return capsys.readouterr().err


def test_yaml_aliases_are_refused_and_messages_stay_short(tmp_path: Path, capsys) -> None:
    """An alias bomb under a known key is refused as such; a huge literal value is shown bounded."""
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]  # 9**7 leaves
    err = _error(tmp_path, "\n".join(levels) + "\nbatch_size: *a6\n", capsys)
    assert "cfg.yaml" in err and "anchors and aliases" in err and "line 1" in err
    err = _error(tmp_path, "batch_size: [" + ", ".join(["12345"] * 200_000) + "]\n", capsys)
    assert "cfg.yaml" in err and "batch_size" in err and len(err.splitlines()[-1]) < 500  # after the usage text


def test_deeply_nested_yaml_names_the_file(tmp_path: Path, capsys) -> None:
    """PyYAML composes nesting recursively: 20,000 brackets under a known key are refused, not a RecursionError."""
    err = _error(tmp_path, "batch_size: " + "[" * 20_000 + "1" + "]" * 20_000 + "\n", capsys)
    assert "cfg.yaml nests lists or mappings too deeply" in err


def test_duplicate_keys_are_refused_naming_key_and_lines(tmp_path: Path, capsys) -> None:
    err = _error(tmp_path, "batch_size: 2\nepochs: 3\nbatch_size: 4\n", capsys)
    assert "cfg.yaml" in err and "'batch_size' appears twice (lines 1 and 3)" in err


def test_null_for_a_flag_with_a_value_names_the_key(tmp_path: Path, capsys) -> None:
    """`batch_size: null` stops at parse time (it reached the trainer as None before)."""
    err = _error(tmp_path, "batch_size: null\n", capsys)
    assert "cfg.yaml" in err and "'batch_size' is null" in err and "default 2" in err
    assert "opt_betas" in _error(tmp_path, "opt_betas: [0.9, null]\n", capsys)
    assert parse_args(get_args_parser(), ["--config", write(tmp_path, "lr: null\n")]).lr is None  # optional: fine


def test_binary_or_directory_config_names_the_file(tmp_path: Path, capsys) -> None:
    err = _error(tmp_path, bytes(range(128, 256)) * 8, capsys)
    assert "cfg.yaml is not a text YAML file" in err
    with pytest.raises(SystemExit):
        parse_args(get_args_parser(), ["--config", str(tmp_path)])
    assert f"{tmp_path} is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("launcher", ["submitit_pretrain", "submitit_finetune"])
def test_launcher_dry_run_names_a_binary_config(tmp_path: Path, launcher: str) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    proc = subprocess.run([sys.executable, f"launchers/{launcher}.py", "--dry_run", "--config", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{cfg} is not a text YAML file" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["--weight_decay", "inf"], ["--blr", "nan"], ["--min_lr", "inf"],
                                  ["--opt_betas", "0.9", "nan"], ["--warmup_epochs=-inf"]])
def test_non_finite_floats_are_refused_at_parse_time(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(get_args_parser(), argv)
    err = capsys.readouterr().err
    assert argv[0].split("=")[0] in err and "not a finite number" in err


def test_non_finite_float_in_yaml_names_the_file(tmp_path: Path, capsys) -> None:
    err = _error(tmp_path, "weight_decay: .inf\n", capsys)
    assert "weight_decay" in err and "not a finite number" in err and "cfg.yaml" in err
