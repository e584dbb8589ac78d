"""Shared submitit launcher: cluster flags + the main script's own flags, a requeueable Trainer, submission.

    python launchers/submitit_pretrain.py --nodes 8 --ngpus 8 --partition learn --timeout 4320 \
        --config configs/pretrain/vit_l_k400.yaml --data_path /data/k400 --job_dir /checkpoint/$USER/vit_l

Every flag the launcher does not know is parsed by the main script's parser (with its `--config`
defaults) before anything is submitted, so a typo fails here and not after hours in the queue.
Output (checkpoints, log.jsonl, TensorBoard) goes to `--job_dir` unless `--output_dir` is given;
submitit's logs and job pickles go to `JOB_DIR/submitit/`.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



def launcher_parser() -> argparse.ArgumentParser:
    """The cluster flags (everything else goes to the main script)."""
    # allow_abbrev=False: a prefix of a main-script flag must never be taken for a launcher flag.
    p = argparse.ArgumentParser("submitit launcher", add_help=False, allow_abbrev=False)
    g = p.add_argument_group("cluster (the remaining flags are the main script's)")
    g.add_argument("--nodes", type=int, default=1, help="nodes to use")
    g.add_argument("--ngpus", type=int, default=8, help="GPUs (= tasks = ranks) per node")
    g.add_argument("--partition", default=None, help="SLURM partition")
    g.add_argument("--account", default=None, help="SLURM account")
    g.add_argument("--qos", default=None, help="SLURM quality of service")
    g.add_argument("--constraint", default=None, help="SLURM node constraint, e.g. a100-80gb")
    g.add_argument("--timeout", type=int, default=4320, help="time limit of one job in minutes (the run requeues)")
    g.add_argument("--mem_gb", type=int, default=None, help="memory per node in GB (default: the partition's)")
    g.add_argument("--cpus_per_task", type=int, default=10, help="CPU cores per rank (data loading)")
    g.add_argument("--job_dir", default="", help="job folder: outputs and submitit logs (default runs/submitit/NAME-TIME)")
    g.add_argument("--job_name", default="", help="SLURM job name (default: from --config)")
    g.add_argument("--comment", default=None, help="SLURM comment")
    g.add_argument("--exclude", default=None, help="nodes to avoid, e.g. node[001-003]")
    g.add_argument("--slurm_signal_delay_s", type=int, default=120,
                   help="seconds before the limit that USR2 arrives: must cover one step plus one save")
    g.add_argument("--max_requeues", type=int, default=20, help="time-outs after which the job is not requeued")
    g.add_argument("--dry_run", action="store_true", help="print the sbatch script (or local parameters) and exit")
    g.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="slurm; local: this machine, one process per --ngpus, for tests; debug: in-process")
    return p


# (flag, lowest allowed value, why): values SLURM would reject in the queue, or accept and run nonsense with
_LOWEST = (("nodes", 1, "a job needs at least one node"), ("ngpus", 1, "one task (rank) per GPU, at least one"),
           ("timeout", 1, "a time limit in minutes"), ("mem_gb", 1, "memory per node in GB (leave out for the "
                                                                 "partition's default)"),
           ("cpus_per_task", 1, "CPU cores per rank"), ("slurm_signal_delay_s", 0, "seconds before the limit"),
           ("max_requeues", 0, "a count"))


def check_launcher_args(largs: argparse.Namespace) -> None:
    """Refuse nonsensical cluster flags (SystemExit 2 naming the flag) before anything is printed or submitted."""
    errors = [f"--{name} {getattr(largs, name)} must be >= {low} ({why})" for name, low, why in _LOWEST
              if getattr(largs, name) is not None and getattr(largs, name) < low]
    if not errors and largs.slurm_signal_delay_s >= largs.timeout * 60:
        errors.append(f"--slurm_signal_delay_s {largs.slurm_signal_delay_s} must be below --timeout "
                      f"{largs.timeout} min ({largs.timeout * 60} s): the stop signal would come before the job starts")
    if errors:
        launcher_parser().error("; ".join(errors))


class Trainer:
    """The submitted callable: sets up torch.distributed from submitit's environment and runs main(args)."""

    def __init__(self, args: argparse.Namespace, main_module: str) -> None:
        self.args = args
        self.main_module = main_module

    def __call__(self) -> Any:
        """Run the main script's main() as this task's rank."""
        import submitit

        # Keep every GPU visible: util.distributed picks cuda:LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        module = importlib.import_module(self.main_module)
        return module.main(copy.deepcopy(self.args))  # main() fills in args (lr); the requeue gets the originals

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The next submission after a time-out or preemption: the same run, resuming from OUT/checkpoints/latest.

        util.preemption calls this on rank 0 after the collective save (it stands in for submitit's
        in-signal call, which would exit rank 0 before the others saved). submitit's own handler calls
        it only before the watcher is installed (start-up), when there is nothing to save yet.
        """
        import submitit

        args = copy.deepcopy(self.args)
        args.resume, args.auto_resume = "", True
        return submitit.helpers.DelayedSubmission(Trainer(args, self.main_module))


def default_job_dir(args: argparse.Namespace, main_module: str) -> Path:
    """runs/submitit/<config or script>-<time>: a fresh folder per submission unless --job_dir names one."""
    stem = Path(args.config).stem if args.config else main_module
    return ROOT / "runs" / "submitit" / f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def slurm_parameters(largs: argparse.Namespace, job_name: str) -> dict[str, Any]:
    """SlurmExecutor parameters (also the keyword names of submitit's sbatch writer)."""
    params = dict(
        job_name=job_name, nodes=largs.nodes, ntasks_per_node=largs.ngpus, gpus_per_node=largs.ngpus,
        cpus_per_task=largs.cpus_per_task, time=largs.timeout, partition=largs.partition,
        account=largs.account, qos=largs.qos, constraint=largs.constraint, comment=largs.comment,
        exclude=largs.exclude, signal_delay_s=largs.slurm_signal_delay_s,
        mem=f"{largs.mem_gb}GB" if largs.mem_gb else None,
        # The tasks unpickle launchers.slurm.Trainer: the repository must be importable on every node.
        setup=[f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
    )
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(largs: argparse.Namespace, folder: Path, job_name: str) -> str:
    """The sbatch file submitit would write for these flags (made by submitit's own writer)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=str(folder), **slurm_parameters(largs, job_name))


def make_executor(largs: argparse.Namespace, folder: Path, job_name: str) -> Any:
    """A submitit executor for --cluster with the job's resources."""
    import submitit

    if largs.cluster == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=largs.max_requeues)
        ex.update_parameters(**slurm_parameters(largs, job_name))
        return ex
    if largs.nodes != 1:
        raise SystemExit(f"--cluster {largs.cluster} runs on this machine only: use --nodes 1")
    if largs.cluster == "debug":
        return submitit.DebugExecutor(folder=folder)
    import torch

    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=largs.max_requeues)
    ex.update_parameters(
        timeout_min=largs.timeout, tasks_per_node=largs.ngpus, signal_delay_s=largs.slurm_signal_delay_s,
        gpus_per_node=largs.ngpus if torch.cuda.is_available() else 0,
    )
    return ex


