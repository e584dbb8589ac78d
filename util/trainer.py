"""The run loop every training shares: MAE pretraining, fine-tuning, and the objectives that plug in.

A `Task` (util/task.py; one module per objective in tasks/) says what differs: how to build the model
(and fill it for a fresh run), the training data, the loss of one batch, and what happens after a
step, at an epoch's end and after the last one. The `Trainer` does the rest, once: process group and
threads, seeding, preemption, resume (exact, on any world size the backend allows), the parallel
backend, the loader, the epoch loop with logging, NaN checks and saves, and teardown. Its hooks get a
`RunContext`, never the Trainer. `main_pretrain.py` and `main_finetune.py` are flags plus a task lookup.

    trainer = Trainer(run_config(args), MyTask(...), config_values=flag_values(args, parser))
    summary = trainer.run()          # fit(); evaluate() for a test-only run; the --bench runner (util/bench.py)

Inside a step (`util/engine.train_step`) the backend is told which micro-step is the last; the loop
never syncs the host with the device except on log and save steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from datasets import FailureTracker, ResumableDistributedSampler
from datasets.loader import batches
from datasets.mixture import SourceFailures, fingerprint_changes
from util.checkpoint import (
    TRAIN,
    Checkpointer,
    Stateful,
    Value,
    find_latest,
    find_resumable,
    load_checkpoint,
    read_trainer_state,
)
from util.config import ConfigError, RunConfig, save_config
from util.distributed import DistInfo, all_agree, cleanup, init_distributed, set_cpu_threads
from util.engine import SamplerPosition, StepWindow, TrainState, step_seed, steps_in_epoch, train_step
from util.flops import device_peak_flops
from util.logger import TrainLogger, peak_memory_gb
from util.lr_sched import apply_lr, effective_lr, lr_at, schedule_line
from util.parallel import Backend, carry_optimizer_state, check_compile, setup_parallel
from util.preemption import PreemptionWatcher
from util.rng_state import RankRngState
from util.run_lock import RunLock, RunLockedError, acquire_run_lock
from util.task import RunContext, Task
from util.weights import read_optimizer_state

log = logging.getLogger("mae_st.trainer")
DATA_MIXTURE = "data_mixture"  # the checkpoint entry holding the mixture's fingerprint (datasets/mixture.py)
ARCHITECTURE_FLAGS = ("model", "input_size", "num_frames", "t_patch_size", "cls_embed", "sep_pos_embed", "init_values")


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], config_values: dict[str, Any]) -> RunConfig:
    """`cfg` with the task's fixed flags set (a new config: the caller's is not changed); recorded in `config_values`."""
    for name, value in overrides.items():
        for f in dataclasses.fields(cfg):
            part = getattr(cfg, f.name)
            if name in {g.name for g in dataclasses.fields(part)}:
                if getattr(part, name) != value:
                    log.info("the task sets --%s %s (was %s)", name, value, getattr(part, name))
                cfg = dataclasses.replace(cfg, **{f.name: dataclasses.replace(part, **{name: value})})
                config_values[name] = value
                break
        else:
            raise ConfigError(f"the task overrides --{name}, which is no shared flag")
    return cfg


class Trainer:
    """One training run of a task: wiring, resume, the epoch loop, saving and teardown."""

    def __init__(self, cfg: RunConfig, task: Task, config_values: dict[str, Any]) -> None:
        self.config_values = dict(config_values)  # the flags, written to OUT/config.yaml and every checkpoint
        self.cfg = apply_overrides(cfg, task.run_overrides(), self.config_values)
        task.check_run(self.cfg)  # before any work: no process group, data or model yet
        self.task = task
        self.data_fingerprint = task.data_fingerprint()  # hashes the mixture's list files once
        self.out = Path(self.cfg.ckpt.output_dir)
        self.state = TrainState()
        self.run_lock: RunLock | None = None
        # Set by setup(), once: the process's place in the job, the task's view of the run, what it built.
        self.dist: DistInfo
        self.ctx: RunContext
        self.watcher: PreemptionWatcher
        self.backend: Backend
        self.dataset: torch.utils.data.Dataset | None = None
        self.sampler: ResumableDistributedSampler
        self.loader: torch.utils.data.DataLoader
        self.logger: TrainLogger
        self.tracker: FailureTracker | SourceFailures
        self.checkpointer: Checkpointer
        self.resume: Path | None = None
        self.lr = 0.0
        self.flops: float | None = None
        self.peak = 0.0
        self.steps_per_epoch = self.videos_per_step = self.total_steps = self.last_saved = 0
        self.window = StepWindow()  # the steps since the last log line, checked before every save

    # ------------------------------------------------------------------ set-up
    def setup(self, train: bool = True, lock: bool = False) -> None:
        """Everything a run needs, once: process group, (`lock`: OUT's run lock), threads, preemption handling,
        seed, the task's context and set-up, model, weights, data, lr, backend, resume; with `train` the
        sampler, loader, logger and checkpointer too."""
        cfg, loop = self.cfg, self.cfg.loop
        self.dist = init_distributed(need_group=cfg.parallel.dist != "ddp")
        check_compile(cfg.parallel, self.dist.device)  # a --compile mode that cannot work here: before any work
        if lock:  # before anything reads or writes OUT (resume, logger, checkpointer, the task's files)
            self._lock_output()
        threads = set_cpu_threads(self.dist, cfg.data.num_workers)
        # SIGUSR2/SIGTERM -> all ranks stop at one step, save, and (under submitit) requeue.
        self.watcher = PreemptionWatcher(self.out)
        torch.manual_seed(loop.seed)
        ctx = self.ctx = RunContext(cfg, self.dist, self.out, self.state, threads)
        ctx.resume_from = self.resume = self._resume_path()
        self.task.setup(ctx)
        model = self.task.build_model(ctx)
        if self.resume is None:
            self.task.init_weights(model, ctx)  # before wrapping: FSDP and DeepSpeed shard what it fills
        world = self.dist.world_size
        self.videos_per_step = loop.batch_size * world * loop.accum_iter
        if train:
            self.dataset = self.task.build_train_dataset(ctx)
            ctx.train_normalized = getattr(self.dataset, "normalize", True)
            self.steps_per_epoch = steps_in_epoch(len(self.dataset), loop.batch_size, world, loop.accum_iter)
            ctx.samples_per_epoch = self.steps_per_epoch * self.videos_per_step
        self.lr = cfg.optim.lr or effective_lr(cfg.optim.blr, loop.batch_size, cfg.data.repeat_aug, loop.accum_iter,
                                               world, cfg.optim.lr_scale_by)
        self.config_values["lr"] = self.lr
        self.flops = self.task.flops_per_clip(model)  # from the configuration: fine on sharded ranks
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.backend = ctx.backend = setup_parallel(model, cfg.parallel, cfg.optim, self.lr, self.dist,
                                                    loop.accum_iter, loop.batch_size)
        if self.resume is None and cfg.optim.init_optimizer == "keep":
            self._carry_optimizer_state()
        if self.resume is not None:
            load_checkpoint(self.backend, self.resume, self._checkpoint_states())
            self.state.step_in_epoch = self.state.consumed // self.videos_per_step
            log.info("resumed from %s at epoch %d, %d videos into it (global step %d)", self.resume, self.state.epoch,
                     self.state.consumed, self.state.global_step)
        if not train:
            return
        # a dataset whose positions are already the epoch's draw (a data mixture) is read in order
        self.sampler = ResumableDistributedSampler(len(self.dataset), world, self.dist.rank,
                                                   shuffle=not getattr(self.dataset, "draws_epochs", False),
                                                   seed=loop.seed, batch_size=loop.batch_size)
        self.loader = ctx.make_loader(self.dataset, self.sampler, loop.batch_size, train=True)
        if self.dist.is_main:
            save_config(self.config_values, self.out / "config.yaml")
        total = loop.epochs * self.steps_per_epoch
        self.total_steps = min(total, loop.max_steps or total)
        self.logger = ctx.logger = TrainLogger(str(self.out), enabled=self.dist.is_main, total_steps=self.total_steps,
                                               resume_step=self.state.global_step if self.resume else None)
        # a mixture keeps one failure policy per source (datasets/mixture.py)
        make_tracker = getattr(self.dataset, "failure_tracker", FailureTracker)
        self.tracker = make_tracker(cfg.data.max_failure_rate)
        if hasattr(self.dataset, "describe"):
            log.info("data mixture %s", self.dataset.describe())
        self.checkpointer = Checkpointer(self.out, cfg.ckpt.keep_last, cfg.ckpt.async_save)
        self.last_saved = self.state.global_step
        self.peak, peak_source = device_peak_flops(self.dist.device, cfg.parallel.precision)
        log.info("%s (%s): %.1fM params (%.1fM trainable), %d train items, %d steps/epoch, %d clips/step, lr %.2e, "
                 "%s on %d rank(s), %d compute thread(s); %s", cfg.model.model, self.task.name, params / 1e6,
                 trainable / 1e6, len(self.dataset), self.steps_per_epoch,
                 self.videos_per_step * cfg.data.repeat_aug, self.lr, cfg.parallel.dist, world,
                 threads, f"{self.flops / 1e9:.2f} GFLOP per clip (fwd+bwd), MFU against "
                 f"{self.peak / 1e12:.1f} TFLOP/s ({peak_source})" if self.flops else "no FLOP count")
        log.info(schedule_line(loop.epochs, cfg.optim.warmup_epochs, cfg.data.repeat_aug, self.lr, cfg.optim.lr,
                               cfg.optim.blr, cfg.optim.lr_scale_by, self.videos_per_step, cfg.optim.lr_schedule,
                               cfg.optim.decay_fraction, cfg.optim.decay_shape))

    def _carry_optimizer_state(self) -> None:
        """--init_optimizer keep: the optimizer state of the run the weights came from (a cooldown)."""
        source = self.task.optimizer_source()
        if not source or not Path(source).is_dir():
            raise ConfigError(f"--init_optimizer keep needs --init_from a run or checkpoint folder (one with "
                              f"optimizer state), got {source or 'none'!r}; use --init_optimizer reset otherwise")
        fresh = carry_optimizer_state(self.backend, read_optimizer_state(source))
        log.info("optimizer state kept from %s; fresh (shape changed or absent): %s", source, fresh or "none")

    def _lock_output(self) -> None:
        """Rank 0 locks OUT for the run's lifetime (util/run_lock.py); every rank stops if it cannot."""
        error = None
        if self.dist.is_main:
            try:
                self.run_lock = acquire_run_lock(self.out)
            except RunLockedError as exc:
                error = exc
        if not all_agree(error is None):
            raise error or RunLockedError(f"rank 0 could not lock {self.out}: its error names the run holding it")

    def release(self) -> None:
        """Free OUT's run lock (the process may go on: tests, notebooks, the next run)."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from (--resume, else OUT's latest with --auto_resume), config-checked."""
        ck = self.cfg.ckpt
        path = Path(ck.resume) if ck.resume else (find_resumable(self.out) if ck.auto_resume else None)
        if path is None:
            return None
        if not path.is_dir():
            raise ValueError(f"--resume takes a checkpoint folder (OUT/checkpoints/step-N), but {path} is not one; "
                             f"to start from a weights file use --init_from (pretraining) or --finetune")
        state = read_trainer_state(path)
        saved = state.get("config") or {}
        self._compare_config(saved, path)
        self._compare_data(state.get(DATA_MIXTURE), bool(saved.get("data_mixture")), path)
        return path

    def _compare_data(self, saved: dict | None, saved_had_mixture: bool, path: Path) -> None:
        """A resume on another data mixture than the checkpoint's is refused (--allow_mixture_change: a warning)."""
        now = self.data_fingerprint
        if saved is None and now is not None and saved_had_mixture:  # saved before mixtures were fingerprinted
            log.warning("%s records no fingerprint of its data mixture: the mixture cannot be checked", path)
            return
        if saved is None and now is None:
            return
        if saved is None or now is None:
            changes = ["the checkpoint was trained without a data mixture" if saved is None
                       else "the checkpoint was trained on a data mixture, this run has none"]
        else:
            changes = fingerprint_changes(saved, now)
        if not changes:
            return
        listed = "; ".join(changes)
        if self.cfg.ckpt.allow_mixture_change:
            log.warning("resuming %s with another data mixture (--allow_mixture_change): %s", path, listed)
            return
        raise ConfigError(f"{path} was trained on another data mixture ({listed}): resuming would continue its "
                          f"position in a different draw. Resume with the checkpoint's mixture file and list files, "
                          f"add --allow_mixture_change to continue on the new mixture anyway, or use a new "
                          f"--output_dir (or --no-auto_resume) to start another run")

    def _compare_config(self, saved: dict, path: Path) -> None:
        """Architecture changes against the checkpoint are errors; other changes are listed as a warning."""
        arch = set(ARCHITECTURE_FLAGS) | set(self.task.architecture_flags)
        ignore = {"resume", "auto_resume", "output_dir", "lr", "bench", "bench_steps", "eval", "videotext_eval",
                  "allow_mixture_change", "data_mixture"}  # the mixture is checked by its fingerprint
        changed = {k: (saved[k], v) for k, v in self.config_values.items()
                   if k in saved and k not in ignore and saved[k] != v and not (isinstance(v, list) and
                                                                                list(saved[k]) == v)
                   and str(saved[k]) != str(v)}  # a flag whose type widened (hsdp_shard_size: 0 -> "0") is unchanged
        bad = {k: c for k, c in changed.items() if k in arch}
        if bad:
            listed = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in sorted(bad.items()))
            raise ValueError(f"{path} was trained with another architecture ({listed}); resume with the checkpoint's "
                             f"values, or use a new --output_dir (or --no-auto_resume) to start another run")
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            log.warning("resuming %s with changed flags (the new values apply from here): %s", path, listed)

    # ------------------------------------------------------------------ entry points
    def run(self) -> dict:
        """What the flags ask for: only test (a task's evaluation-only mode), measure (--bench), or train."""
        if self.task.evaluate_only():
            return self.evaluate()
        if self.cfg.loop.bench:
            from util.bench import run_bench  # a runner over the components setup() builds

            return run_bench(self)
        return self.fit()

    def fit(self) -> dict:
        """Train; returns a summary (final step, outputs, the task's metrics)."""
        try:
            self.setup(train=True, lock=True)
            return self._fit()
        finally:
            self.release()

    def _fit(self) -> dict:
        """The epoch loop of a set-up run."""
        start, outcome, metrics = time.time(), "epoch", {}
        while self.state.epoch < self.cfg.loop.epochs:
            outcome = self._train_epoch()
            if outcome == "epoch":
                self.task.on_epoch_end(self.ctx)
                self.state.epoch += 1
                self.state.consumed = self.state.step_in_epoch = 0
            self.save()
            if outcome != "epoch":
                break
        if outcome != "stopped":  # the last epoch or --max_steps: training is over (a stop resumes later)
            metrics = self.task.on_train_end(self.ctx)
        return self.finish({"eval": metrics} if metrics else {}, start)

    def evaluate(self) -> dict:
        """Only test: build the model, load the run's checkpoint (or the task's initial weights), run the task's test."""
        self.setup(train=False)
        metrics = self.task.evaluate(self.ctx)
        self.watcher.close()
        cleanup()
        return {"eval": metrics, "checkpoint": str(self.resume) if self.resume else None}

    def finish(self, extra: dict, start: float) -> dict:
        """Wait for saves, close sinks, requeue if stopped by a signal, leave the process group."""
        self.checkpointer.finish_pending(wait=True)
        self.logger.close()
        self.watcher.finish()  # after a signal-stop: exits for requeue under submitit; returns otherwise
        summary = {"global_step": self.state.global_step, "epoch": self.state.epoch,
                   "minutes": (time.time() - start) / 60, "output_dir": str(self.out),
                   "checkpoint": str(find_latest(self.out)), **extra}
        log.info("done: %s", summary)
        cleanup()
        return summary

    # ------------------------------------------------------------------ the loop
    def _train_epoch(self) -> str:
        """The remaining optimiser steps of `state.epoch`; returns why it ended: "epoch" (all done),
        "max_steps" or "stopped" (a signal or STOP file: save and resume later)."""
        st, loop, cfg = self.state, self.cfg.loop, self.cfg
        self.sampler.set_epoch(st.epoch)
        self.sampler.set_consumed(st.consumed)  # the saved position, whatever the world size was
        steps_left = len(self.sampler) // (loop.batch_size * loop.accum_iter)
        timer = {"data": 0.0, "failures": 0}  # data wait and failures since the last log
        raw = batches(self.loader)  # a worker stuck in a read stops the run naming its file (--data_timeout)
        clips, step_times = 0, []
        self.window = StepWindow()
        window_start = time.perf_counter()
        for n in range(steps_left):
            if loop.max_steps and st.global_step >= loop.max_steps:
                return "max_steps"
            if self.watcher.should_stop():
                return "stopped"
            step_start = time.perf_counter()
            lr = lr_at(st.epoch + st.consumed / self.ctx.samples_per_epoch, self.lr, cfg.optim.min_lr,
                       cfg.optim.warmup_epochs, loop.epochs, cfg.optim.lr_schedule, cfg.optim.decay_fraction,
                       cfg.optim.decay_shape)
            apply_lr(self.backend.param_groups, lr)
            torch.manual_seed(step_seed(loop.seed, st.global_step, self.dist.rank))
            micro = self.micro_batches(raw, timer)
            loss, grad_norm, extra, n_clips = train_step(self.backend, micro, self.task.loss, loop.accum_iter)
            self.checkpointer.finish_pending(wait=False)  # an async save becomes `latest` once fully written
            st.global_step += 1
            st.step_in_epoch += 1
            st.consumed += self.videos_per_step
            self.task.after_step(self.ctx)  # before any save: a momentum target is part of this step's state
            self.window.add(st.global_step, loss, grad_norm, extra)
            clips += n_clips
            step_times.append(time.perf_counter() - step_start)
            if st.global_step % loop.log_every == 0 or n + 1 == steps_left:
                self.window.check(epoch=st.epoch)
                elapsed = time.perf_counter() - window_start
                metrics = {"epoch": st.epoch + st.consumed / self.ctx.samples_per_epoch, **self.window.means(),
                           "lr": lr, "clips_per_s": clips * self.dist.world_size / max(elapsed, 1e-9),
                           "data_wait": timer["data"] / max(elapsed, 1e-9),
                           "mem_gb": peak_memory_gb(self.dist.device), "bad_videos": timer["failures"]}
                if hasattr(self.dataset, "log_metrics"):  # a mixture's per-source counts and failure rates
                    metrics.update(self.dataset.log_metrics(st.epoch, st.consumed, self.tracker))
                if self.flops:
                    metrics["tflops"] = self.flops * clips / max(elapsed, 1e-9) / 1e12
                    metrics["mfu"] = self.flops * clips / max(elapsed, 1e-9) / self.peak
                eta = sum(step_times) / len(step_times) * max(self.total_steps - st.global_step, 0)
                self.logger.log(st.global_step, metrics, eta_s=eta)
                self.window, clips, step_times = StepWindow(), 0, []
                timer.update(data=0.0, failures=0)
                window_start = time.perf_counter()
            if cfg.ckpt.save_every > 0 and st.global_step % cfg.ckpt.save_every == 0:
                self.save()
        return "epoch"

    def micro_batches(self, raw: Iterator[dict], timer: dict) -> Iterator[dict]:
        """The next accum_iter batches on the device; time spent waiting for them is data wait."""
        for _ in range(self.cfg.loop.accum_iter):
            t0 = time.perf_counter()
            batch = next(raw)
            timer["failures"] += int(batch.get("failures", 0))
            self.tracker.update_from_batch(batch)  # outside any decode's error handling
            batch = self.ctx.prepare(batch)
            timer["data"] += time.perf_counter() - t0
            yield batch

    def save(self) -> None:
        """Save the current step unless it is saved already; never a NaN/inf state (collective)."""
        st = self.state
        if st.global_step == self.last_saved:
            return
        self.window.check(self.backend.module, epoch=st.epoch)
        states = {**self._checkpoint_states(), "config": Value(self.config_values)}
        if self.data_fingerprint is not None:
            states[DATA_MIXTURE] = Value(self.data_fingerprint)
        self.checkpointer.save(self.backend, f"step-{st.global_step}", states)
        self.last_saved = st.global_step

    def _checkpoint_states(self) -> dict[str, Stateful]:
        """What a checkpoint restores besides the backend's model and optimizer (layout: util/checkpoint.py)."""
        states: dict[str, Stateful] = {TRAIN: self.state, "sampler": SamplerPosition(self.state), "rng": RankRngState()}
        if isinstance(self.task, Stateful):  # a task's own state outside the model, when it has any
            states["task"] = self.task
        return states
