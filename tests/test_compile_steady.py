"""Compiled training steps are steady (issue 32): no graph break, no recompilation after the first step, and no
host read in the step but the CPU optimizer kernel's; `--compile model-cudagraphs` is refused where it cannot work.

The default tests run dynamo with its `eager` backend: graph breaks and recompilations are dynamo's (its
tracing and its guards), whatever backend then runs the graphs, and `eager` builds no kernels (seconds
instead of minutes on 2 cores). The slow tests repeat them with inductor, the default backend, and run
inductor's reduce-overhead mode (model-cudagraphs without its CUDA graphs) against eager.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from common import MASK_RATIO, batch, make_backend, make_model  # noqa: E402

from util.config import ParallelConfig  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.engine import train_step  # noqa: E402
from util.errors import ConfigError  # noqa: E402
from util.parallel import apply_compile, check_compile  # noqa: E402

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
# Ops that make a CUDA host wait for the device: a scalar read (.item(), float(t), bool(t)) or a data-dependent shape.
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::masked_select",
              "aten::unique", "aten::_unique2")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """One intra-op thread (tiny ops on a shared 2-core machine) and dynamo's caches and counters emptied."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(before)


def loss_fn(module: torch.nn.Module, b: dict) -> dict[str, torch.Tensor]:
    """The pretraining task's loss: the model's loss and its metrics (as tasks/mae.py returns them)."""
    loss, _, _, aux = module(b["clips"], MASK_RATIO, b["noise"], return_aux=True)
    return {"loss": loss, **aux["metrics"]}


def step(backend, i: int, accum: int = 1) -> None:
    """Optimizer step `i` on its own 4 samples, with its own lr, as the run loop drives it."""
    for g in backend.param_groups:
        g["lr"] = 1e-3 * (1 + i) / 10 * g["lr_scale"]
    clips, noise = batch(list(range(4 * i, 4 * i + 4)))
    micro = [{"clips": clips[k::accum], "noise": noise[k::accum]} for k in range(accum)]
    train_step(backend, micro, loss_fn, accum)


def host_reads(backend, i: int) -> list[tuple[str, tuple[str, ...]]]:
    """(op, its enclosing ops) of every host read in one profiled step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(backend, i)
    out = []
    for e in prof.events():
        if e.name in HOST_READS:
            chain, parent = [], e.cpu_parent
            while parent is not None:
                chain.append(parent.name)
                parent = parent.cpu_parent
            out.append((e.name, tuple(chain)))
    return out


def assert_steady(dist: str, mode: str, compile_backend: str, steps: int = 10, **over) -> None:
    """`steps` steps: graphs compiled in the first, none after it (a recompile is an error), no graph break;
    then one profiled step whose only host reads are the CPU fused AdamW kernel's."""
    backend = make_backend(make_model(), CPU, dist=dist, compile=mode, compile_backend=compile_backend, **over)
    step(backend, 0)
    graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    assert graphs >= 1, dict(counters["stats"])  # the step ran compiled graphs: the checks below check something
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(1, steps):
            step(backend, i)
        reads = host_reads(backend, steps)
    assert counters["stats"]["unique_graphs"] == graphs and dict(counters["graph_break"]) == breaks
    if dist == "fsdp" and mode == "model":
        # FSDP2's per-unit hooks (all-gather before a block, reshard after) are dynamo-disabled: the whole-model
        # graph splits at every sharded unit, as DDP's splits at its buckets. Nothing else may break it.
        assert breaks and all("torch._dynamo.disable()" in reason for reason in breaks), breaks
    else:
        assert not breaks, breaks
    # ATen's CPU _fused_adamw_ reads each parameter's step count on the host; the CUDA kernel reads it on the
    # device. Nothing else in the step reads: not the loss, the metrics, the mask, the grad norm nor the lr.
    others = [(op, chain[:4]) for op, chain in reads if "aten::_fused_adamw_" not in chain]
    assert not others, collections.Counter(others)
    n_params = sum(1 for p in backend.unwrapped.parameters() if p.requires_grad)
    assert collections.Counter(op for op, _ in reads) == {"aten::_local_scalar_dense": n_params,
                                                         "aten::item": n_params}