def hsdp_layout(args: argparse.Namespace, ngpus: int, world: int) -> str:
    """' (HSDP R x N)' for --hsdp_shard_size (`node` = --ngpus: the tasks submitit puts on each node, exported to
    the tasks as LOCAL_WORLD_SIZE); a group that does not divide the job is refused here, before submission."""
    size = str(getattr(args, "hsdp_shard_size", "0"))
    if size == "0":
        return ""
    n = ngpus if size == "node" else int(size)
    if world % n:
        launcher_parser().error(f"--hsdp_shard_size {size} ({n} ranks per shard group) must divide the job's "
                                f"{world} ranks (--nodes x --ngpus); use node (= --ngpus) or a divisor")
    return f" (HSDP: {world // n} replicas x shard groups of {n}{', one per node' if n == ngpus else ''})"


def launch(
    argv: Sequence[str],
    main_module: str,
    get_parser: Callable[[Sequence[str]], argparse.ArgumentParser],
    parse: Callable[[Sequence[str]], argparse.Namespace],
) -> Any:
    """Parse launcher + main flags, then submit (or print with --dry_run); returns the submitit job or None."""
    largs, rest = launcher_parser().parse_known_args(list(argv))
    check_launcher_args(largs)
    if "-h" in rest or "--help" in rest:
        launcher_parser().print_help()
        get_parser(rest).print_help()
        return None
    args = parse(rest)  # bad main flags exit here, with the --config defaults of the objective they name
    job_dir = Path(largs.job_dir).resolve() if largs.job_dir else default_job_dir(args, main_module)
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in rest):
        args.output_dir = str(job_dir)
    job_name = largs.job_name or (Path(args.config).stem if args.config else main_module)
    folder = job_dir / "submitit"
    world = largs.nodes * largs.ngpus
    summary = (f"{largs.nodes} node(s) x {largs.ngpus} GPU(s) = {world} ranks; per-GPU batch {args.batch_size} "
               f"x accum {args.accum_iter} x repeat_aug {args.repeat_aug} = "
               f"{args.batch_size * args.accum_iter * args.repeat_aug * world} clips per step; --dist {args.dist}"
               f"{hsdp_layout(args, largs.ngpus, world)}")
    if largs.dry_run:
        print(f"# {summary}\n# output_dir: {args.output_dir}", file=sys.stderr)  # stdout stays a valid script
        if largs.cluster == "slurm":
            print(sbatch_script(largs, folder, job_name))
        else:
            print(f"# {largs.cluster}: {largs.ngpus} task(s), timeout {largs.timeout} min, "
                  f"USR2 {largs.slurm_signal_delay_s} s before it")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    # The local controller and the tasks inherit this environment: make the repository importable there.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    job = make_executor(largs, folder, job_name).submit(Trainer(args, main_module))
    print(f"submitted job {job.job_id} ({largs.cluster}): {summary}")
    print(f"  output:  {args.output_dir}  (log.jsonl, tensorboard/, checkpoints/)")
    print(f"  stdout:  {job.paths.stdout}")
    print(f"  stderr:  {job.paths.stderr}")
    return job
