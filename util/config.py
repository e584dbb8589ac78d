"""One configuration system: each flag is a typed dataclass field; argparse parses it; YAML sets defaults.

A section of the run (model, data, optimiser, loop, parallelism, checkpoints; each task adds its own)
is a small dataclass. Its fields *are* the flags: name, type, default, help text, choices and range,
each written once, here or in the main that owns the task. `add_flags` turns a section into an
argparse group, `parse_args` reads `--config FILE.yaml` (defaults only) and the command line, and
`section(cls, args)` turns the Namespace into that dataclass. Only this module and the mains read the
Namespace; everything under `util/` receives the dataclasses.

Precedence: built-in default < `--config FILE.yaml` < command-line flag. Unknown YAML keys, bad types,
values out of range and an empty config file are errors that name the key and the valid choices,
raised before any work starts. The resolved configuration is written next to the outputs
(`OUT/config.yaml`), itself a valid `--config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import stat
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from util.errors import ConfigError, short_repr

BOOL = argparse.BooleanOptionalAction  # `--flag` / `--no-flag`, so YAML-enabled flags can be switched off
__all__ = ["ConfigError"]  # re-exported: it lived here first


class _RefusedYaml(yaml.YAMLError):
    """YAML that parses but that a config file must not hold (an alias, a duplicate key)."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors/aliases (an alias bomb expands a small file exponentially) and
    duplicate keys (YAML's last-wins would silently drop the first value). Config files need neither."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _RefusedYaml(f"line {event.start_mark.line + 1}: YAML anchors and aliases (&name, *name) are not "
                               "allowed in config files; write each value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            if first != line:
                raise _RefusedYaml(f"key {short_repr(key)} appears twice (lines {first} and {line}); keep one")
        return super().construct_mapping(node, deep)


def flag(default: Any, help: str, *, choices: Sequence | None = None, check: Callable[[Any], bool] | None = None,
         rule: str = "", metavar: Any = None) -> Any:
    """A dataclass field that is also a command-line flag; `check(value)` False -> error citing `rule`."""
    meta = {"help": help, "choices": choices, "check": check, "rule": rule, "metavar": metavar}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positive(x: float) -> bool:
    """Range check: > 0."""
    return x > 0


def non_negative(x: float) -> bool:
    """Range check: >= 0."""
    return x >= 0


def shard_size(x: str | int) -> bool:
    """Range check of --hsdp_shard_size: a count >= 0 (digits) or `node`."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0 or \
        isinstance(x, str) and (x == "node" or re.fullmatch(r"[0-9]+", x) is not None)


def _plain_type(hint: Any) -> tuple[type, bool]:
    """(base type, optional) of a field annotation like `float | None`, `list[float]` or `str`."""
    args = typing.get_args(hint)
    if type(None) in args:
        return [a for a in args if a is not type(None)][0], True
    origin = typing.get_origin(hint)
    if origin is list:
        return list, False
    return hint, False


def add_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> argparse.ArgumentParser:
    """Add every field of dataclass `cls` as a `--name` flag in a group `title`; remembers `cls` for checks."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta, hint = f.metadata, hints[f.name]
        base, _ = _plain_type(hint)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"default": default, "help": meta.get("help", "")}
        if base is bool:
            kw["action"] = BOOL
        elif base is list:
            item = typing.get_args(hint)[0]
            kw.update(type=item, nargs=len(default), metavar=meta.get("metavar"))
        else:
            kw["type"] = base
            if meta.get("choices") is not None:
                kw["choices"] = list(meta["choices"])
        group.add_argument("--" + f.name, **kw)
    parser._mae_sections = [*getattr(parser, "_mae_sections", []), cls]  # noqa: SLF001 - read by parse_args
    return parser


