"""The Trainer with a task that records which samples it trained on (one JSON line per micro-batch and rank).

usage: [torchrun --nproc_per_node N] tests/dist/resume_worker.py OUT [run flags ...]
Each rank appends `{"rank", "step", "index": [...]}` lines to OUT/seen.jsonl. Used to check that a run
stopped on one world size and resumed on another trains every sample of the epoch exactly once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models import create_model  # noqa: E402
from util.config import add_run_flags, flag_values, parse_args, run_config  # noqa: E402
from util.trainer import Task, Trainer  # noqa: E402

NUM_SAMPLES = 24


class Samples(torch.utils.data.Dataset):
    """Random clips whose content depends only on the sample index (like the video datasets)."""

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, key: tuple[int, int]) -> dict:
        _, index = key
        g = torch.Generator().manual_seed(index)
        return {"clips": torch.randn(1, 3, 4, 32, 32, generator=g), "noise": torch.rand(1, 32, generator=g),
                "label": torch.tensor([index % 3]), "index": torch.tensor([index]), "failures": 0, "attempts": 1,
                "failed_paths": []}


class RecordingTask(Task):
    """Tiny MAE; every micro-batch's sample indices are written down before its loss is computed."""

    name = "recording"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path

    def build_model(self, trainer: Trainer) -> torch.nn.Module:
        torch.manual_seed(0)
        self.rank = trainer.dist.rank
        return create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, depth=1, decoder_embed_dim=32,
                            decoder_depth=1, decoder_num_heads=2)

    def build_train_dataset(self, trainer: Trainer) -> torch.utils.data.Dataset:
        self.trainer = trainer
        return Samples()

    def loss(self, module: torch.nn.Module, batch: dict) -> torch.Tensor:
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"rank": self.rank, "step": self.trainer.state.global_step + 1,
                                "index": batch["index"].tolist()}) + "\n")
        return module(batch["clips"], 0.75, batch["noise"])[0]


def main(out: str, argv: list[str]) -> None:
    parser = add_run_flags(argparse.ArgumentParser())
    args = parse_args(parser, ["--output_dir", out, *argv])
    Trainer(run_config(args), RecordingTask(Path(out) / "seen.jsonl"), flag_values(args, parser)).fit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
