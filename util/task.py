"""What a training objective plugs into the run loop: the `Task` hooks and the `RunContext` they receive.

A task (one module per objective in `tasks/`) says what differs between trainings: its model, its
training data, the loss of one batch, and what happens after a step, an epoch and the last epoch.
Its hooks get a `RunContext`, a small object with what a task may use: the run's typed config
(read-only), the process's distributed info and device, the output folder, the step state, the data
helpers (datasets with the run's geometry, loaders with the run's workers, batches moved to the
device), and, once built, the parallel backend and the logger. They never get the Trainer, and they
never change the run's config: a task that needs another value of a shared flag declares it in
`run_overrides`, which the Trainer applies and records before anything is built.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datasets import VideoDataset, build_video_dataset, collate_clips, normalize_clips
from datasets.frame_folder import FrameFolderDataset, build_frame_dataset
from datasets.loader import build_loader, check_shared_memory, clip_batch_bytes, decode_threads_for
from datasets.mixture import Mixture, MixtureDataset
from datasets.shards import ShardDataset
from util.config import RunConfig
from util.distributed import DistInfo, barrier
from util.engine import TrainState
from util.logger import TrainLogger
from util.parallel import Backend


class RunContext:
    """What a task's hooks may use; built by the Trainer in its setup, never handed the Trainer itself."""

    def __init__(self, cfg: RunConfig, dist: DistInfo, out: Path, state: TrainState, threads: int) -> None:
        self.cfg, self.dist, self.out, self.state, self.threads = cfg, dist, out, state, threads
        # On a GPU the workers ship uint8 clips (4x fewer bytes to pin and copy) and the device normalises.
        self.normalize_on_device = dist.device.type == "cuda"
        self.resume_from: Path | None = None  # the checkpoint this run resumes (None: a fresh run)
        self.backend: Backend | None = None  # set once the model is wrapped
        self.logger: TrainLogger | None = None  # set when training starts (None in an evaluation-only run)
        self.samples_per_epoch = 1  # videos per epoch over all ranks (whole steps)
        self.train_normalized = True  # whether the training set's clips arrive normalised (else uint8)

    @property
    def device(self) -> torch.device:
        """This process's compute device."""
        return self.dist.device

    def resolve_data_path(self, image_folder: bool = False) -> str:
        """--data_path, or generated video (or images) made once by rank 0 and cached."""
        data, gen = self.cfg.data, self.cfg.synthetic
        if data.data_path:
            return data.data_path
        from datasets.image_folder import ensure_synthetic_image_folder
        from datasets.synthetic import ensure_synthetic_dataset

        def make() -> str:
            if image_folder:
                return ensure_synthetic_image_folder(size=gen.synthetic_size)
            return ensure_synthetic_dataset(num_videos=gen.synthetic_videos, size=gen.synthetic_size, seed=0,
                                            background=gen.synthetic_background,
                                            object_scale=gen.synthetic_object_scale,
                                            speed_scale=gen.synthetic_speed_scale,
                                            object_texture=gen.synthetic_object_texture)

        return self.made_by_rank0(make)

    def made_by_rank0(self, make: Any) -> Any:
        """`make()` run by rank 0 first (it writes a shared cache), then by every rank once that is done."""
        if self.dist.is_main:
            make()
        barrier()
        return make()

    def make_loader(self, dataset: torch.utils.data.Dataset, sampler: Any, batch_size: int, train: bool
                    ) -> torch.utils.data.DataLoader:
        """A DataLoader with the run's workers, start method, decode threads, prefetch and pinning; batches
        collated by the dataset's own `collate` when it has one (e.g. AVA's variable box counts)."""
        d = self.cfg.data
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if hasattr(dataset, "decode_threads"):
            dataset.decode_threads = decode_threads_for(d.num_workers, d.decode_threads, local_ranks)
        batch_bytes = clip_batch_bytes(dataset, batch_size)
        if batch_bytes:  # fail now with the fix, not with a worker's 'Bus error' an hour in
            check_shared_memory(batch_bytes, d.num_workers, d.prefetch_factor, local_ranks)
        collate = getattr(dataset, "collate", collate_clips)
        return build_loader(dataset, sampler, batch_size, collate, d.num_workers, d.mp_context,
                            d.prefetch_factor, pin_memory=d.pin_mem and self.dist.device.type == "cuda",
                            drop_last=train, persistent_workers=train, timeout=d.data_timeout)

    def prepare(self, batch: dict, normalize: bool | None = None) -> dict:
        """A batch on the device (without blocking the host); `normalize`: its uint8 clips are normalised there.

        By default that is decided by the training set: it ships uint8 clips when it was built with
        `normalize=False` (`video_dataset` builds them that way on a GPU).
        """
        if normalize is None:
            normalize = not self.train_normalized
        out = {k: v.to(self.dist.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if normalize:
            out["clips"] = normalize_clips(out["clips"])
        return out

    def _dataset_args(self, data_root: str, mode: str) -> dict[str, Any]:
        """VideoDataset arguments of the run: clip geometry, frame sampling, seed, normalisation, bounds."""
        m, d = self.cfg.model, self.cfg.data
        args: dict[str, Any] = dict(
            data_root=data_root, mode=mode, num_frames=m.num_frames, sampling_rate=d.sampling_rate,
            crop_size=m.input_size, seed=self.cfg.loop.seed, normalize=not self.normalize_on_device,
            short_side_range=None if m.input_size < 160 else (256, 320), max_frame_pixels=d.max_frame_pixels,
            max_video_frames=d.max_video_frames, max_decode_short_side=d.max_decode_short_side)
        if mode != "test":
            args["repeat_aug"] = d.repeat_aug
        return args

    def list_dataset(self, list_file: str, data_root: str, mode: str, **kw: Any) -> VideoDataset:
        """The VideoDataset of one list file with the run's geometry; `kw` overrides."""
        return VideoDataset(list_file, **{**self._dataset_args(data_root, mode), **kw})

    def mixture_dataset(self, mixture: Mixture, **kw: Any) -> MixtureDataset:
        """The training items of a `--data_mixture`: one pretraining VideoDataset per source with the run's
        geometry and the source's own sampling (`kw` for all of them, e.g. mask noise)."""
        d, datasets = self.cfg.data, []
        for s in mixture.sources:
            args = {**self._dataset_args(s.root, "pretrain"), **kw, **s.sampling}
            if s.shards is not None:  # tar shards (datasets/shards.py): members addressed through their index
                datasets.append(ShardDataset(s.shards, retries=d.shard_retries, cache_bytes=d.shard_cache_mb << 20,
                                             **args))
            elif s.data_format == "frames":  # a frame-folder list: the run's --frame_* flags unless the source sets them
                frames = {"frame_fps": d.frame_fps, "frame_template": d.frame_template,
                          "frame_start_index": d.frame_start_index, **s.frames}
                datasets.append(FrameFolderDataset(s.list_file, **args, **frames))
            else:
                datasets.append(VideoDataset(s.list_file, **args))
        return MixtureDataset(mixture, datasets, self.cfg.loop.seed)

    def video_dataset(self, data_path: str, split: str, mode: str, **kw: Any) -> VideoDataset:
        """A list-file video dataset with the run's clip geometry, frame sampling, seed and normalisation;
        `kw` overrides (e.g. the task's augmentation)."""
        d = self.cfg.data
        args = self._dataset_args(d.data_root or data_path, mode)
        if kw.pop("data_format", "video") == "frames":  # folders of extracted frames (datasets/frame_folder.py)
            args.update(frame_fps=d.frame_fps, frame_template=d.frame_template,
                        frame_start_index=d.frame_start_index)
            return build_frame_dataset(data_path, split, **{**args, **kw})
        args.update(retries=d.shard_retries, cache_bytes=d.shard_cache_mb << 20)  # used when the data are shards
        return build_video_dataset(data_path, split, **{**args, **kw})


class Task(abc.ABC):
    """What differs between trainings; every hook gets the run's `RunContext`."""

    name = "task"
    # Flags (besides the trainer's ARCHITECTURE_FLAGS) that change the model's parameters: resuming with
    # other values is an error, while other changed flags are listed as a warning.
    architecture_flags: tuple[str, ...] = ()

    def data_fingerprint(self) -> dict[str, Any] | None:
        """What checkpoints record of the training data so a resume on other data is refused (None: nothing)."""
        return None

    def run_overrides(self) -> dict[str, Any]:
        """Shared flags this task fixes (flag name -> value), applied and recorded before anything is built."""
        return {}

    def check_run(self, cfg: RunConfig) -> None:  # noqa: B027 - optional hook
        """Refuse a run configuration this task cannot train (raise ConfigError), before any work starts."""

    def setup(self, ctx: RunContext) -> None:  # noqa: B027 - optional hook
        """Once the process group exists: e.g. find or generate the data."""

    @abc.abstractmethod
    def build_model(self, ctx: RunContext) -> nn.Module:
        """The plain single-device model (the Trainer wraps it)."""

    def init_weights(self, model: nn.Module, ctx: RunContext) -> None:  # noqa: B027 - optional hook
        """Fill a fresh run's plain model before wrapping (e.g. pretrained weights); not called on resume."""

    def optimizer_source(self) -> str:
        """The run or checkpoint folder a fresh run's weights come from, whose optimizer state
        `--init_optimizer keep` carries over; "" when there is none."""
        return ""

    @abc.abstractmethod
    def build_train_dataset(self, ctx: RunContext) -> torch.utils.data.Dataset:
        """Items keyed by (epoch, index): dicts with "clips" [R, C, T, H, W] and per-sample extras."""

    @abc.abstractmethod
    def loss(self, module: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch: {"loss": the one to minimise, other name: scalar tensor to log}."""

    def flops_per_clip(self, model: nn.Module) -> float | None:
        """Training FLOPs per clip (forward + backward) for MFU, or None."""
        return None

    def after_step(self, ctx: RunContext) -> None:  # noqa: B027 - optional hook
        """After each optimiser step, on every rank (e.g. a momentum-encoder update); `ctx.state` is advanced."""

    def on_epoch_end(self, ctx: RunContext) -> None:  # noqa: B027 - optional hook
        """After each finished epoch (`ctx.state.epoch` is the epoch just done), on every rank."""

    def on_train_end(self, ctx: RunContext) -> dict:
        """After the last epoch (not after a stop), on every rank; returns metrics for the summary."""
        return {}

    def evaluate_only(self) -> bool:
        """Whether this run only tests the weights (`Trainer.evaluate`) instead of training."""
        return False

    def evaluate(self, ctx: RunContext) -> dict:
        """Only test the weights (`Trainer.evaluate`); tasks that cannot test leave this."""
        raise ValueError(f"{self.name} has no evaluation-only mode")