def section(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass `cls` filled from the parsed flags, every range check applied (ConfigError names the flag)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        check, value = f.metadata.get("check"), values[f.name]
        if _is_float(hints[f.name]) and value is not None and not all(map(math.isfinite, _as_list(value))):
            raise ConfigError(f"--{f.name} {short_repr(value)} is not a finite number (inf and nan are never a "
                              "meaningful setting)")
        if check is not None and value is not None and not check(value):
            raise ConfigError(f"--{f.name} {short_repr(value)} is out of range: {f.metadata.get('rule') or 'see --help'}")
        if isinstance(value, list):
            values[f.name] = list(value)
    return cls(**values)


def _is_float(hint: Any) -> bool:
    """A float flag (or a list of floats): one where inf or nan could slip through `float()`."""
    base, _ = _plain_type(hint)
    return base is float or (base is list and typing.get_args(hint)[:1] == (float,))


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def _check_value(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Validate and convert a YAML value with the flag's own type and choices."""
    if value is None:
        if action.default is None:  # an optional flag left unset (e.g. `lr: null`)
            return None
        raise ConfigError(f"{source}: key '{key}' is null (empty), but --{action.dest} needs a value; write one, or "
                          f"delete the line for the default {short_repr(action.default)}")
    if isinstance(action, BOOL) or isinstance(action.default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be true or false, got {short_repr(value)}")
        return value
    if isinstance(action.nargs, int) and action.nargs > 1:  # e.g. opt_betas: [0.9, 0.95]
        if not isinstance(value, list | tuple) or len(value) != action.nargs:
            raise ConfigError(f"{source}: key '{key}' must be a list of {action.nargs} values, got {short_repr(value)}")
        item = argparse.Action(action.option_strings, action.dest, type=action.type, choices=action.choices,
                               default=action.default)  # not None: a null item is refused
        return [_check_value(item, key, v, source) for v in value]
    if value is not None and action.type is not None:
        if action.type in (int, float) and isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be a number, got {short_repr(value)}")
        try:
            converted = action.type(value)
        except (TypeError, ValueError, OverflowError) as exc:  # int(inf) overflows
            raise ConfigError(f"{source}: key '{key}' has bad value {short_repr(value)}: {exc}") from None
        if action.type is int and isinstance(value, float) and value != converted:
            raise ConfigError(f"{source}: key '{key}' must be an integer, got {short_repr(value)}")
        value = converted
    if action.choices is not None and value not in action.choices:
        raise ConfigError(
            f"{source}: key '{key}' has bad value {short_repr(value)}; valid choices: {', '.join(map(str, action.choices))}"
        )
    return value


def read_config_file(path: str) -> dict[Any, Any]:
    """The mapping in a YAML config file; ConfigError naming the file for anything that is not one."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"config file {path!r} does not exist" if isinstance(exc, FileNotFoundError) else
                          f"config file {path!r} cannot be read: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"config file {path} is a directory; give a YAML file in it (e.g. {path}/name.yaml)")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"config file {path} is not a regular file (a FIFO or device); give a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not a text YAML file (it holds bytes that are not UTF-8: "
                          f"{exc.reason}); give the .yaml file, not a binary one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not a valid config: {str(exc)[:500]}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"config file {path} nests lists or mappings too deeply to be a config; give a flat "
                          f"mapping of flag names to values") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty: give at least one flag (or leave out --config for the demo)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def load_yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Read a YAML file of flag defaults, rejecting an empty file, unknown keys and bad values."""
    data = read_config_file(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        key = short_repr(key).strip("'")  # a key is echoed in messages: bounded like values
        if dest not in actions and (message := _refused_flag(parser, dest)):
            raise ConfigError(f"{path}: key '{key}': {message.replace('--', '', 1)}")
        if dest not in actions:
            close = sorted(k for k in actions if k.split("_")[0] == dest.split("_")[0])[:5]
            hint = f"; did you mean one of: {', '.join(close)}" if close else ""
            raise ConfigError(f"{path}: unknown key '{key}'{hint} (see --help for every flag)")
        out[dest] = _check_value(actions[dest], str(key), value, path)
    return out


def refuse_flags(parser: argparse.ArgumentParser, renamed: dict[str, str], elsewhere: dict[str, str]) -> None:
    """Make `parse_args` refuse flags that were renamed (old -> new name) or belong to another objective
    (flag -> which one has it), naming the fix, on the command line and in YAML files alike."""
    parser._mae_refused = {**getattr(parser, "_mae_refused", {}), **{  # noqa: SLF001 - read by parse_args
        old: f"--{old} was renamed: use --{new}" for old, new in renamed.items()}}
    for name, owner in elsewhere.items():
        parser._mae_refused.setdefault(name, f"--{name} is a flag of {owner}, not of this run's objective "
                                             f"(see --help for this objective's flags)")


def _refused_flag(parser: argparse.ArgumentParser, name: str) -> str | None:
    """The message for a refused flag name (with or without `no-`), or None."""
    refused = getattr(parser, "_mae_refused", {})
    name = name.replace("-", "_")
    return refused.get(name) or (refused.get(name[3:]) if name.startswith("no_") else None)


def _check_refused_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Refuse renamed or foreign flags on the command line before argparse's prefix matching sees them."""
    known = {a.dest for a in parser._actions}
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            if name.replace("-", "_") not in known and (message := _refused_flag(parser, name)):
                raise ConfigError(message)


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, default_config: str | None = None
) -> argparse.Namespace:
    """Parse flags with YAML defaults (`default_config` when no `--config`), then range-check every section."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    try:
        _check_refused_argv(parser, sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        parser.error(str(exc))
    config = known.config or default_config
    if config:
        try:
            parser.set_defaults(**load_yaml_defaults(parser, config))
        except ConfigError as exc:
            parser.error(str(exc))
    args = parser.parse_args(argv)
    args.config = config
    for cls in getattr(parser, "_mae_sections", []):
        try:
            section(cls, args)
        except ConfigError as exc:
            parser.error(f"{exc}{f' (from {config})' if config else ''}")
    return args


def flag_values(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The parsed flags as a plain dict (what `OUT/config.yaml` holds), without `config` and `help`."""
    known = {a.dest for a in parser._actions}
    return {k: v for k, v in vars(args).items() if k in known and k not in ("config", "help")}


def save_config(values: dict[str, Any], path: str | Path) -> None:
    """Write resolved flag values as YAML (a valid `--config` file for a re-run), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the run's sections
@dataclass
class ModelConfig:
    """Which network, and the clip geometry it is built for."""

    model: str = flag("mae_vit_large_patch16", "registered model name (models.MODELS)")
    input_size: int = flag(224, "clip height and width in pixels", check=positive, rule="> 0")
    num_frames: int = flag(16, "frames per clip", check=positive, rule="> 0")
    t_patch_size: int = flag(2, "frames per token", check=positive, rule="> 0")
    cls_embed: bool = flag(True, "use a class token")
    sep_pos_embed: bool = flag(True, "separable spatial + temporal pos-embed")
    init_values: float = flag(0.0, "layer scale: initial per-channel gain on each encoder block's residual "
                              "branches (VideoMAE/CaiT); 0 = off", check=non_negative, rule=">= 0")


@dataclass
class DataConfig:
    """Where the videos are and how the workers load them."""

    data_path: str = flag("", "folder with train/val/test list files; empty: generated video")
    data_root: str = flag("", "prefix for the paths in the list files")
    sampling_rate: int = flag(4, "frame stride at 30 fps", check=positive, rule="> 0")
    repeat_aug: int = flag(4, "clips cut from each decoded video", check=positive, rule=">= 1")
    num_workers: int = flag(8, "data-loading processes per rank", check=non_negative, rule=">= 0")
    prefetch_factor: int = flag(4, "batches each worker prepares ahead", check=positive, rule=">= 1")
    mp_context: str = flag("forkserver", "how data workers start; fork deadlocks once the parent used FFmpeg "
                           "(PyAV 19, Python 3.12+)", choices=("forkserver", "spawn", "fork"))
    decode_threads: int = flag(0, "FFmpeg threads per decoding worker (0: the cores each worker gets, 1 when "
                               "the workers fill them)", check=non_negative, rule=">= 0")
    pin_mem: bool = flag(True, "pin host memory for faster copies to the GPU")
    max_failure_rate: float = flag(0.1, "stop when a larger share of videos fails to decode",
                                   check=lambda x: 0 <= x <= 1, rule="in [0, 1]")
    data_timeout: float = flag(600.0, "seconds without a batch from the data workers before the run stops, "
                               "naming the files they were reading (0: wait forever)", check=non_negative,
                               rule=">= 0")
    max_frame_pixels: int = flag(7680 * 4320, "skip (and count as bad) videos whose frames are larger (width x "
                                 "height), checked before decoding", check=positive, rule="> 0")
    max_video_frames: int = flag(10_000_000, "skip (and count as bad) videos with more frames, checked before "
                                 "decoding", check=positive, rule="> 0")
    frame_fps: float = flag(30.0, "--data_format frames: the rate the frames of a folder were extracted at (a "
                            "folder of N frames is a video of N frames at this rate)", check=lambda x: x > 0,
                            rule="> 0")
    frame_template: str = flag("img_{:05d}.jpg", "--data_format frames: file name of frame k of a VideoMAE v2 "
                               "rawframe folder, formatted with start_index + k (JPEG or PNG)")
    frame_start_index: int = flag(1, "--data_format frames: first frame number of `folder total_frames label` "
                                  "lines (VideoMAE v2 --start_idx)", check=non_negative, rule=">= 0")
    shard_retries: int = flag(3, "tar shards (docs/shards.md): retries of a failed member read, with backoff, before "
                              "the member counts as a bad file", check=non_negative, rule=">= 0")
    shard_cache_mb: int = flag(256, "tar shards on URLs: recently read members kept per data worker (MB)",
                               check=non_negative, rule=">= 0")
    max_decode_short_side: int = flag(1080, "decode training clips of sources whose short side is longer scaled "
                                      "down to it (swscale, before the crop; 0: full size)", check=non_negative,
                                      rule=">= 0")


@dataclass
class SyntheticConfig:
    """The generated demo videos used when no --data_path is given."""

    synthetic_videos: int = flag(96, "generated videos when no data_path is given", check=positive, rule="> 0")
    synthetic_size: int = flag(64, "side of the generated videos in pixels", check=positive, rule="> 0")
    synthetic_background: str = flag("texture", "background of the generated videos",
                                     choices=("texture", "smooth", "plain"))
    synthetic_object_scale: float = flag(1.0, "size factor of the generated objects", check=positive, rule="> 0")
    synthetic_speed_scale: float = flag(1.0, "speed factor of the generated objects", check=positive, rule="> 0")
    synthetic_object_texture: str = flag("stripes", "generated objects: two-colour stripes or one solid colour",
                                         choices=("stripes", "solid"))


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float | None = flag(None, "absolute lr; default blr * (clips or videos, --lr_scale_by) per optimiser "
                            "step / 256", check=positive, rule="> 0")
    blr: float = flag(1.6e-3, "base lr per 256 clips or videos (--lr_scale_by)", check=positive, rule="> 0")
    lr_scale_by: str = flag("clips", "what the lr scales with: clips per step (batch x repeat_aug x ranks x accum; "
                            "mae_st fine-tuning) or videos per step (repeats not counted; mae_st pretraining)",
                            choices=("clips", "videos"))
    min_lr: float = flag(0.0, "floor of the cosine schedule (and where the wsd decay ends)", check=non_negative,
                         rule=">= 0")
    warmup_epochs: float = flag(40.0, "linear warm-up length in epochs (data passes, as --epochs)",
                                check=non_negative, rule=">= 0")
    lr_schedule: str = flag("cosine", "after the warm-up: cosine (half-cycle to --min_lr, MAE) or wsd (constant, "
                            "then a --decay_shape decay over the last --decay_fraction of training)",
                            choices=("cosine", "wsd"))
    decay_fraction: float = flag(0.2, "wsd: share of --epochs the final decay takes (it never starts inside the "
                                 "warm-up)", check=lambda f: 0 < f <= 1, rule="in (0, 1]")
    decay_shape: str = flag("linear", "wsd decay: linear (V-JEPA 2's cooldown), sqrt (1 - sqrt, Hagele et al. 2024) "
                            "or cosine", choices=("linear", "cosine", "sqrt"))
    init_optimizer: str = flag("reset", "with --init_from a run or checkpoint folder: keep its AdamW state (a "
                               "cooldown; tensors whose shape changed, e.g. resized position tables, restart with "
                               "fresh moments) or reset it (a fresh optimizer)", choices=("reset", "keep"))
    weight_decay: float = flag(0.05, "AdamW weight decay", check=non_negative, rule=">= 0")
    wd_skip: str = flag("1d", "tensors without weight decay: 1d (biases and norms: every tensor of >= 2 dims "
                        "decays, as mae_st pretraining and PySlowFast's MAE configs) or tokens (also positional "
                        "tables, class and mask tokens, as mae_st fine-tuning)", choices=("1d", "tokens"))
    opt_betas: list[float] = flag([0.9, 0.95], "AdamW betas (MAE pretraining 0.9 0.95; MAE-ST fine-tuning "
                                  "0.9 0.999)", check=lambda b: all(0 <= x < 1 for x in b), rule="each in [0, 1)",
                                  metavar=("BETA1", "BETA2"))
    layer_decay: float = flag(1.0, "layer-wise lr decay (1.0: off)", check=lambda x: 0 < x <= 1, rule="in (0, 1]")
    clip_grad: float = flag(0.02, "max grad norm; 0 turns clipping off", check=non_negative, rule=">= 0")


@dataclass
class LoopConfig:
    """How long and in what steps: batch, accumulation, epochs, logging."""

    batch_size: int = flag(2, "videos per rank per micro-step", check=positive, rule=">= 1")
    accum_iter: int = flag(1, "micro-steps per optimiser step", check=positive, rule=">= 1")
    epochs: int = flag(800, "training epochs, counted as passes over the data (as mae_st's --epochs and "
                       "PySlowFast's MAX_EPOCH); a paper's 'effective epochs' are this x --repeat_aug",
                       check=positive, rule=">= 1")
    max_steps: int = flag(0, "stop after this many optimiser steps (0: no limit)", check=non_negative, rule=">= 0")
    log_every: int = flag(20, "optimiser steps between log lines", check=positive, rule=">= 1")
    seed: int = flag(0, "seed of every random choice (per sample and per step)")
    bench: str = flag("", "measure instead of training: a comma list of model,loader,e2e "
                      "(benchmarks/bench_train.py)", check=lambda s: set(filter(None, s.split(","))) <=
                      {"model", "loader", "e2e"}, rule="a comma list of model, loader, e2e")
    bench_steps: int = flag(10, "timed optimiser steps per --bench mode", check=positive, rule=">= 1")


@dataclass
class ParallelConfig:
    """Backend, precision, activation checkpointing and compile."""

    dist: str = flag("ddp", "parallel backend", choices=("ddp", "fsdp", "deepspeed"))
    zero_stage: int = flag(2, "DeepSpeed ZeRO stage", choices=(1, 2, 3))
    deepspeed_config: str = flag("", "DeepSpeed JSON merged over the generated one (checked against the flags)")
    precision: str = flag("bf16", "mixed precision", choices=("fp32", "bf16", "fp16"))
    grad_ckpt: bool = flag(False, "activation checkpointing per block (--ckpt_mode block)")
    ckpt_mode: str = flag("none", "activation checkpointing: none (or per block if --grad_ckpt), every block "
                          "(block), every --ckpt_every-th block (every_k), or per op in every block, saving matmul "
                          "and attention outputs and recomputing the rest (selective)",
                          choices=("none", "block", "every_k", "selective"))
    ckpt_every: int = flag(2, "with --ckpt_mode every_k: checkpoint blocks 0, K, 2K, ... of the model's units",
                           check=positive, rule=">= 1", metavar="K")
    compile: str = flag("none", "torch.compile: none, each block (blocks), the whole model (model), or the whole "
                        "model with CUDA graphs (model-cudagraphs: inductor's reduce-overhead mode; CUDA, DDP only)",
                        choices=("none", "blocks", "model", "model-cudagraphs"))
    compile_backend: str = flag("inductor", "torch.compile backend: inductor (compiled kernels), or aot_eager / "
                                "eager (dynamo's graphs run op by op: to look for graph breaks and recompiles "
                                "without building kernels)", choices=("inductor", "aot_eager", "eager"))
    hsdp_shard_size: str = flag("0", "with --dist fsdp: HSDP, shard within groups of N consecutive ranks and "
                                "replicate across the groups; node: N = the ranks per node (LOCAL_WORLD_SIZE from "
                                "torchrun or submitit, else SLURM's tasks per node); 0: off, one flat mesh of all ranks",
                                check=shard_size, rule="an integer >= 0 or 'node'", metavar="N|node")


@dataclass
class CheckpointConfig:
    """Where outputs go, when to save, what to resume."""

    output_dir: str = flag("./output", "checkpoints, logs, TensorBoard, images")
    resume: str = flag("", "checkpoint folder to resume from")
    auto_resume: bool = flag(True, "resume from OUT/checkpoints/latest")
    save_every: int = flag(1000, "optimiser steps between saves (0: epoch ends only)", check=non_negative,
                           rule=">= 0")
    keep_last: int = flag(3, "checkpoints to keep", check=positive, rule=">= 1")
    async_save: bool = flag(False, "write FSDP2 checkpoints in the background (DCP async_save)")
    allow_mixture_change: bool = flag(False, "resume although the --data_mixture differs from the one the "
                                      "checkpoint recorded (sources, weights, list files, block size): the epoch's "
                                      "draw changes from the resumed position on")


@dataclass
class RunConfig:
    """Every shared section of one run."""

    model: ModelConfig
    data: DataConfig
    synthetic: SyntheticConfig
    optim: OptimConfig
    loop: LoopConfig
    parallel: ParallelConfig
    ckpt: CheckpointConfig


RUN_SECTIONS = (("model", ModelConfig), ("data", DataConfig), ("generated demo data", SyntheticConfig),
                ("optimisation", OptimConfig),
                ("loop", LoopConfig), ("parallelism and precision", ParallelConfig),
                ("checkpoints and logging", CheckpointConfig))


def add_run_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`--config` and the flags of every shared section."""
    parser.add_argument("--config", default=None, help="YAML file whose keys set defaults for these flags")
    for title, cls in RUN_SECTIONS:
        add_flags(parser, cls, title)
    return parser


def run_config(args: argparse.Namespace) -> RunConfig:
    """The typed shared sections of parsed flags."""
    return RunConfig(*(section(cls, args) for _, cls in RUN_SECTIONS))
