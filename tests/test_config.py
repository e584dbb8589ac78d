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
