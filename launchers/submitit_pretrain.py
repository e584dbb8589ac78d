"""Submit MAE-ST pretraining to SLURM with submitit (requeues itself on time-outs and preemption).

    python launchers/submitit_pretrain.py --nodes 8 --ngpus 8 --partition learn \
        --config configs/pretrain/vit_l_k400.yaml --data_path /data/k400 --job_dir /checkpoint/$USER/vit_l_800

Cluster flags: see `--help`; every other flag is main_pretrain.py's. `--dry_run` prints the sbatch file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launchers.slurm import launch  # noqa: E402


def main(argv: list[str]) -> object:
    """Parse and submit; returns the submitit job (None for --dry_run / --help)."""
    import tasks

    return launch(argv, "main_pretrain", tasks.pretrain_parser, lambda rest: tasks.parse("pretrain", rest))


if __name__ == "__main__":
    main(sys.argv[1:])
