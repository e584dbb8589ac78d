"""Checkpoint directory protocol, weights-only loading, RNG round trip and the optimizer groups (one process)."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from common import batch, make_backend, make_model, micro_step  # noqa: E402
from dist_launch import REPO, run  # noqa: E402

from util.checkpoint import complete_checkpoints, find_latest, load_checkpoint, save_checkpoint  # noqa: E402
from util.checkpoint_cli import describe  # noqa: E402
from util.config import OptimConfig, ParallelConfig  # noqa: E402
from util.distributed import DistInfo, first_slurm_host  # noqa: E402
from util.optim import param_groups  # noqa: E402
from util.parallel import apply_checkpointing, deepspeed_config  # noqa: E402
from util.safe_load import load_weights_file  # noqa: E402

ALONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


def ddp_backend(**over):
    """A single-process DDP backend (plain module) over the tiny model."""
    return make_backend(make_model(), ALONE, **over)


def train_step(backend, step: int) -> float:
    """One optimizer step on global samples [4 step, 4 step + 4)."""
    clips, noise = batch(list(range(4 * step, 4 * step + 4)))
    loss = micro_step(backend, clips, noise)
    backend.step()
    return loss.item()


def test_save_prunes_to_keep_last_and_moves_latest(tmp_path: Path) -> None:
    """Five saves with keep_last=2 leave the two newest; latest names the newest; trainer state loads weights_only."""
    backend = ddp_backend()
    config = {"model": "mae_vit_micro_patch8", "lr": 1e-3}
    for step in range(1, 6):
        save_checkpoint(backend, tmp_path, f"step-{step}", {"global_step": step, "epoch": 0, "config": config}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-4", "step-5"]
    assert (root / "latest").is_symlink() and os.readlink(root / "latest") == "step-5"
    assert find_latest(tmp_path) == (root / "step-5").resolve()
    state = torch.load(root / "step-5" / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 5 and state["backend"] == "ddp" and state["world_size"] == 1
    assert state["config"] == config and "lr: 0.001" in (root / "step-5" / "config.yaml").read_text()
    assert "global_step: 5" in describe(root / "latest")
    assert not list(root.glob("*.tmp")) and not list(root.glob(".latest*"))


def test_resume_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    """Save, go on (2 steps, RNG draws), load into a fresh backend: identical losses and RNG draws."""
    backend = ddp_backend()
    train_step(backend, 0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(backend, tmp_path, "step-1", {"global_step": 1})
    want = [train_step(backend, s) for s in (1, 2)], random.random(), np.random.rand(), torch.rand(1).item()
    fresh = ddp_backend()
    state = load_checkpoint(fresh, find_latest(tmp_path))
    got = [train_step(fresh, s) for s in (1, 2)], random.random(), np.random.rand(), torch.rand(1).item()
    assert state["global_step"] == 1
    assert got == want


def test_killed_save_leaves_previous_latest_loadable(tmp_path: Path) -> None:
    """A process SIGKILLed inside a save: `latest` still names the previous complete checkpoint, which loads."""
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "tests/dist/kill_save.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = tmp_path / "checkpoints"
    assert (root / "step-2.tmp" / "state" / "half-written.bin").exists()  # the save really died half-way
    assert find_latest(tmp_path) == (root / "step-1").resolve()
    backend = ddp_backend()
    assert load_checkpoint(backend, find_latest(tmp_path))["global_step"] == 1
    save_checkpoint(backend, tmp_path, "step-3", {"global_step": 3})  # a later save cleans the stale .tmp
    assert not (root / "step-2.tmp").exists() and find_latest(tmp_path) == (root / "step-3").resolve()


class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_weights_only_refuses_a_malicious_pickle(tmp_path: Path) -> None:
    """A pickle whose __reduce__ would create a directory is refused with the file named; the code never runs."""
    marker, bad = tmp_path / "pwned", tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"model": _Exploit(str(marker))}, f, protocol=2)
    with pytest.raises(ValueError, match=r"evil\.pth is not a plain weights checkpoint"):
        load_weights_file(bad)
    assert not marker.exists()


def test_export_and_info_cli_on_a_ddp_checkpoint(tmp_path: Path) -> None:
    """`python -m util.checkpoint export/info` on a one-file DDP checkpoint, offline."""
    backend = ddp_backend(grad_ckpt=True)  # wrapper names must not leak into the export
    train_step(backend, 0)
    save_checkpoint(backend, tmp_path, "step-1", {"global_step": 1, "epoch": 0})
    weights = tmp_path / "w.pth"
    run([sys.executable, "-m", "util.checkpoint", "export", str(tmp_path / "checkpoints/latest"), str(weights)])
    sd = load_weights_file(weights)["model"]
    assert not make_model().load_state_dict(sd, strict=True).missing_keys
    assert all(torch.equal(sd[k], v) for k, v in backend.full_model_state_dict().items())
    info = run([sys.executable, "-m", "util.checkpoint", "info", str(tmp_path / "checkpoints/latest")])
    assert "backend: ddp" in info and "global_step: 1" in info and "format: ddp" in info


def test_loading_another_backends_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    """A DDP checkpoint is not silently loaded by another backend."""
    save_checkpoint(ddp_backend(), tmp_path, "step-1", {"global_step": 1})
    other = ddp_backend()
    other.name = "fsdp"
    with pytest.raises(ValueError, match="saved by --dist ddp"):
        load_checkpoint(other, find_latest(tmp_path))


def test_param_groups_decay_rules_and_layer_scales() -> None:
    """wd_skip tokens: no decay on biases, norms, pos-embeds and tokens; lr_scale = decay ** (L - 1 - layer); wrapper names cleaned."""
    model = make_model()
    apply_checkpointing(model)
    groups = param_groups(model, 0.05, layer_decay=0.5, skip_tokens=True)  # the fine-tuning convention
    by_name = {n: g for g in groups for n in g["names"]}
    assert len(by_name) == len(list(model.parameters()))
    assert all("_checkpoint_wrapped_module" not in n for n in by_name)
    for n in ("cls_token", "pos_embed_spatial", "mask_token", "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias"):
        assert by_name[n]["weight_decay"] == 0.0, n
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    L = model.num_layers
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == 0.5 ** (L - 1)
    assert by_name["blocks.1.mlp.fc1.weight"]["lr_scale"] == 0.5 ** (L - 3)
    assert by_name["decoder_pred.weight"]["lr_scale"] == 1.0
    assert {g["lr_scale"] for g in param_groups(model, 0.05)} == {1.0}


def test_backend_flags_validation_and_deepspeed_config(tmp_path: Path) -> None:
    """fp16 on FSDP is refused with a hint; a user DeepSpeed JSON is merged over the generated config."""
    with pytest.raises(ValueError, match="use bf16"):
        make_backend(make_model(), ALONE, dist="fsdp", precision="fp16")
    with pytest.raises(ValueError, match="choose one of"):
        make_backend(make_model(), ALONE, dist="horovod")
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 2.0}))
    par, opt = ParallelConfig(dist="deepspeed", zero_stage=3, precision="bf16"), OptimConfig(clip_grad=2.0)
    cfg = deepspeed_config(par, opt, accum_iter=4, micro_batch=8)
    assert cfg["zero_optimization"] == {"stage": 3} and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"] and cfg["train_micro_batch_size_per_gpu"] == 8
    par.deepspeed_config = str(user)
    cfg = deepspeed_config(par, opt, accum_iter=4, micro_batch=8)
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True} and cfg["gradient_clipping"] == 2.0


@pytest.mark.parametrize("json_part, named", [
    ({"gradient_accumulation_steps": 8}, ("gradient_accumulation_steps is 8", "--accum_iter gives 4")),
    ({"bf16": {"enabled": False}, "fp16": {"enabled": True}}, ("bf16.enabled is False", "--precision gives 'bf16'")),
    ({"gradient_clipping": 1.0}, ("gradient_clipping is 1.0", "--clip_grad gives 0.5")),
    ({"train_micro_batch_size_per_gpu": 2}, ("train_micro_batch_size_per_gpu is 2", "--batch_size gives 8")),
])
def test_deepspeed_json_that_disagrees_with_the_flags_stops_at_start(tmp_path: Path, json_part: dict,
                                                                      named: tuple[str, str]) -> None:
    """The loop's accumulation, precision, clipping and batch must be DeepSpeed's too: both values named."""
    user = tmp_path / "ds.json"
    user.write_text(json.dumps(json_part))
    par = ParallelConfig(dist="deepspeed", zero_stage=2, precision="bf16", deepspeed_config=str(user))
    with pytest.raises(ValueError) as exc:
        deepspeed_config(par, OptimConfig(clip_grad=0.5), accum_iter=4, micro_batch=8)
    for text in named:
        assert text in str(exc.value), str(exc.value)


def test_first_slurm_host() -> None:
    """The master address is the first host of a compressed SLURM node list."""
    assert first_slurm_host("gpu[003-005,007],cpu01") == "gpu003"
    assert first_slurm_host("node7,node8") == "node7"
    assert first_slurm_host("a-b[10]") == "a-b10"
