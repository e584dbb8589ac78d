"""MAE-ST fine-tuning (and linear probing) of a video ViT for action classification, with multi-view testing.

    python main_finetune.py                                          # CPU demo on generated video
    python main_finetune.py --finetune runs/demo                     # start from our pretraining run
    torchrun --nproc_per_node 8 main_finetune.py --config configs/finetune/vit_l_k400.yaml \
        --data_path K400 --finetune mae_pretrain_vit_large_k400.pth
    python main_finetune.py --config ... --eval --resume OUT/checkpoints/latest   # test a saved run
    python main_finetune.py --task detect                            # AVA detection demo (docs/ava.md)

With no `--config`, `configs/finetune/demo.yaml` is used. `--finetune` accepts our checkpoint folders
and exports, the official MAE-ST / PySlowFast releases and VideoMAE files (`models/convert.py`). The
task (flags, model, data, loss, testing) is tasks/classify.py, or tasks/detect.py with `--task detect`;
the run loop is util/trainer.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tasks
from util.config import flag_values, run_config
from util.trainer import Trainer

DEMO_CONFIG = tasks.default_config("finetune", [])


def get_args_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Every fine-tuning flag of the --task `argv` names (shared sections with its defaults, then the task's)."""
    return tasks.finetune_parser(argv)


def main(args: argparse.Namespace) -> dict:
    """Fine-tune (or only test with --eval); returns a summary with the final test metrics."""
    return Trainer(run_config(args), tasks.finetune_task(args), flag_values(args, get_args_parser())).run()


if __name__ == "__main__":
    main(tasks.parse("finetune", sys.argv[1:]))
