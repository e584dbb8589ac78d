"""Every README launch as a new user runs it: main_pretrain.py and main_finetune.py under
`torchrun --nproc_per_node 2` with each backend (ddp, fsdp, ZeRO-1/2/3) for a couple of steps.

The 2-rank parity tests drive the backends directly; these run the scripts themselves, which is how a
ZeRO-3-only crash in the main script (a FLOP count reading a 0-element parameter partition) went unseen.
Ten launches take several minutes on 2 cores, so they are `slow` for the default suite; `.ci/run`
runs them on every submission.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"ddp": ["--dist", "ddp"], "fsdp": ["--dist", "fsdp"],
            **{f"zero{s}": ["--dist", "deepspeed", "--zero_stage", str(s)] for s in (1, 2, 3)}}
COMMON = ["--synthetic_videos", "24", "--input_size", "32", "--num_frames", "4", "--repeat_aug", "1",
          "--batch_size", "2", "--num_workers", "0", "--log_every", "1", "--max_steps", "2", "--epochs", "1",
          "--precision", "fp32", "--no-auto_resume"]
PRETRAIN = [*COMMON, "--pred_t_dim", "2", "--decoder_embed_dim", "64", "--decoder_depth", "1", "--vis_every", "1"]
FINETUNE = [*COMMON, "--num_classes", "8", "--mixup", "0", "--cutmix", "0", "--rand_aug", "", "--reprob", "0",
            "--eval_split", "test", "--test_num_temporal_views", "1", "--test_num_spatial_crops", "1"]


def torchrun(script: str, out: Path, argv: list[str]) -> str:
    """`torchrun --nproc_per_node 2 SCRIPT ...` as the README writes it; fails with the output on error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / script), "--output_dir", str(out), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_readme_launches_pretrain_then_finetune_from_it(tmp_path: Path, backend: str) -> None:
    """Pretrain 2 steps on 2 ranks, then fine-tune from that run folder on 2 ranks with the same backend."""
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    log = torchrun("main_pretrain.py", pre, [*PRETRAIN, *BACKENDS[backend]])
    assert "GFLOP per clip" in log
    steps = [json.loads(line)["step"] for line in (pre / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (pre / "checkpoints" / "step-2" / "trainer_state.pt").is_file()
    torchrun("main_finetune.py", ft, [*FINETUNE, *BACKENDS[backend], "--finetune", str(pre)])
    result = json.loads((ft / "eval_test.json").read_text())
    assert result["videos"] == result["videos_total"] > 0
