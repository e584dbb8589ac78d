"""The run loop every training shares: MAE pretraining, fine-tuning, and the objectives that plug in.

A `Task` says what differs: how to build the model (and fill it for a fresh run), the training data,
the loss of one batch, and what happens at an epoch's end and after the last one. The `Trainer` does
the rest, once: process group and threads, seeding, preemption, resume (exact, on any world size the
backend allows), the parallel backend, the loader, the epoch loop with logging, NaN checks and saves,
and teardown. `main_pretrain.py` and `main_finetune.py` are their flags plus a task.

    trainer = Trainer(run_config(args), MyTask(...), config_values=flag_values(args, parser))
    summary = trainer.fit()          # or trainer.evaluate() for a task that can only test

Inside a step (`util/engine.train_step`) the backend is told which micro-step is the last; the loop
never syncs the host with the device except on log and save steps.
"""

from __future__ import annotations

import abc
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datasets import (
    FailureTracker,
    ResumableDistributedSampler,
    VideoDataset,
    build_video_dataset,
    collate_clips,
    normalize_clips,
)
from datasets.loader import batches, build_loader, check_shared_memory, clip_batch_bytes, decode_threads_for
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
from util.config import RunConfig, save_config
from util.distributed import DistInfo, all_agree, barrier, cleanup, init_distributed, set_cpu_threads
from util.engine import SamplerPosition, StepWindow, TrainState, step_seed, steps_in_epoch, train_step
from util.flops import device_peak_flops
from util.logger import TrainLogger, peak_memory_gb
from util.lr_sched import apply_lr, effective_lr, lr_at, schedule_line
from util.parallel import Backend, setup_parallel
from util.preemption import PreemptionWatcher
from util.rng_state import RankRngState
from util.run_lock import RunLock, RunLockedError, acquire_run_lock

log = logging.getLogger("mae_st.trainer")
ARCHITECTURE_FLAGS = ("model", "input_size", "num_frames", "t_patch_size", "cls_embed", "sep_pos_embed", "init_values")


