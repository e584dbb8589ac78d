"""Activation checkpointing modes (`--ckpt_mode block|every_k|selective`): the eager gradients under DDP (one
process) and FSDP2, selective checkpointing recomputes the elementwise ops but not the matmuls, and the flags.
(The memory planner's figures per mode: tests/test_launch_memory_plan.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from common import MASK_RATIO, batch, make_backend, make_model  # noqa: E402

from util.config import OptimConfig, ParallelConfig  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.optim import clean_name  # noqa: E402
from util.parallel import checkpoint_mode, deepspeed_config  # noqa: E402

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
MODES = ("block", "every_k", "selective")
UNITS = 3  # make_model(): 2 encoder blocks + 1 decoder block


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine run far slower with two spinning threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def eager_loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of the plain model, no backend, no checkpointing."""
    model = make_model()
    clips, noise = batch([0, 1, 2, 3])
    loss, _, _ = model(clips, MASK_RATIO, noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def full(g: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a (possibly DTensor) gradient."""
    return g.full_tensor() if hasattr(g, "full_tensor") else g


@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_gives_the_eager_gradients(dist: str, mode: str) -> None:
    """Every mode wraps the units it names and gives the eager loss and every gradient to 1e-5."""
    ref_loss, ref = eager_loss_and_grads()
    backend = make_backend(make_model(), CPU, dist=dist, ckpt_mode=mode)
    wrappers = [m for m in backend.unwrapped.modules() if isinstance(m, CheckpointWrapper)]
    assert len(wrappers) == {"block": UNITS, "every_k": 2, "selective": UNITS}[mode]  # every_k: units 0 and 2
    assert all(("context_fn" in w.checkpoint_fn.keywords) == (mode == "selective") for w in wrappers)
    clips, noise = batch([0, 1, 2, 3])
    with backend.microstep(True):
        loss, _, _ = backend.module(clips, MASK_RATIO, noise)
        backend.backward(loss)
    assert torch.allclose(loss.detach(), ref_loss, rtol=1e-5, atol=0)
    got = {clean_name(n): full(p.grad) for n, p in backend.module.named_parameters()}
    assert sorted(got) == sorted(ref) and len(got) > 20
    for name, g in got.items():
        assert torch.allclose(g, ref[name], rtol=1e-5, atol=1e-7), name


class CountOps(TorchDispatchMode):
    """Counts the aten ops run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["none", *MODES])
def test_backward_recomputes_what_the_mode_says(mode: str) -> None:
    """Recomputed forward ops seen in backward: none recomputes nothing; block re-runs every unit's linears
    (addmm; backward itself uses mm) up to GELU: 3 of 4, as non-reentrant checkpointing stops once what backward
    needs is rebuilt (fc2's output is not); every_k the same for units 0 and 2 only; selective re-runs the
    GELU of every unit but no matmul (their outputs were kept)."""
    backend = make_backend(make_model(), CPU, ckpt_mode=mode)
    clips, noise = batch([0, 1, 2, 3])
    loss, _, _ = backend.module(clips, MASK_RATIO, noise)
    with CountOps() as ops:
        loss.backward()
    recomputed_units = {"none": 0, "block": UNITS, "every_k": 2, "selective": UNITS}[mode]
    linears = 0 if mode in ("none", "selective") else 3 * recomputed_units
    assert ops.counts.get("aten.addmm.default", 0) == linears, ops.counts
    assert ops.counts.get("aten.gelu.default", 0) == recomputed_units, ops.counts


def test_mode_flags_resolve_and_contradictions_are_refused() -> None:
    """--grad_ckpt alone is block; --ckpt_mode chooses; --ckpt_every outside every_k is an error naming both."""
    assert checkpoint_mode(ParallelConfig()) == "none"
    assert checkpoint_mode(ParallelConfig(grad_ckpt=True)) == "block"
    assert checkpoint_mode(ParallelConfig(grad_ckpt=True, ckpt_mode="selective")) == "selective"
    assert checkpoint_mode(ParallelConfig(ckpt_mode="every_k", ckpt_every=3)) == "every_k"
    with pytest.raises(ValueError, match="--ckpt_every 3 applies to --ckpt_mode every_k only"):
        checkpoint_mode(ParallelConfig(grad_ckpt=True, ckpt_every=3))
    with pytest.raises(ValueError, match="--ckpt_every"):
        make_backend(make_model(), CPU, ckpt_mode="selective", ckpt_every=4)


def test_flags_parse_from_the_command_line() -> None:
    """The mains accept the mode flags (one definition: ParallelConfig)."""
    from main_pretrain import get_args_parser
    from util.config import parse_args, section

    args = parse_args(get_args_parser(), ["--ckpt_mode", "every_k", "--ckpt_every", "4"])
    cfg = section(ParallelConfig, args)
    assert (cfg.ckpt_mode, cfg.ckpt_every, checkpoint_mode(cfg)) == ("every_k", 4, "every_k")
    with pytest.raises(SystemExit):
        parse_args(get_args_parser(), ["--ckpt_mode", "attention"])


def test_deepspeed_activation_checkpointing_section_is_refused(tmp_path: Path) -> None:
    """DeepSpeed's engine never applies that section to a plain model: refused, pointing at --ckpt_mode."""
    cfg_file = tmp_path / "ds.json"
    cfg_file.write_text(json.dumps({"activation_checkpointing": {"partition_activations": True}}))
    cfg = ParallelConfig(dist="deepspeed", precision="fp32", deepspeed_config=str(cfg_file))
    with pytest.raises(ValueError, match="activation_checkpointing section would be silently ignored.*--ckpt_mode"):
        deepspeed_config(cfg, OptimConfig(), 1, 2)
