"""Checkpoints written before the checkpoint was a dict of stateful objects (commit 9200869 and earlier).

`legacy_checkpoint` writes a folder by hand exactly as that code did: the backend's files under
state/, and trainer_state.pt holding the Trainer's hand-made dict (the train position at the top,
`sampler`, `config`) plus what `Checkpointer.save` added (`rng` of every rank, `backend`,
`world_size`, `name`). Such a folder must resume exactly, import through `--finetune` and
`--init_from`, and export; a task that now keeps extras of its own is refused with the `--init_from`
command that works.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from common import batch, make_backend, make_model, micro_step  # noqa: E402

from util.checkpoint import TRAIN, Checkpointer, Value, find_latest, load_checkpoint  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.engine import SamplerPosition, TrainState  # noqa: E402
from util.errors import CheckpointError  # noqa: E402
from util.rng_state import RankRngState, rng_state  # noqa: E402
from util.safe_load import load_weights_file  # noqa: E402
from util.weights import read_weights  # noqa: E402

ALONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
CONFIG = {"model": "mae_vit_micro_patch8", "lr": 1e-3, "batch_size": 4}
# The tiny pretraining run of tests/test_trainer.py.
FAST = ["--synthetic_videos", "24", "--input_size", "32", "--num_frames", "4", "--pred_t_dim", "2",
        "--repeat_aug", "1", "--batch_size", "2", "--num_workers", "0", "--log_every", "1", "--blr", "5e-3",
        "--warmup_epochs", "1", "--decoder_embed_dim", "64", "--decoder_depth", "1", "--precision", "fp32",
        "--vis_every", "0"]


def legacy_trainer_state(st: TrainState, config: dict, rngs: list, backend: str, world_size: int, name: str) -> dict:
    """trainer_state.pt as the old `Trainer.save` + `Checkpointer.save` wrote it."""
    trainer_state = {**st.state_dict(), "sampler": {"epoch": st.epoch, "consumed": st.consumed}, "config": config}
    state = dict(trainer_state)
    state.update(rng=rngs, backend=backend, world_size=world_size, name=name)
    return state


def legacy_checkpoint(backend, out: Path, st: TrainState, config: dict = CONFIG) -> Path:
    """OUT/checkpoints/step-N written by hand in the old layout, with `latest` naming it (one process)."""
    name = f"step-{st.global_step}"
    ckpt = out / "checkpoints" / name
    backend.save(ckpt / "state")
    state = legacy_trainer_state(st, config, [rng_state()], backend.name, 1, name)
    torch.save(state, ckpt / "trainer_state.pt")
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    os.symlink(name, out / "checkpoints" / "latest")
    return ckpt


def train_step(backend, step: int) -> float:
    """One optimizer step on global samples [4 step, 4 step + 4)."""
    clips, noise = batch(list(range(4 * step, 4 * step + 4)))
    loss = micro_step(backend, clips, noise)
    backend.step()
    return loss.item()


def trainer_states(st: TrainState) -> dict:
    """The entries `Trainer._checkpoint_states` restores, for a task without extras."""
    return {TRAIN: st, "sampler": SamplerPosition(st), "rng": RankRngState()}


class TaskWithExtras:
    """A task that keeps state outside the model (e.g. a queue), as a checkpoint entry."""

    def __init__(self) -> None:
        self.queue = torch.zeros(3)

    def state_dict(self) -> dict:
        return {"queue": self.queue}

    def load_state_dict(self, state: dict) -> None:
        self.queue = state["queue"]


def test_the_checkpointer_still_writes_the_legacy_layout(tmp_path: Path) -> None:
    """The Trainer's entries saved by the Checkpointer give the old trainer_state.pt, key for key."""
    backend = make_backend(make_model(), ALONE)
    st = TrainState(epoch=1, step_in_epoch=3, global_step=9, consumed=12)
    torch.manual_seed(5)
    rngs = [rng_state()]
    Checkpointer(tmp_path).save(backend, "step-9", {**trainer_states(st), "config": Value(CONFIG)})
    saved = torch.load(tmp_path / "checkpoints" / "step-9" / "trainer_state.pt", weights_only=True)
    want = legacy_trainer_state(st, CONFIG, rngs, "ddp", 1, "step-9")
    assert saved.keys() == want.keys()
    assert {k: v for k, v in saved.items() if k != "rng"} == {k: v for k, v in want.items() if k != "rng"}
    assert torch.equal(saved["rng"][0]["torch"], want["rng"][0]["torch"])


def test_legacy_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    """Model, optimizer, position and RNG of an old-layout folder: the same losses and draws as going on."""
    backend = make_backend(make_model(), ALONE)
    train_step(backend, 0)
    train_step(backend, 1)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    st = TrainState(epoch=0, step_in_epoch=2, global_step=2, consumed=8)
    legacy_checkpoint(backend, tmp_path, st)
    want = [train_step(backend, s) for s in (2, 3)], random.random(), np.random.rand(), torch.rand(1).item()

    fresh, resumed = make_backend(make_model(), ALONE), TrainState()
    saved = load_checkpoint(fresh, find_latest(tmp_path), trainer_states(resumed))
    got = [train_step(fresh, s) for s in (2, 3)], random.random(), np.random.rand(), torch.rand(1).item()
    assert got == want
    assert resumed == st and saved["config"] == CONFIG


