"""Process-group setup from torchrun, SLURM (submitit) or a single process; rank-prefixed logging."""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-005,007],cpu01' -> 'gpu003'."""
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if first is None:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = first.group(1), first.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _env_layout() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's environment; (0, 1, 0) otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local = int(os.environ.get("SLURM_LOCALID", 0))
        if world > 1 and "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = first_slurm_host(os.environ["SLURM_JOB_NODELIST"])
        if world > 1 and "MASTER_PORT" not in os.environ:
            # Same port on every task without talking to each other: derive it from the job id.
            os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return rank, world, local
    return 0, 1, 0


def ranks_per_node(world_size: int, env: Mapping[str, str] | None = None) -> int:
    """Ranks on each node of this job: what `--hsdp_shard_size node` means.

    LOCAL_WORLD_SIZE (torchrun sets it, and submitit's TorchDistributedEnvironment that launchers/slurm.py
    exports), else SLURM_NTASKS_PER_NODE (srun with --ntasks-per-node), else SLURM_TASKS_PER_NODE when every
    node has the same count ("8(x4)"); one process alone is one node of one rank.
    """
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").strip():
            value = env[key].strip()
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--hsdp_shard_size node: {key}={value!r} is not a rank count; fix the launcher's "
                                 f"environment or give --hsdp_shard_size a number")
            return int(value)
    tasks = env.get("SLURM_TASKS_PER_NODE", "").strip()
    counts = {m.group(1) for m in re.finditer(r"(\d+)(\(x\d+\))?(,|$)", tasks)}
    if tasks and len(counts) == 1:
        return int(counts.pop())
    if world_size == 1:
        return 1
    why = (f"SLURM_TASKS_PER_NODE={tasks!r} differs between nodes" if tasks
           else "none of LOCAL_WORLD_SIZE, SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE is set")
    raise ValueError(f"--hsdp_shard_size node needs the ranks per node, but {why}: launch with torchrun "
                     f"--nproc_per_node, submitit (launchers/slurm.py) or srun --ntasks-per-node, or give a number")


def init_distributed(dist_backend: str | None = None, *, need_group: bool = False) -> DistInfo:
    """Join the job's process group (torchrun / SLURM env) or run alone; returns this rank's DistInfo.

    `need_group=True` creates a 1-rank group when running alone (FSDP2 and DeepSpeed need one).
    """
    rank, world, local = _env_layout()
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized() and (world > 1 or need_group):
        init_method = None
        if world == 1:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            if "MASTER_PORT" not in os.environ:
                # A private address, not MASTER_PORT in os.environ: child processes inherit the environment,
                # and a later run started from this process would try to listen on this group's port.
                init_method = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    info = DistInfo(rank=rank, world_size=world, local_rank=local, device=device, is_main=rank == 0)
    setup_logging(rank)
    return info


def ensure_process_group(info: DistInfo) -> None:
    """Create the 1-rank group a single process needs for FSDP2 / DeepSpeed, if none exists."""
    if not dist.is_initialized():
        init_distributed(need_group=True)


def setup_logging(rank: int) -> None:
    """Rank-prefixed logging: rank 0 at INFO, the others at WARNING (so their warnings still show)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0: the one that prints and writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks, as a new tensor (no host sync)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t.detach().clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_agree(flag: bool) -> bool:
    """True on every rank iff `flag` is True on every rank (one small collective; alone: the flag)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj: object) -> object:
    """Rank 0's picklable object, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: object) -> list:
    """Every rank's picklable object, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group, if any, after a closing barrier on gloo."""
    if dist.is_initialized():
        if dist.get_backend() == "gloo":
            # A gloo worker thread drops its last reference to a finished collective (and to the
            # tensors it used) just after waking the caller. If the interpreter is already
            # finalizing by then, that decref aborts the process ("terminate called without an
            # active exception", pytorch/pytorch#190489; measured here: 5 in ~60 runs of the
            # 2-rank eval test, 0 in 43 with it). The barrier keeps Python alive while those threads finish.
            dist.barrier()
        dist.destroy_process_group()


def set_cpu_threads(info: DistInfo, num_workers: int) -> int:
    """On the CPU, give each rank's compute the cores its data workers do not use; returns the count.

    Oversubscribed intra-op threads (2 compute threads + a decoding worker on 2 cores) spin at every
    op's barrier: measured here, that made a step 3-4x slower than one thread. OMP_NUM_THREADS
    set by the user (or by torchrun, which sets 1 for several processes) wins.
    """
    if info.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // local_world - num_workers)
    torch.set_num_threads(threads)
    return threads


def resolve_shard_size(value: int | str, world_size: int) -> int:
    """--hsdp_shard_size as a count: `node` is the ranks per node (`ranks_per_node`), 0 is off."""
    if value == "node":
        return ranks_per_node(world_size)
    if isinstance(value, str) and not value.isdigit():
        raise ValueError(f"--hsdp_shard_size {value!r} is neither a count nor 'node'")
    return int(value)


def fsdp_mesh_shape(world_size: int, hsdp_shard_size: int | str) -> tuple[int, ...]:
    """FSDP2's mesh shape: (world,) flat, or (replicate, shard) for HSDP; refuses a group size that does not divide."""
    size = resolve_shard_size(hsdp_shard_size, world_size)
    if hsdp_shard_size == "node":  # name what `node` became in the message
        hsdp_shard_size = f"node (= {size} ranks per node)"
    if size == 0:
        return (world_size,)
    if size < 0 or world_size % size:
        raise ValueError(f"--hsdp_shard_size {hsdp_shard_size} must divide the world size {world_size} "
                         "(shard groups of equal size; use the GPUs per node, or 0 for one flat mesh)")
    return (world_size // size, size)


def fsdp_mesh(device_type: str, world_size: int, hsdp_shard_size: int | str) -> DeviceMesh:
    """The device mesh fully_shard gets: 1-D over all ranks, or 2-D ("replicate", "shard") for HSDP.

    As torchtitan's parallel dims order it: the shard dimension is the inner one, so a shard group is
    consecutive ranks (one node's GPUs: all-gathers and reduce-scatters stay on the node's fast links)
    and only the gradient all-reduce crosses nodes.
    """
    shape = fsdp_mesh_shape(world_size, hsdp_shard_size)
    if len(shape) == 1:
        return init_device_mesh(device_type, shape)
    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))
