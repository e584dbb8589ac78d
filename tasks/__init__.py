"""One module per training objective; the registry the mains look them up in.

A task module holds its flag sections (`SECTIONS`: typed dataclasses whose fields are the flags), its
`Task` (util/task.py: model, data, loss, hooks) and its helpers, and a `make_task(args)` that builds
the task from parsed flags. A new objective is one new file here and one line in `PRETRAIN` (or a
main of its own); `docs/tasks.md` has the smallest example.

`--objective` is read before anything else (from the command line, else from the `--config` file),
so `--help` and the YAML checks cover the shared run sections plus that objective's sections only.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from util.config import (
    ConfigError,
    add_flags,
    add_run_flags,
    flag,
    parse_args,
    read_config_file,
    refuse_flags,
    section,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# --objective -> the task module of main_pretrain.py.
PRETRAIN = {"mae": "tasks.mae", "rho_byol": "tasks.rho", "rho_moco": "tasks.rho", "videotext": "tasks.videotext"}
# --task -> the task module of main_finetune.py, and its folder of configs.
FINETUNE = {"classify": "tasks.classify", "detect": "tasks.detect"}
FINETUNE_CONFIGS = {"classify": "finetune", "detect": "detect"}


@dataclass
class FinetuneKind:
    """What main_finetune.py fine-tunes."""

    task: str = flag("classify", "classify: video classification (tasks/classify.py); detect: AVA action "
                     "detection (tasks/detect.py, docs/ava.md); --help with it lists its flags", choices=FINETUNE)


def task_module(name: str) -> ModuleType:
    """The module `tasks.<name>` (or a registered objective's module)."""
    return importlib.import_module(PRETRAIN.get(name) or f"tasks.{name}")


def _chosen(argv: Sequence[str], key: str, choices: Sequence[str], default: str) -> str:
    """--`key` from the command line, else the `key` of --config's file, else `default`; refused unless in `choices`."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(f"--{key}", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(list(argv))
    value = getattr(known, key)
    if value is None and known.config:
        try:
            value = read_config_file(known.config).get(key)
        except ConfigError:
            value = None  # the full parse reports what is wrong with the file
    value = default if value is None else value
    if value not in choices:
        raise ConfigError(f"--{key} {value!r} is not one of: {', '.join(choices)}")
    return value


def objective_of(argv: Sequence[str], default: str = "mae") -> str:
    """--objective from the command line, else the `objective` key of --config's file, else `default`."""
    return _chosen(argv, "objective", tuple(PRETRAIN), default)


def finetune_kind(argv: Sequence[str]) -> str:
    """--task from the command line, else the `task` key of --config's file, else classify."""
    return _chosen(argv, "task", tuple(FINETUNE), "classify")


def build_parser(description: str, module: ModuleType, defaults: dict | None = None,
                 extra: Sequence[tuple[str, type]] = ()) -> argparse.ArgumentParser:
    """Every flag of a run of `module`'s task: the shared run sections, then the task's own sections.

    Flags of the other objectives' sections are refused with the objective that has them, and the
    task's renamed flags (`RENAMED`) with their new names.
    """
    parser = argparse.ArgumentParser(description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_flags(parser)
    mine = set()
    for title, cls in (*extra, *module.SECTIONS):
        add_flags(parser, cls, title)
        mine |= set(cls.__dataclass_fields__)
    owners: dict[str, list[str]] = {}
    if module.__name__ in PRETRAIN.values():
        for objective, name in PRETRAIN.items():
            for _, cls in importlib.import_module(name).SECTIONS:
                for flag in sorted(set(cls.__dataclass_fields__) - mine):
                    owners.setdefault(flag, []).append(objective)
    elsewhere = {flag: "--objective " + " / ".join(dict.fromkeys(objs)) for flag, objs in owners.items()}
    refuse_flags(parser, getattr(module, "RENAMED", {}), elsewhere)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def pretrain_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """main_pretrain.py's flags for the objective that `argv` (or its --config) names."""
    return build_parser("MAE-ST pretraining", task_module(objective_of(argv)))


def finetune_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """main_finetune.py's flags for the --task that `argv` (or its --config) names: the shared sections with
    that task's defaults (MAE-ST's fine-tuning recipe), then the task's."""
    module = importlib.import_module(FINETUNE[finetune_kind(argv)])
    return build_parser("MAE-ST fine-tuning", module, defaults=module.DEFAULTS,
                        extra=[("fine-tuning task", FinetuneKind)])


def finetune_task(args: argparse.Namespace):  # noqa: ANN201 - the task module's own Task type
    """The Task of main_finetune.py's parsed flags (the --task module's `make_task`)."""
    return importlib.import_module(FINETUNE[args.task]).make_task(args)


def default_config(kind: str, argv: Sequence[str]) -> str | None:
    """The demo config of the objective `argv` names (pretrain; None if it has none), or the fine-tuning demo."""
    if kind == "finetune":
        return str(CONFIGS / FINETUNE_CONFIGS[finetune_kind(argv)] / "demo.yaml")
    demo = getattr(task_module(objective_of(argv)), "DEMO_CONFIG", None)
    return str(CONFIGS / "pretrain" / demo) if demo else None


def parse(kind: str, argv: Sequence[str]) -> argparse.Namespace:
    """Parsed flags of main_pretrain.py (`kind` "pretrain") or main_finetune.py, with the demo config as default."""
    try:
        parser = pretrain_parser(argv) if kind == "pretrain" else finetune_parser(argv)
        config = default_config(kind, argv)
    except ConfigError as exc:  # an unknown --objective: argparse's usage error, not a traceback
        argparse.ArgumentParser(f"main_{kind}.py").error(str(exc))
    return parse_args(parser, argv, default_config=config)


def sections(module: ModuleType, args: argparse.Namespace) -> list:
    """The task's typed sections of parsed flags, in `SECTIONS` order."""
    return [section(cls, args) for _, cls in module.SECTIONS]