def test_legacy_checkpoint_with_a_task_that_now_keeps_extras_is_refused_naming_init_from(tmp_path: Path) -> None:
    """No 'task' entry in an old folder: refused before anything loads, with the command that works."""
    ckpt = legacy_checkpoint(make_backend(make_model(), ALONE), tmp_path, TrainState(global_step=1, consumed=4))
    st = TrainState()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(make_backend(make_model(), ALONE), ckpt, {**trainer_states(st), "task": TaskWithExtras()})
    message = str(exc.value)
    assert "'task' state is missing" in message and f"--init_from {ckpt}" in message and "--finetune" in message
    assert st == TrainState()  # nothing was restored


def test_entry_an_object_cannot_take_is_refused_naming_init_from(tmp_path: Path) -> None:
    """A train entry without its fields (hand-edited, or another version's) is a refusal, not a KeyError."""
    backend = make_backend(make_model(), ALONE)
    ckpt = legacy_checkpoint(backend, tmp_path, TrainState(global_step=1, consumed=4))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    del state["step_in_epoch"]
    torch.save(state, ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=r"'train' state does not fit \(KeyError.*--init_from"):
        load_checkpoint(make_backend(make_model(), ALONE), ckpt, trainer_states(TrainState()))


def test_task_extras_round_trip(tmp_path: Path) -> None:
    """A task's own entry is saved under 'task' and restored with the rest."""
    backend, task = make_backend(make_model(), ALONE), TaskWithExtras()
    task.queue = torch.arange(3.0)
    st = TrainState(global_step=4, step_in_epoch=4, consumed=16)
    Checkpointer(tmp_path).save(backend, "step-4", {**trainer_states(st), "task": task})
    again, resumed = TaskWithExtras(), TrainState()
    load_checkpoint(make_backend(make_model(), ALONE), find_latest(tmp_path), {**trainer_states(resumed), "task": again})
    assert torch.equal(again.queue, torch.arange(3.0)) and resumed == st


def _run(*cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.mark.slow  # end-to-end subprocess runs (10-60 s on 2 cores): .ci/run's slow step runs it
def test_legacy_run_folder_resumes_exports_and_feeds_finetune_and_init_from(tmp_path: Path) -> None:
    """A real run's step-2 rewritten in the old layout: export, info, --init_from DIR and --finetune DIR take
    it, and resuming it gives the losses of the uninterrupted run."""
    ref, out = tmp_path / "ref", tmp_path / "old"
    for folder, steps in ((ref, "4"), (out, "2")):
        proc = _run("main_pretrain.py", "--output_dir", str(folder), *FAST, "--max_steps", steps)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = find_latest(out)
    new = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    st = TrainState(**{k: new[k] for k in ("epoch", "step_in_epoch", "global_step", "consumed")})
    old = legacy_trainer_state(st, new["config"], new["rng"], new["backend"], new["world_size"], new["name"])
    assert old.keys() == new.keys()
    torch.save(old, ckpt / "trainer_state.pt")

    weights = tmp_path / "w.pth"
    export = _run("-m", "util.checkpoint", "export", str(ckpt), str(weights))
    assert export.returncode == 0, export.stderr[-3000:]
    sd = load_weights_file(weights)["model"]
    assert sd.keys() == read_weights(ckpt).keys() and all(torch.equal(sd[k], v) for k, v in read_weights(out).items())
    info = _run("-m", "util.checkpoint", "info", str(out / "checkpoints" / "latest"))
    assert "global_step: 2" in info.stdout and "backend: ddp" in info.stdout, info.stderr[-2000:]

    init = _run("main_pretrain.py", "--output_dir", str(tmp_path / "init"), *FAST, "--max_steps", "1",
                "--init_from", str(ckpt))
    assert init.returncode == 0, init.stderr[-3000:]
    finetune = _run("main_finetune.py", "--output_dir", str(tmp_path / "ft"), "--synthetic_videos", "16",
                    "--input_size", "32", "--num_frames", "4", "--batch_size", "2", "--repeat_aug", "1",
                    "--num_workers", "0", "--epochs", "1", "--precision", "fp32", "--max_steps", "1",
                    "--finetune", str(ckpt), "--test_num_temporal_views", "1", "--test_num_spatial_crops", "1")
    assert finetune.returncode == 0, finetune.stderr[-3000:]

    resumed = _run("main_pretrain.py", "--output_dir", str(out), *FAST, "--max_steps", "4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    got, want = _losses(out), _losses(ref)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(got[step] - want[step]) <= 1e-6 * max(1.0, abs(want[step])), (step, got[step], want[step])
