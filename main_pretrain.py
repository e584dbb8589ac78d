"""MAE-ST pretraining: masked spacetime autoencoding of video clips, and the other pretraining objectives.

    python main_pretrain.py                                   # CPU demo on generated video
    python main_pretrain.py --objective videotext             # the video-text demo (FLIP / MAC / SMAUG)
    torchrun --nproc_per_node 8 main_pretrain.py --config configs/pretrain/vit_l_k400.yaml --data_path DIR

`--objective` (mae, rho_byol, rho_moco, videotext; from the command line or the --config file) picks
the task in tasks/ and with it the flags: `--help` lists the shared run flags and that objective's.
With no `--config`, the objective's demo config is used (configs/pretrain/demo.yaml for mae). The run
loop the task plugs into (resume, backends, logging, saving) is util/trainer.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tasks
from util.config import flag_values, run_config
from util.task import Task
from util.trainer import Trainer, apply_overrides

DEMO_CONFIG = tasks.default_config("pretrain", [])


def get_args_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The flags of the objective `argv` (or its --config) names: shared run sections + that task's."""
    return tasks.pretrain_parser(argv)


def build_task(args: argparse.Namespace) -> Task:
    """The task of --objective, from its flags; what it cannot train is refused here, before any work."""
    task = tasks.task_module(args.objective).make_task(args)
    task.check_run(apply_overrides(run_config(args), task.run_overrides(), {}))
    return task


def main(args: argparse.Namespace) -> dict:
    """Pretrain (or test a run, or with --bench measure); returns a summary (final step, outputs)."""
    parser = get_args_parser(["--objective", args.objective])
    return Trainer(run_config(args), build_task(args), flag_values(args, parser)).run()


if __name__ == "__main__":
    main(tasks.parse("pretrain", sys.argv[1:]))
