"""Launchers end to end on CPU: submitit (local executor) requeue after USR2, --dry_run, 2-node torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launchers import submitit_pretrain  # noqa: E402

# Micro model on 48 generated videos (32 in the train split): 8 steps per epoch on 2 ranks; saves only at
# epoch ends (and when stopped), all kept, so a mid-epoch checkpoint is one that a stop request made.
TRAIN = [
    "--synthetic_videos", "48", "--input_size", "32", "--num_frames", "4", "--pred_t_dim", "2",
    "--repeat_aug", "1", "--batch_size", "2", "--num_workers", "0", "--log_every", "1", "--blr", "5e-3",
    "--warmup_epochs", "1", "--decoder_embed_dim", "64", "--decoder_depth", "1", "--precision", "fp32",
    "--save_every", "0", "--keep_last", "20", "--vis_every", "0", "--epochs", "3",
]
TOTAL_STEPS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def read_log(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(out: Path) -> dict[int, float]:
    """Per-step losses, the last entry of a step winning (as readers of a resumed log do)."""
    return {rec["step"]: rec["loss"] for rec in read_log(out) if "loss" in rec}


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-6 * max(1.0, abs(loss)), (step, got[step], loss)


def run_reference(out: Path, args: list[str]) -> dict[int, float]:
    """Losses of one uninterrupted 2-rank run (torchrun, one node)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "main_pretrain.py"), "--output_dir", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return losses(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The uninterrupted run of TRAIN that the fast tests compare against."""
    got = run_reference(tmp_path_factory.mktemp("reference"), TRAIN)
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
    return got


def children(pid: int) -> list[int]:
    """Direct child processes of pid (Linux /proc)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def wait_done(job, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not job.done() and time.time() < deadline:
        time.sleep(0.2)
    if not job.done():
        job.cancel()
        pytest.fail(f"job did not finish in {timeout_s} s")


def task_log(job, job_dir: Path, task: int) -> str:
    """stdout + stderr of one task over all its (re)starts: submitit appends to the same files."""
    files = [job_dir / "submitit" / f"{job.job_id}_{task}_log.{ext}" for ext in ("out", "err")]
    return "".join(f.read_text() for f in files if f.exists())


def check_requeued_run(job, out: Path, reference: dict[int, float], total: int = TOTAL_STEPS) -> int:
    """Shared checks: requeued, resumed from the checkpoint written after the signal, exact losses."""
    summary = job.results()[0]  # rank 0's return value: main()'s summary
    assert summary["global_step"] == total
    err0 = task_log(job, out, 0)
    assert err0.count("Starting with JobEnvironment") >= 2, err0[-3000:]  # the task was started again
    resumed = [int(line.split("/step-")[1].split()[0]) for line in err0.splitlines() if "resumed from" in line]
    assert resumed, err0[-3000:]
    stop_step = resumed[0]
    assert 0 < stop_step < total
    log_steps = [rec["step"] for rec in read_log(out)]
    assert len(log_steps) == len(set(log_steps))  # a resume drops what it runs again: each step logged once
    assert_same_losses(losses(out), reference)
    return stop_step


@pytest.mark.slow  # end to end in subprocesses: .ci/run's slow step runs it
def test_usr2_to_local_tasks_saves_on_all_ranks_requeues_and_resumes_exactly(
    tmp_path: Path, reference: dict[int, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGUSR2 sent straight to both tasks of a 2-task LocalExecutor job, as SLURM does before a limit."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job_dir = tmp_path / "job"
    job = submitit_pretrain.main(["--cluster", "local", "--nodes", "1", "--ngpus", "2", "--timeout", "20",
                                  "--job_dir", str(job_dir), *TRAIN])
    deadline = time.time() + 300
    while len(read_log(job_dir)) < 2 and not job.done() and time.time() < deadline:
        time.sleep(0.05)
    tasks = children(job._process.pid)
    assert len(tasks) == 2 and not job.done(), "training ended before it could be signalled"
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    wait_done(job, 400)
    stop_step = check_requeued_run(job, job_dir, reference)
    # Both ranks took part in the save of that step (it is collective: each rank's RNG state is in it).
    import torch

    assert stop_step % 8, "the stop landed on an epoch end: retry"  # mid-epoch: made by the stop request only
    state = torch.load(job_dir / "checkpoints" / f"step-{stop_step}" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["global_step"] == stop_step
    for task in (0, 1):
        err = task_log(job, job_dir, task)
        assert "caught SIGUSR2" in err and "exiting for requeue" in err, err[-2000:]


@pytest.mark.slow
def test_time_limit_on_local_executor_requeues_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local controller's own USR2, 60 s before a 2-minute limit, lands mid-training on any machine.

    By construction: the run has 10^5 epochs, so it cannot finish before the signal however fast the
    machine is. After the requeue and resume, `touch OUT/STOP` ends the resumed run with a checkpoint
    (a STOP file stops without requeueing); the losses of every step must equal an uninterrupted run's.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    endless = [*TRAIN, "--epochs", "100000"]
    job_dir = tmp_path / "job"
    job = submitit_pretrain.main(["--cluster", "local", "--nodes", "1", "--ngpus", "2", "--timeout", "2",
                                  "--slurm_signal_delay_s", "60", "--max_requeues", "30",
                                  "--job_dir", str(job_dir), *endless])
    deadline = time.time() + 600
    resumed_at = None
    while time.time() < deadline and not job.done():
        err = task_log(job, job_dir, 0) if (job_dir / "submitit" / f"{job.job_id}_0_log.err").exists() else ""
        lines = [line for line in err.splitlines() if "resumed from" in line]
        if lines:
            resumed_at = int(lines[0].split("/step-")[1].split()[0])
            if max((rec["step"] for rec in read_log(job_dir)), default=0) >= resumed_at + 3:
                break
        time.sleep(0.5)
    assert resumed_at is not None, "the job was not requeued and resumed within 10 minutes"
    (job_dir / "STOP").touch()
    wait_done(job, 300)
    summary = job.results()[0]
    expected = run_reference(tmp_path / "reference", [*endless, "--max_steps", str(summary["global_step"])])
    check_requeued_run(job, job_dir, expected, summary["global_step"])


def test_dry_run_prints_the_sbatch_directives(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    job = submitit_pretrain.main(["--dry_run", "--nodes", "4", "--ngpus", "8", "--partition", "learnfair",
                                  "--timeout", "4320", "--slurm_signal_delay_s", "150", "--account", "vision",
                                  "--qos", "high", "--constraint", "a100-80gb", "--mem_gb", "480",
                                  "--exclude", "node[001-002]", "--job_dir", str(tmp_path / "j"),
                                  "--batch_size", "3", "--accum_iter", "2"])
    assert job is None
    captured = capsys.readouterr()
    text = captured.out
    assert text.startswith("#!/bin/bash")
    for directive in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=learnfair",
                      "--time=4320", "--signal=USR2@150", "--account=vision", "--qos=high",
                      "--constraint=a100-80gb", "--mem=480GB", "--exclude='node[001-002]'", "--cpus-per-task=10"):
        assert f"#SBATCH {directive}" in text, directive
    assert "srun" in text and "submitit.core._submit" in text
    assert "32 ranks" in captured.err and "per-GPU batch 3 x accum 2" in captured.err
    assert not (tmp_path / "j").exists()  # nothing submitted, nothing written


def test_dry_run_names_the_hsdp_layout_and_refuses_a_group_that_does_not_divide(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--hsdp_shard_size node` is one shard group per node (--ngpus, exported as LOCAL_WORLD_SIZE to the tasks);
    a count that does not divide --nodes x --ngpus stops before anything is printed or submitted."""
    base = ["--dry_run", "--nodes", "2", "--ngpus", "4", "--job_dir", str(tmp_path / "j"), "--dist", "fsdp"]
    submitit_pretrain.main([*base, "--hsdp_shard_size", "node"])
    assert "(HSDP: 2 replicas x shard groups of 4, one per node)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        submitit_pretrain.main([*base, "--hsdp_shard_size", "3"])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.out == ""
    assert "--hsdp_shard_size 3 (3 ranks per shard group) must divide the job's 8 ranks" in captured.err
    with pytest.raises(SystemExit):
        submitit_pretrain.main([*base, "--hsdp_shard_size", "nodes"])
    assert "an integer >= 0 or 'node'" in capsys.readouterr().err
    assert not (tmp_path / "j").exists()


def test_bad_main_flag_fails_before_submission(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        submitit_pretrain.main(["--cluster", "local", "--job_dir", str(tmp_path / "j"), "--mask_ratoi", "0.9"])
    assert exc.value.code == 2
    assert not (tmp_path / "j").exists()


@pytest.mark.parametrize("flags, named", [
    (["--nodes", "0"], "--nodes 0"), (["--timeout", "-5"], "--timeout -5"), (["--ngpus", "0"], "--ngpus 0"),
    (["--mem_gb", "0"], "--mem_gb 0"), (["--cpus_per_task", "-1"], "--cpus_per_task -1"),
    (["--max_requeues", "-1"], "--max_requeues -1"), (["--slurm_signal_delay_s", "-3"], "--slurm_signal_delay_s -3"),
    (["--timeout", "1", "--slurm_signal_delay_s", "60"], "below --timeout 1"),
])
def test_nonsensical_cluster_flags_are_refused_before_anything_is_printed(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], named: str) -> None:
    with pytest.raises(SystemExit) as exc:
        submitit_pretrain.main(["--dry_run", "--job_dir", str(tmp_path / "j"), *flags])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no half-made sbatch script
    assert named in captured.err
    assert not (tmp_path / "j").exists()


def test_two_node_torchrun_with_c10d_rendezvous_matches_one_node(tmp_path: Path, reference: dict[int, float]) -> None:
    """The README's multi-node command, as 2 'nodes' of 1 process on localhost, trains the same run."""
    out, port = tmp_path / "two_nodes", free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}",
             "--rdzv_id", "mae-test", str(ROOT / "main_pretrain.py"), "--output_dir", str(out), *TRAIN],
            cwd=ROOT, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert_same_losses(losses(out), reference)


RECIPES = sorted((ROOT / "configs" / "pretrain").glob("vit_*_k400*.yaml"))


def recipe_layout(recipe: Path):
    """(parsed flags, GPUs) of a recipe, from its `layout: N nodes x G GPUs` line."""
    import re

    import main_pretrain
    from util.config import parse_args

    args = parse_args(main_pretrain.get_args_parser(["--config", str(recipe)]), ["--config", str(recipe)])
    layout = re.search(r"layout: (\d+) nodes? x (\d+) GPUs?", recipe.read_text())
    assert layout, "the recipe must state its layout"
    return args, int(layout.group(1)) * int(layout.group(2))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_states_a_512_clip_layout(recipe: Path) -> None:
    """Every key is a main_pretrain flag; the stated nodes x GPUs x batch x repeat x accum is the paper's 512."""
    args, world = recipe_layout(recipe)
    clips_per_video = args.rho if args.objective.startswith("rho_") else args.repeat_aug  # rho sets repeat_aug
    assert args.batch_size * clips_per_video * args.accum_iter * world == 512 and args.precision == "bf16"
    if args.objective != "mae":  # the rho recipes (AdamW as MoCo v3 trains ViTs, 200 epochs as the rho study)
        assert args.objective in recipe.stem and args.epochs == 200 and args.blr == 1.5e-4
        return
    assert args.mask_ratio in (0.9, 0.95) and args.blr == 1.6e-3
    assert (args.mask_ratio == 0.95) == ("mr95" in recipe.stem) and (args.epochs * args.repeat_aug == 1600) == ("1600ep" in recipe.stem)
    assert (args.mask_type == "amt") == ("amt" in recipe.stem)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.stem.endswith("_80gb")], ids=lambda p: p.stem)
def test_80gb_recipe_fills_the_gpu_by_the_memory_plan(recipe: Path) -> None:
    """The 80 GB recipes take the largest power-of-two per-GPU batch whose computed memory fits 68 GiB at their
    layout (memory_plan.fit), and the GiB they state is that computation."""
    from benchmarks import memory_plan

    args, world = recipe_layout(recipe)
    best = memory_plan.fit(args.model, 68, args.dist, args.mask_ratio, args.precision, args.grad_ckpt, args.repeat_aug)
    assert (best["batch_size"], best["gpus_x_accum"]) == (args.batch_size, world)
    assert f"Memory: {best['computed_gib']:.1f} GiB per GPU, computed (not measured)" in recipe.read_text()
    assert len(list(RECIPES[0].parent.glob("vit_*_k400_80gb.yaml"))) == 3  # one per model size
