"""One configuration system: argparse defines every flag once; a YAML file only sets their defaults.

Precedence: built-in default < `--config FILE.yaml` < command-line flag. Unknown YAML keys and bad
values are errors that name the key and the valid choices, raised before any work starts. The
resolved configuration is written next to the outputs (`OUT/config.yaml`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

BOOL = argparse.BooleanOptionalAction  # `--flag` / `--no-flag`, so YAML-enabled flags can be switched off


class ConfigError(ValueError):
    """A bad configuration key or value, named in the message."""


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by pretraining and fine-tuning (MAE-ST names where MAE-ST has one)."""
    parser.add_argument("--config", default=None, help="YAML file whose keys set defaults for these flags")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="mae_vit_large_patch16", help="registered model name (models.MODELS)")
    g.add_argument("--input_size", type=int, default=224, help="clip height and width in pixels")
    g.add_argument("--num_frames", type=int, default=16, help="frames per clip")
    g.add_argument("--sampling_rate", type=int, default=4, help="frame stride at 30 fps")
    g.add_argument("--t_patch_size", type=int, default=2, help="frames per token")
    g.add_argument("--cls_embed", action=BOOL, default=True, help="use a class token")
    g.add_argument("--sep_pos_embed", action=BOOL, default=True, help="separable spatial + temporal pos-embed")

    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default="", help="folder with train/val/test list files; empty: generated video")
    g.add_argument("--data_root", default="", help="prefix for the paths in the list files")
    g.add_argument("--repeat_aug", type=int, default=4, help="clips cut from each decoded video")
    g.add_argument("--num_workers", type=int, default=8, help="data-loading processes per rank")
    g.add_argument("--prefetch_factor", type=int, default=4, help="batches each worker prepares ahead")
    g.add_argument("--mp_context", default="forkserver", choices=["forkserver", "spawn", "fork"],
                   help="how data workers start; fork deadlocks once the parent used FFmpeg (PyAV 19, Python 3.12+)")
    g.add_argument("--decode_threads", type=int, default=0,
                   help="FFmpeg threads per decoding worker (0: the cores each worker gets, 1 when workers fill them)")
    g.add_argument("--pin_mem", action=BOOL, default=True, help="pin host memory for faster copies to the GPU")
    g.add_argument("--max_failure_rate", type=float, default=0.1, help="stop when more videos fail to decode")
    g.add_argument("--synthetic_videos", type=int, default=96, help="generated videos when no data_path is given")
    g.add_argument("--synthetic_size", type=int, default=64, help="side of the generated videos in pixels")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=2, help="videos per rank per micro-step")
    g.add_argument("--epochs", type=int, default=800)
    g.add_argument("--accum_iter", type=int, default=1, help="micro-steps per optimiser step")
    g.add_argument("--lr", type=float, default=None, help="absolute lr; default blr * effective batch / 256")
    g.add_argument("--blr", type=float, default=1.6e-3, help="base lr per 256 clips")
    g.add_argument("--min_lr", type=float, default=0.0, help="floor of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=40, help="linear warm-up length in epochs")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--opt_betas", type=float, nargs=2, default=[0.9, 0.95], metavar=("BETA1", "BETA2"),
                   help="AdamW betas (MAE pretraining 0.9 0.95; main_finetune defaults to 0.9 0.999 as MAE-ST)")
    g.add_argument("--clip_grad", type=float, default=0.02, help="max grad norm; 0 turns clipping off")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimiser steps (0: no limit)")

    g = parser.add_argument_group("parallelism and precision")
    g.add_argument("--dist", default="ddp", choices=["ddp", "fsdp", "deepspeed"], help="parallel backend")
    g.add_argument("--zero_stage", type=int, default=2, choices=[1, 2, 3], help="DeepSpeed ZeRO stage")
    g.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON overriding the generated one")
    g.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--grad_ckpt", action=BOOL, default=False, help="activation checkpointing per block")
    g.add_argument("--compile", action=BOOL, default=False, help="torch.compile each block")
    g.add_argument("--seed", type=int, default=0)

    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--output_dir", default="./output", help="checkpoints, logs, TensorBoard, images")
    g.add_argument("--resume", default="", help="checkpoint folder to resume from")
    g.add_argument("--auto_resume", action=BOOL, default=True, help="resume from OUT/checkpoints/latest")
    g.add_argument("--save_every", type=int, default=1000, help="optimiser steps between saves (0: epoch ends only)")
    g.add_argument("--keep_last", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--async_save", action=BOOL, default=False,
                   help="write FSDP2 checkpoints in the background (DCP async_save); other backends save in line")
    g.add_argument("--log_every", type=int, default=20, help="optimiser steps between log lines")
    return parser


def _check_value(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Validate and convert a YAML value with the flag's own type and choices."""
    if isinstance(action, BOOL) or isinstance(action.default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(action.nargs, int) and action.nargs > 1:  # e.g. opt_betas: [0.9, 0.95]
        if not isinstance(value, list | tuple) or len(value) != action.nargs:
            raise ConfigError(f"{source}: key '{key}' must be a list of {action.nargs} values, got {value!r}")
        item = argparse.Action(action.option_strings, action.dest, type=action.type, choices=action.choices)
        return [_check_value(item, key, v, source) for v in value]
    if value is not None and action.type is not None:
        if action.type in (int, float) and isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be a number, got {value!r}")
        try:
            converted = action.type(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: key '{key}' has bad value {value!r}: {exc}") from None
        if action.type is int and isinstance(value, float) and value != converted:
            raise ConfigError(f"{source}: key '{key}' must be an integer, got {value!r}")
        value = converted
    if action.choices is not None and value not in action.choices:
        raise ConfigError(
            f"{source}: key '{key}' has bad value {value!r}; valid choices: {', '.join(map(str, action.choices))}"
        )
    return value


def load_yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Read a YAML file of flag defaults, rejecting unknown keys and bad values."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = sorted(k for k in actions if k.split("_")[0] == dest.split("_")[0])[:5]
            hint = f"; did you mean one of: {', '.join(close)}" if close else ""
            raise ConfigError(f"{path}: unknown key '{key}'{hint} (see --help for every flag)")
        out[dest] = _check_value(actions[dest], str(key), value, path)
    return out


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, default_config: str | None = None
) -> argparse.Namespace:
    """Parse flags with YAML defaults; `default_config` is used when no `--config` is given."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    config = known.config or default_config
    if config:
        try:
            parser.set_defaults(**load_yaml_defaults(parser, config))
        except ConfigError as exc:
            parser.error(str(exc))
    args = parser.parse_args(argv)
    args.config = config
    return args


def save_config(args: argparse.Namespace, path: str | Path, parser: argparse.ArgumentParser | None = None) -> None:
    """Write the resolved flags as YAML (a valid `--config` file for a re-run when `parser` is given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    known = {a.dest for a in parser._actions} if parser is not None else set(vars(args))
    values = {k: v for k, v in vars(args).items() if k in known and k not in ("config", "help")}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    os.replace(tmp, path)
