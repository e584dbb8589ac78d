"""HSDP: FSDP2 on a 2-D (replicate, shard) mesh.

Default suite: the mesh shapes and the refusals, and a 1 x 1 HSDP backend in this process (no launch).
Also `--hsdp_shard_size node` (the resolver, the flag's check). Slow: 4 gloo processes as 2 x 2 against one plain process on the same global batch (the parity
tolerances of tests/test_parallel.py), then its DCP checkpoint resumed on 1 x 4 (flat and 2-D) and on 1 process; and `node` on two torchrun agents of 2 ranks each (a 2 x 2 mesh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from common import CLIP, MASK_RATIO, batch, lr_at, make_backend, make_model, reference_run  # noqa: E402
from dist_launch import DIST, REPO, python, torchrun  # noqa: E402
from test_parallel import LOSS_RTOL, PARAM_ATOL, close  # noqa: E402

from util.distributed import DistInfo, free_port, fsdp_mesh_shape, ranks_per_node, resolve_shard_size  # noqa: E402

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


@pytest.mark.parametrize("world, size, shape", [(4, 0, (4,)), (4, 2, (2, 2)), (4, 4, (1, 4)), (4, 1, (4, 1)),
                                                (16, 8, (2, 8)), (1, 1, (1, 1))])
def test_mesh_shape(world: int, size: int, shape: tuple) -> None:
    """0 keeps today's flat mesh; N gives (world / N replicas, N shards)."""
    assert fsdp_mesh_shape(world, size) == shape


@pytest.mark.parametrize("world, size", [(4, 3), (2, 4), (6, 4), (4, -1)])
def test_group_size_must_divide_the_world(world: int, size: int) -> None:
    """Unequal shard groups are refused, naming the flag and the world size."""
    with pytest.raises(ValueError, match=f"--hsdp_shard_size {size} must divide the world size {world}"):
        fsdp_mesh_shape(world, size)


@pytest.mark.parametrize("over", [{"dist": "ddp"}, {"dist": "deepspeed", "zero_stage": 3}])
def test_hsdp_needs_fsdp(over: dict) -> None:
    """DDP and DeepSpeed have no shard groups: the flag is refused before any wrapping."""
    with pytest.raises(ValueError, match="needs --dist fsdp"):
        make_backend(make_model(), CPU, hsdp_shard_size=1, **over)


def test_fsdp_refuses_a_group_larger_than_the_world() -> None:
    """One process cannot hold a shard group of 2."""
    with pytest.raises(ValueError, match="must divide the world size 1"):
        make_backend(make_model(), CPU, dist="fsdp", hsdp_shard_size=2)


def test_one_process_hsdp_is_a_2d_mesh_and_trains_like_the_plain_model() -> None:
    """A 1 x 1 HSDP backend: named 2-D mesh, (Replicate, Shard(0)) weights, and the plain loss and clipped norm."""
    ref_losses, _, ref_norms = reference_run(2)
    backend = make_backend(make_model(), CPU, dist="fsdp", hsdp_shard_size=1, lr=1e-3)
    assert tuple(backend.mesh.shape) == (1, 1) and backend.mesh.mesh_dim_names == ("replicate", "shard")
    assert all(tuple(p.placements) == (Replicate(), Shard(0)) for p in backend.module.parameters())
    for s in range(2):
        for g in backend.param_groups:
            g["lr"] = lr_at(s) * g["lr_scale"]
        clips, noise = batch(list(range(s * 4, (s + 1) * 4)))
        with backend.microstep(True):
            loss, _, _ = backend.module(clips, MASK_RATIO, noise)
            backend.backward(loss)
        norm = backend.step()
        assert not hasattr(norm, "full_tensor") and norm.dim() == 0
        assert close([loss.item(), float(norm)], [ref_losses[s], ref_norms[s]], LOSS_RTOL)
    assert ref_norms[0] > CLIP  # so the clipping was exercised


@pytest.fixture(scope="module")
def hsdp_runs(tmp_path_factory) -> tuple[dict, dict]:
    """2 x 2 on 4 gloo ranks (parity, save at step 3, resume on 1 x 4 flat and 2-D), then 1 process resumes it."""
    out = tmp_path_factory.mktemp("hsdp")
    ckpt = out / "fsdp_hsdp=2"
    torchrun(4, "worker.py", out, "fsdp:hsdp=2", f"resume_from={ckpt},fsdp", f"resume_from={ckpt},fsdp:hsdp=4",
             timeout=1200)
    one = out / "one"
    one.mkdir()
    python("worker.py", one, f"resume_from={ckpt},fsdp")
    four = json.loads((out / "results.json").read_text())
    return four, json.loads((one / "results.json").read_text()) | {"ckpt": str(ckpt)}


@pytest.mark.slow
def test_hsdp_2x2_matches_one_process(hsdp_runs) -> None:
    """Losses and grad norms within 1e-5 relative, parameters within 3e-5 (test_parallel's standard)."""
    r = hsdp_runs[0]["fsdp:hsdp=2"]
    assert r["mesh"]["shape"] == [2, 2] and r["mesh"]["names"] == ["replicate", "shard"]
    assert r["mesh"]["placements"] == ["Replicate()", "Shard(dim=0)"]
    assert r["mesh"]["local_numel"] * 2 == r["mesh"]["numel"]  # rank 0 holds half of the largest weight
    assert close(r["losses"], r["ref_losses"], LOSS_RTOL), r
    assert close(r["norms"], r["ref_norms"], LOSS_RTOL), r
    assert r["params"]["max_abs"] <= PARAM_ATOL, r["params"]
    assert close(r["after_load"], r["after_save"], 1e-6), r
    assert close(r["after_load"], r["ref_after"], LOSS_RTOL), r


