"""Submit MAE-ST fine-tuning to SLURM with submitit (requeues itself on time-outs and preemption).

    python launchers/submitit_finetune.py --nodes 4 --ngpus 8 --partition learn \
        --config configs/finetune/vit_l_k400.yaml --data_path /data/k400 --finetune PRETRAINED.pth

Cluster flags: see `--help`; every other flag is main_finetune.py's. `--dry_run` prints the sbatch file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launchers.slurm import launch  # noqa: E402


def main(argv: list[str]) -> object:
    """Parse and submit; returns the submitit job (None for --dry_run / --help)."""
    import tasks

    return launch(argv, "main_finetune", tasks.finetune_parser, lambda rest: tasks.parse("finetune", rest))


if __name__ == "__main__":
    main(sys.argv[1:])