@pytest.mark.parametrize("dist, mode, over", [
    ("ddp", "blocks", {}), ("ddp", "model", {}), ("ddp", "model", {"accum_iter": 2}),
    ("fsdp", "blocks", {"grad_ckpt": True}), ("fsdp", "model", {}),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v)
def test_compiled_step_is_steady_and_reads_nothing_on_the_host(dist: str, mode: str, over: dict) -> None:
    """DDP and FSDP2 (one process; FSDP2 with checkpointed compiled blocks, torchtitan's order), both modes:
    10 steps of new data and lr, dynamo's eager backend."""
    accum = over.pop("accum_iter", 1)
    if accum == 1:
        assert_steady(dist, mode, "eager", **over)
        return
    backend = make_backend(make_model(), CPU, dist=dist, compile=mode, compile_backend="eager", accum_iter=accum)
    step(backend, 0, accum)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(1, 4):
            step(backend, i, accum)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == graphs >= 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_inductor_compiled_step_is_steady(mode: str) -> None:
    """The same with inductor, the default backend (it builds C++ kernels: about a minute per mode here)."""
    assert_steady("ddp", mode, "inductor", steps=6)


@pytest.mark.slow
def test_deepspeed_compiled_blocks_are_steady() -> None:
    """DeepSpeed (ZeRO-2 on a 1-rank gloo group) with compiled blocks: no graph break, no recompile after the first
    step. Slow: DeepSpeed builds its CPU communication op on first use. (Its step reads overflow flags and the
    grad norm on the host itself: docs/performance.md.)"""
    backend = make_backend(make_model(), CPU, dist="deepspeed", compile="blocks", compile_backend="eager")
    step(backend, 0)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(1, 10):
            step(backend, i)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == graphs >= 1, dict(counters)


@pytest.mark.slow
def test_reduce_overhead_compile_matches_eager_on_the_cpu() -> None:
    """model-cudagraphs' compile (inductor's reduce-overhead mode) where it can run here: on the CPU inductor
    captures no CUDA graph, and the compiled forward and backward give the eager loss and gradients."""
    clips, noise = batch([0, 1, 2, 3])
    eager = make_model()
    loss_ref = eager(clips, MASK_RATIO, noise)[0]
    loss_ref.backward()
    compiled = make_model()
    apply_compile(compiled, "model-cudagraphs")
    for _ in range(2):  # the second call runs the compiled graphs again
        compiled.zero_grad(set_to_none=True)
        loss = compiled(clips, MASK_RATIO, noise)[0]
        loss.backward()
        assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
        for (name, p), (_, q) in zip(compiled.named_parameters(), eager.named_parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dist, device, backend, problem", [
    ("ddp", "cpu", "inductor", "need a CUDA device, and this run is on the CPU"),
    ("deepspeed", "cuda", "inductor", "DeepSpeed's engine hooks into the whole model"),
    ("fsdp", "cuda", "inductor", "FSDP2 frees and re-gathers the parameters"),
    ("ddp", "cuda", "eager", "not --compile_backend eager"),
])
def test_cudagraphs_mode_is_refused_where_it_cannot_work(dist: str, device: str, backend: str, problem: str) -> None:
    """A ConfigError naming the problem and the fix (the check needs no GPU: it reads the device's type)."""
    cfg = ParallelConfig(dist=dist, compile="model-cudagraphs", compile_backend=backend)
    with pytest.raises(ConfigError, match="--compile model-cudagraphs") as err:
        check_compile(cfg, torch.device(device))
    assert problem in str(err.value) and "use --compile model" in str(err.value)
    check_compile(ParallelConfig(dist="ddp", compile="model-cudagraphs"), torch.device("cuda"))  # where it works


@pytest.mark.parametrize("dist", ["ddp", "deepspeed"])
def test_backend_refuses_cudagraphs_on_the_cpu_before_any_work(dist: str) -> None:
    """setup_parallel refuses first (no process group, no DeepSpeed import); on the CPU with DeepSpeed both
    problems are named."""
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device") as err:
        make_backend(model, CPU, dist=dist, compile="model-cudagraphs")
    assert ("DeepSpeed" in str(err.value)) == (dist == "deepspeed")
    assert not hasattr(model, "_compiled_call_impl") or model._compiled_call_impl is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