@pytest.mark.slow
@pytest.mark.parametrize("where", ["flat 1x4", "2-D 1x4", "one process"])
def test_hsdp_checkpoint_resumes_on_other_meshes(hsdp_runs, where: str) -> None:
    """DCP reshards the 2 x 2 checkpoint (step 3): every other layout continues with the 2 x 2 losses."""
    four, one = hsdp_runs
    ckpt = one["ckpt"]
    r = {"flat 1x4": four.get(f"resume_from={ckpt},fsdp"), "2-D 1x4": four.get(f"resume_from={ckpt},fsdp:hsdp=4"),
         "one process": one.get(f"resume_from={ckpt},fsdp")}[where]
    assert (r["saved_world"], r["global_step"]) == (4, 3)
    assert close(r["losses"], four["fsdp:hsdp=2"]["after_save"], LOSS_RTOL), r


# ----------------------------------------------------------------------------- --hsdp_shard_size node
@pytest.mark.parametrize("env, world, want", [
    ({"LOCAL_WORLD_SIZE": "2"}, 4, 2),                                   # torchrun, submitit's exported env
    ({"LOCAL_WORLD_SIZE": "8", "SLURM_NTASKS_PER_NODE": "4"}, 16, 8),   # the launcher's own count wins
    ({"SLURM_NTASKS_PER_NODE": "4"}, 8, 4),                              # srun --ntasks-per-node
    ({"SLURM_TASKS_PER_NODE": "8(x4)"}, 32, 8),                          # plain srun: uniform nodes
    ({"SLURM_TASKS_PER_NODE": "2"}, 2, 2),
    ({}, 1, 1),                                                          # one process is one node
])
def test_ranks_per_node_from_the_launchers_environment(env: dict, world: int, want: int) -> None:
    """`node` is read from torchrun / submitit (LOCAL_WORLD_SIZE), then SLURM's per-node task counts."""
    assert ranks_per_node(world, env) == want


@pytest.mark.parametrize("env, match", [
    ({}, "none of LOCAL_WORLD_SIZE"), ({"SLURM_TASKS_PER_NODE": "8(x2),4"}, "differs between nodes"),
    ({"LOCAL_WORLD_SIZE": "two"}, "LOCAL_WORLD_SIZE='two' is not a rank count")])
def test_ranks_per_node_refuses_an_unknown_layout(env: dict, match: str) -> None:
    """Several ranks and no per-node count (or an uneven one): refused, naming the variables and the fix."""
    with pytest.raises(ValueError, match=match):
        ranks_per_node(4, env)


def test_node_shard_size_resolves_to_the_local_world(monkeypatch) -> None:
    """`node` with 2 ranks per node of 4 is a 2 x 2 mesh; one that does not divide names what `node` became."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_shard_size("node", 4) == 2 and fsdp_mesh_shape(4, "node") == (2, 2)
    assert fsdp_mesh_shape(4, "4") == (1, 4) and fsdp_mesh_shape(4, "0") == (4,)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"--hsdp_shard_size node \(= 3 ranks per node\) must divide the world size 4"):
        fsdp_mesh_shape(4, "node")


@pytest.mark.parametrize("value, ok", [("node", True), ("0", True), ("8", True), ("-1", False), ("nodes", False),
                                       ("2.5", False), ("", False)])
def test_config_checks_the_shard_size_before_any_work(value: str, ok: bool, capsys) -> None:
    """The flag takes a count or `node`; anything else stops argument parsing with the rule."""
    from util.config import ParallelConfig, add_flags, parse_args

    parser = add_flags(argparse.ArgumentParser(), ParallelConfig, "parallel")
    if ok:
        assert parse_args(parser, ["--hsdp_shard_size", value]).hsdp_shard_size == value
        return
    with pytest.raises(SystemExit):
        parse_args(parser, ["--hsdp_shard_size", value])
    assert "an integer >= 0 or 'node'" in capsys.readouterr().err


def test_yaml_shard_size_may_be_a_number(tmp_path: Path) -> None:
    """`hsdp_shard_size: 8` in a recipe is the count 8 (as the flag's text); `true` is refused."""
    from util.config import ParallelConfig, add_flags, parse_args

    parser = add_flags(argparse.ArgumentParser(), ParallelConfig, "parallel")
    parser.add_argument("--config")
    (tmp_path / "a.yaml").write_text("hsdp_shard_size: 8\n")
    assert fsdp_mesh_shape(16, parse_args(parser, ["--config", str(tmp_path / "a.yaml")]).hsdp_shard_size) == (2, 8)
    (tmp_path / "b.yaml").write_text("hsdp_shard_size: -2\n")
    with pytest.raises(SystemExit):
        parse_args(parser, ["--config", str(tmp_path / "b.yaml")])


@pytest.mark.slow
def test_node_shorthand_on_two_torchrun_nodes_of_two(tmp_path: Path) -> None:
    """Two torchrun agents (--nnodes 2, 2 ranks each: LOCAL_WORLD_SIZE=2) on this host: `node` is a 2 x 2 HSDP
    mesh, and its losses match one process on the same global batch."""
    port = free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node",
         "2", "--master_addr", "127.0.0.1", "--master_port", str(port), str(DIST / "worker.py"), str(tmp_path),
         "fsdp:hsdp=node"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    logs = [a.communicate(timeout=900)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(log[-4000:] for log in logs)
    r = json.loads((tmp_path / "results.json").read_text())["fsdp:hsdp=node"]
    assert r["mesh"]["shape"] == [2, 2] and r["mesh"]["names"] == ["replicate", "shard"]
    assert close(r["losses"], r["ref_losses"], LOSS_RTOL), r
    assert close(r["norms"], r["ref_norms"], LOSS_RTOL), r