class Task(abc.ABC):
    """What differs between trainings. Hooks get the Trainer (its `dist`, `cfg`, `backend`, `logger`, ...)."""

    name = "task"
    # Flags (besides ARCHITECTURE_FLAGS) that change the model's parameters: resuming with other values
    # is an error, while other changed flags are listed as a warning.
    architecture_flags: tuple[str, ...] = ()

    def setup(self, trainer: Trainer) -> None:  # noqa: B027 - optional hook
        """Once the process group exists: e.g. find or generate the data."""

    @abc.abstractmethod
    def build_model(self, trainer: Trainer) -> nn.Module:
        """The plain single-device model (the Trainer wraps it)."""

    def init_weights(self, model: nn.Module, trainer: Trainer) -> None:  # noqa: B027 - optional hook
        """Fill a fresh run's plain model before wrapping (e.g. pretrained weights); not called on resume."""

    @abc.abstractmethod
    def build_train_dataset(self, trainer: Trainer) -> torch.utils.data.Dataset:
        """Items keyed by (epoch, index): dicts with "clips" [R, C, T, H, W] and per-sample extras."""

    @abc.abstractmethod
    def loss(self, module: nn.Module, batch: dict) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (or (loss, {name: scalar tensor}) to log extra metrics)."""

    def flops_per_clip(self, model: nn.Module) -> float | None:
        """Training FLOPs per clip (forward + backward) for MFU, or None."""
        return None

    def after_step(self, trainer: Trainer) -> None:  # noqa: B027 - optional hook
        """After each optimiser step, on every rank (e.g. a momentum-encoder update); `trainer.state` is advanced."""

    def on_epoch_end(self, trainer: Trainer) -> None:  # noqa: B027 - optional hook
        """After each finished epoch (`trainer.state.epoch` is the epoch just done), on every rank."""

    def on_train_end(self, trainer: Trainer) -> dict:
        """After the last epoch (not after a stop), on every rank; returns metrics for the summary."""
        return {}

    def evaluate(self, trainer: Trainer) -> dict:
        """Only test the weights (`Trainer.evaluate`); tasks that cannot test leave this."""
        raise NotImplementedError(f"{self.name} has no evaluation")


class Trainer:
    """One training run of a task: wiring, resume, the epoch loop, saving and teardown."""

    def __init__(self, cfg: RunConfig, task: Task, config_values: dict[str, Any]) -> None:
        self.cfg, self.task = cfg, task
        self.config_values = dict(config_values)  # the flags, written to OUT/config.yaml and every checkpoint
        self.out = Path(cfg.ckpt.output_dir)
        self.state = TrainState()
        self.backend: Backend
        self.logger: TrainLogger
        self.data_path = cfg.data.data_path
        self.samples_per_epoch = 1
        self.run_lock: RunLock | None = None

    # ------------------------------------------------------------------ set-up
    def _start(self, lock: bool = False) -> None:
        """Process group, `lock`: the output folder's run lock, threads, preemption handling, seed; the task's
        own set-up."""
        self.dist: DistInfo = init_distributed(need_group=self.cfg.parallel.dist != "ddp")
        if lock:  # before anything reads or writes OUT (resume, logger, checkpointer, the task's files)
            self._lock_output()
        self.threads = set_cpu_threads(self.dist, self.cfg.data.num_workers)
        # SIGUSR2/SIGTERM -> all ranks stop at one step, save, and (under submitit) requeue.
        self.watcher = PreemptionWatcher(self.out)
        torch.manual_seed(self.cfg.loop.seed)
        # On a GPU the workers ship uint8 clips (4x fewer bytes to pin and copy) and the device normalises.
        self.normalize_on_device = self.dist.device.type == "cuda"
        self.task.setup(self)

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

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from (--resume, else OUT's latest with --auto_resume), config-checked."""
        ck = self.cfg.ckpt
        path = Path(ck.resume) if ck.resume else (find_resumable(self.out) if ck.auto_resume else None)
        if path is None:
            return None
        if not path.is_dir():
            raise ValueError(f"--resume takes a checkpoint folder (OUT/checkpoints/step-N), but {path} is not one; "
                             f"to start from a weights file use --init_from (pretraining) or --finetune")
        saved = read_trainer_state(path).get("config") or {}
        self._compare_config(saved, path)
        return path

    def _compare_config(self, saved: dict, path: Path) -> None:
        """Architecture changes against the checkpoint are errors; other changes are listed as a warning."""
        arch = set(ARCHITECTURE_FLAGS) | set(self.task.architecture_flags)
        ignore = {"resume", "auto_resume", "output_dir", "lr", "bench", "bench_steps", "eval"}
        changed = {k: (saved[k], v) for k, v in self.config_values.items()
                   if k in saved and k not in ignore and saved[k] != v and not (isinstance(v, list) and
                                                                                list(saved[k]) == v)}
        bad = {k: c for k, c in changed.items() if k in arch}
        if bad:
            listed = ", ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in sorted(bad.items()))
            raise ValueError(f"{path} was trained with another architecture ({listed}); resume with the checkpoint's "
                             f"values, or use a new --output_dir (or --no-auto_resume) to start another run")
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            log.warning("resuming %s with changed flags (the new values apply from here): %s", path, listed)

    def resolve_data_path(self, image_folder: bool = False) -> str:
        """--data_path, or generated video (or images) made once by rank 0 and cached."""
        data = self.cfg.data
        if data.data_path:
            return data.data_path
        from datasets.image_folder import ensure_synthetic_image_folder
        from datasets.synthetic import ensure_synthetic_dataset

        def make() -> str:
            if image_folder:
                return ensure_synthetic_image_folder(size=data.synthetic_size)
            return ensure_synthetic_dataset(num_videos=data.synthetic_videos, size=data.synthetic_size, seed=0,
                                            background=data.synthetic_background,
                                            object_scale=data.synthetic_object_scale,
                                            speed_scale=data.synthetic_speed_scale,
                                            object_texture=data.synthetic_object_texture)

        if self.dist.is_main:
            make()
        barrier()
        return make()

    def make_loader(self, dataset: torch.utils.data.Dataset, sampler, batch_size: int, train: bool
                    ) -> torch.utils.data.DataLoader:
        """A DataLoader with the run's workers, start method, decode threads, prefetch and pinning."""
        d = self.cfg.data
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if hasattr(dataset, "decode_threads"):
            dataset.decode_threads = decode_threads_for(d.num_workers, d.decode_threads, local_ranks)
        batch_bytes = clip_batch_bytes(dataset, batch_size)
        if batch_bytes:  # fail now with the fix, not with a worker's 'Bus error' an hour in
            check_shared_memory(batch_bytes, d.num_workers, d.prefetch_factor, local_ranks)
        return build_loader(dataset, sampler, batch_size, collate_clips, d.num_workers, d.mp_context,
                            d.prefetch_factor, pin_memory=d.pin_mem and self.dist.device.type == "cuda",
                            drop_last=train, persistent_workers=train, timeout=d.data_timeout)

    def prepare(self, batch: dict, normalize: bool | None = None) -> dict:
        """A batch on the device (without blocking the host); `normalize`: its uint8 clips are normalised there.

        By default that is decided by the training set: it ships uint8 clips when it was built with
        `normalize=False` (the datasets say so in their `normalize` attribute; `video_dataset` builds
        them that way on a GPU).
        """
        if normalize is None:
            normalize = not getattr(getattr(self, "dataset", None), "normalize", True)
        out = {k: v.to(self.dist.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if normalize:
            out["clips"] = normalize_clips(out["clips"])
        return out

    def video_dataset(self, data_path: str, split: str, mode: str, **kw: Any) -> VideoDataset:
        """A list-file video dataset with the run's clip geometry, frame sampling, seed and normalisation;
        `kw` overrides (e.g. the task's augmentation)."""
        m, d = self.cfg.model, self.cfg.data
        args: dict[str, Any] = dict(
            data_root=d.data_root or data_path, mode=mode, num_frames=m.num_frames, sampling_rate=d.sampling_rate,
            crop_size=m.input_size, seed=self.cfg.loop.seed, normalize=not self.normalize_on_device,
            short_side_range=None if m.input_size < 160 else (256, 320), max_frame_pixels=d.max_frame_pixels,
            max_video_frames=d.max_video_frames)
        if mode != "test":
            args["repeat_aug"] = d.repeat_aug
        return build_video_dataset(data_path, split, **{**args, **kw})

    def _build(self, train: bool) -> Path | None:
        """Model, weights, data, lr and backend; returns the checkpoint to resume from (None: fresh)."""
        cfg = self.cfg
        resume = self._resume_path()
        model = self.task.build_model(self)
        if resume is None:
            self.task.init_weights(model, self)  # before wrapping: FSDP and DeepSpeed shard what it fills
        self.dataset = self.task.build_train_dataset(self) if train else None
        world, loop = self.dist.world_size, cfg.loop
        self.videos_per_step = loop.batch_size * world * loop.accum_iter
        if self.dataset is not None:
            self.steps_per_epoch = steps_in_epoch(len(self.dataset), loop.batch_size, world, loop.accum_iter)
            self.samples_per_epoch = self.steps_per_epoch * self.videos_per_step
        self.lr = cfg.optim.lr or effective_lr(cfg.optim.blr, loop.batch_size, cfg.data.repeat_aug, loop.accum_iter,
                                               world, cfg.optim.lr_scale_by)
        self.config_values["lr"] = self.lr
        self.flops = self.task.flops_per_clip(model)  # from the configuration: fine on sharded ranks
        self.params = sum(p.numel() for p in model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.backend = setup_parallel(model, cfg.parallel, cfg.optim, self.lr, self.dist, loop.accum_iter,
                                      loop.batch_size)
        if resume is not None:
            load_checkpoint(self.backend, resume, self._checkpoint_states())
            self.state.step_in_epoch = self.state.consumed // self.videos_per_step
            log.info("resumed from %s at epoch %d, %d videos into it (global step %d)", resume, self.state.epoch,
                     self.state.consumed, self.state.global_step)
        return resume

    # ------------------------------------------------------------------ entry points
    def fit(self) -> dict:
        """Train (or with --bench, measure); returns a summary (final step, outputs, the task's metrics)."""
        try:
            return self._fit()
        finally:  # the process may go on (tests, notebooks): free the folder for the next run
            if self.run_lock is not None:
                self.run_lock.release()

    def _fit(self) -> dict:
        """`fit` while holding OUT's run lock."""
        self._start(lock=True)
        resume = self._build(train=True)
        cfg, loop = self.cfg, self.cfg.loop
        self.sampler = ResumableDistributedSampler(len(self.dataset), self.dist.world_size, self.dist.rank,
                                                   shuffle=True, seed=loop.seed, batch_size=loop.batch_size)
        self.loader = self.make_loader(self.dataset, self.sampler, loop.batch_size, train=True)
        if self.dist.is_main:
            save_config(self.config_values, self.out / "config.yaml")
        total = loop.epochs * self.steps_per_epoch
        self.total_steps = min(total, loop.max_steps or total)
        self.logger = TrainLogger(str(self.out), enabled=self.dist.is_main, total_steps=self.total_steps,
                                  resume_step=self.state.global_step if resume else None)
        self.tracker = FailureTracker(cfg.data.max_failure_rate)
        self.checkpointer = Checkpointer(self.out, cfg.ckpt.keep_last, cfg.ckpt.async_save)
        self.last_saved = self.state.global_step
        self.peak, peak_source = device_peak_flops(self.dist.device, cfg.parallel.precision)
        log.info("%s (%s): %.1fM params (%.1fM trainable), %d train items, %d steps/epoch, %d clips/step, lr %.2e, "
                 "%s on %d rank(s), %d compute thread(s); %s", cfg.model.model, self.task.name, self.params / 1e6,
                 self.trainable / 1e6, len(self.dataset), self.steps_per_epoch,
                 self.videos_per_step * cfg.data.repeat_aug, self.lr, cfg.parallel.dist, self.dist.world_size,
                 self.threads, f"{self.flops / 1e9:.2f} GFLOP per clip (fwd+bwd), MFU against "
                 f"{self.peak / 1e12:.1f} TFLOP/s ({peak_source})" if self.flops else "no FLOP count")
        log.info(schedule_line(loop.epochs, cfg.optim.warmup_epochs, cfg.data.repeat_aug, self.lr, cfg.optim.lr,
                               cfg.optim.blr, cfg.optim.lr_scale_by, self.videos_per_step))
        if loop.bench:
            return self._finish(self._bench(), start=time.time())
        start, outcome, metrics = time.time(), "epoch", {}
        while self.state.epoch < loop.epochs:
            outcome = self._train_epoch()
            if outcome == "epoch":
                self.task.on_epoch_end(self)
                self.state.epoch += 1
                self.state.consumed = self.state.step_in_epoch = 0
            self.save()
            if outcome != "epoch":
                break
        if outcome != "stopped":  # the last epoch or --max_steps: training is over (a stop resumes later)
            metrics = self.task.on_train_end(self)
        return self._finish({"eval": metrics} if metrics else {}, start)

    def evaluate(self) -> dict:
        """Only test: build the model, load the run's checkpoint (or the task's initial weights), run the task's test."""
        self._start()
        resume = self._build(train=False)
        metrics = self.task.evaluate(self)
        self.watcher.close()
        cleanup()
        return {"eval": metrics, "checkpoint": str(resume) if resume else None}

    def _finish(self, extra: dict, start: float) -> dict:
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
    def _train_epoch(self, limit: int | None = None, saving: bool = True) -> str:
        """The remaining optimiser steps of `state.epoch` (at most `limit`); returns why it ended:
        "epoch" (all done), "max_steps", "stopped" (a signal or STOP file: save and resume later) or "limit"."""
        st, loop, cfg = self.state, self.cfg.loop, self.cfg
        self.sampler.set_epoch(st.epoch)
        self.sampler.set_consumed(st.consumed)  # the saved position, whatever the world size was
        steps_left = len(self.sampler) // (loop.batch_size * loop.accum_iter)
        timer = self._timer = {"data": 0.0, "failures": 0}  # data wait and failures since the last log
        raw = batches(self.loader)  # a worker stuck in a read stops the run naming its file (--data_timeout)
        window, clips, step_times = StepWindow(), 0, []
        window_start = time.perf_counter()
        for n in range(steps_left):
            if limit is not None and n >= limit:
                return "limit"
            if loop.max_steps and st.global_step >= loop.max_steps:
                return "max_steps"
            if self.watcher.should_stop():
                return "stopped"
            step_start = time.perf_counter()
            lr = lr_at(st.epoch + st.consumed / self.samples_per_epoch, self.lr, cfg.optim.min_lr,
                       cfg.optim.warmup_epochs, loop.epochs)
            apply_lr(self.backend.param_groups, lr)
            torch.manual_seed(step_seed(loop.seed, st.global_step, self.dist.rank))
            micro = self._micro_batches(raw, timer)
            loss, grad_norm, extra, n_clips = train_step(self.backend, micro, self.task.loss, loop.accum_iter)
            self.checkpointer.finish_pending(wait=False)  # an async save becomes `latest` once fully written
            st.global_step += 1
            st.step_in_epoch += 1
            st.consumed += self.videos_per_step
            self.task.after_step(self)  # before any save: a momentum target is part of this step's state
            window.add(st.global_step, loss, grad_norm, extra)
            clips += n_clips
            step_times.append(time.perf_counter() - step_start)
            is_log = saving and (st.global_step % loop.log_every == 0 or n + 1 == steps_left)
            is_save = saving and cfg.ckpt.save_every > 0 and st.global_step % cfg.ckpt.save_every == 0
            if is_log:
                window.check(epoch=st.epoch)
                elapsed = time.perf_counter() - window_start
                metrics = {"epoch": st.epoch + st.consumed / self.samples_per_epoch, **window.means(), "lr": lr,
                           "clips_per_s": clips * self.dist.world_size / max(elapsed, 1e-9),
                           "data_wait": timer["data"] / max(elapsed, 1e-9), "mem_gb": peak_memory_gb(self.dist.device),
                           "bad_videos": timer["failures"]}
                if self.flops:
                    metrics["tflops"] = self.flops * clips / max(elapsed, 1e-9) / 1e12
                    metrics["mfu"] = self.flops * clips / max(elapsed, 1e-9) / self.peak
                eta = sum(step_times) / len(step_times) * max(self.total_steps - st.global_step, 0)
                self.logger.log(st.global_step, metrics, eta_s=eta)
                window, clips, step_times = StepWindow(), 0, []
                timer.update(data=0.0, failures=0)
                window_start = time.perf_counter()
            if is_save:
                self.window = window
                self.save()
        self.window = window
        return "epoch"

    def _micro_batches(self, raw: Iterator[dict], timer: dict) -> Iterator[dict]:
        """The next accum_iter batches on the device; time spent waiting for them is data wait."""
        for _ in range(self.cfg.loop.accum_iter):
            t0 = time.perf_counter()
            batch = next(raw)
            timer["failures"] += int(batch.get("failures", 0))
            self.tracker.update_from_batch(batch)  # outside any decode's error handling
            batch = self.prepare(batch)
            timer["data"] += time.perf_counter() - t0
            yield batch

    def save(self) -> None:
        """Save the current step unless it is saved already; never a NaN/inf state (collective)."""
        st = self.state
        if st.global_step == self.last_saved:
            return
        getattr(self, "window", StepWindow()).check(self.backend.module, epoch=st.epoch)
        states = {**self._checkpoint_states(), "config": Value(self.config_values)}
        self.checkpointer.save(self.backend, f"step-{st.global_step}", states)
        self.last_saved = st.global_step

    def _checkpoint_states(self) -> dict[str, Stateful]:
        """What a checkpoint restores besides the backend's model and optimizer (layout: util/checkpoint.py)."""
        states: dict[str, Stateful] = {TRAIN: self.state, "sampler": SamplerPosition(self.state), "rng": RankRngState()}
        if isinstance(self.task, Stateful):  # a task's own state outside the model, when it has any
            states["task"] = self.task
        return states

    # ------------------------------------------------------------------ --bench
    def _bench(self) -> dict:
        """Model only (one batch again and again), loader only, and end to end through the real loop."""
        loop, dist = self.cfg.loop, self.dist
        modes = [m for m in loop.bench.split(",") if m]
        n, warm = loop.bench_steps, 2
        per_step = loop.batch_size * self.cfg.data.repeat_aug * loop.accum_iter  # clips per rank
        rows: dict[str, dict] = {}

        def sync() -> None:
            if dist.device.type == "cuda":
                torch.cuda.synchronize(dist.device)

        if "model" in modes:  # a real batch built in this process: no workers left running to steal cores
            items = [self.dataset[(0, i)] for i in range(loop.batch_size)]
            fixed = self.prepare(collate_clips(items))
            for i in range(warm + n):
                if i == warm:
                    sync()
                    t0 = time.perf_counter()
                train_step(self.backend, itertools.repeat(fixed, loop.accum_iter), self.task.loss, loop.accum_iter)
                self.task.after_step(self)
            sync()
            secs = (time.perf_counter() - t0) / n
            rows["model"] = {"clips_per_s": per_step / secs, "step_s": secs, "data_wait": 0.0}
        if "loader" in modes:
            it = self._forever()
            for _ in range(warm * loop.accum_iter):
                next(it)
            t0 = time.perf_counter()
            for _ in range(n * loop.accum_iter):
                self.prepare(next(it))
            sync()
            secs = (time.perf_counter() - t0) / n
            rows["loader"] = {"clips_per_s": per_step / secs, "step_s": secs, "data_wait": 1.0}
        if "e2e" in modes:
            done = 0
            while done < warm:  # warm-up steps: workers start, kernels warm
                done += self._bench_epoch(warm - done)[0]
            steps, secs, wait = 0, 0.0, 0.0
            while steps < n:
                k, s, w = self._bench_epoch(n - steps)
                steps, secs, wait = steps + k, secs + s, wait + w
            rows["e2e"] = {"clips_per_s": per_step * steps / secs, "step_s": secs / steps, "data_wait": wait / secs}
        for row in rows.values():
            if self.flops and "clips_per_s" in row and row is not rows.get("loader"):
                row["mfu"] = row["clips_per_s"] * self.flops / self.peak
        result = {"bench": rows, "device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda"
                  else f"CPU ({os.cpu_count()} cores)", "threads": self.threads, "flops_per_clip": self.flops,
                  "peak_flops": self.peak, "clips_per_step_per_rank": per_step, "world_size": dist.world_size,
                  "peak_mem_gb": peak_memory_gb(dist.device), "steps": n}
        if dist.is_main:
            (self.out / "bench.json").write_text(json.dumps(result, indent=1))
            log.info("bench: %s", json.dumps(rows))
        return result

    def _forever(self) -> Iterator[dict]:
        """Loader batches across epoch boundaries (small datasets end before a benchmark does)."""
        for epoch in itertools.count():
            self.sampler.set_epoch(epoch)
            self.sampler.set_consumed(0)
            yield from self.loader

    def _bench_epoch(self, limit: int) -> tuple[int, float, float]:
        """Up to `limit` steps of the real loop (no logs, no saves): (steps, seconds, data-wait seconds)."""
        before = self.state.global_step
        t0 = time.perf_counter()
        finished = self._train_epoch(limit=limit, saving=False) == "epoch"
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        secs = time.perf_counter() - t0
        if finished:  # the epoch ran out: go on with the next one
            self.state.epoch += 1
            self.state.consumed = self.state.step_in_epoch = 0
        return self.state.global_step - before, secs, self._timer["data"]
