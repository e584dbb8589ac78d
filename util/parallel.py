"""Wrap a plain model for training: DDP, FSDP2 or DeepSpeed ZeRO-1/2/3, behind one small interface.

The engine drives every backend the same way:
    with backend.autocast():
        loss, pred, mask = backend.module(clips, mask_ratio, noise)
    backend.backward(loss, is_last_microstep)
    if is_last_microstep:
        grad_norm = backend.step()
Set the lr through `backend.param_groups` (re-read it after `load`: loading replaces the group dicts).
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from models.video_vit import Block
from util.distributed import DistInfo, ensure_process_group
from util.optim import build_adamw, clean_name, param_groups

log = logging.getLogger(__name__)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEEPSPEED_TAG = "zero"  # fixed tag: one DeepSpeed checkpoint per checkpoint directory


def block_units(model: nn.Module) -> list[nn.Module]:
    """The per-block units to checkpoint / compile / shard: each Block, or its checkpoint wrapper."""
    wrapped = [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
    inner = {id(m._checkpoint_wrapped_module) for m in wrapped}
    return wrapped + [m for m in model.modules() if isinstance(m, Block) and id(m) not in inner]


def apply_block_wrappers(model: nn.Module, grad_ckpt: bool, compile_blocks: bool) -> None:
    """Activation checkpointing (non-reentrant) then torch.compile, per block, in place; names stay clean."""
    if grad_ckpt:
        wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block))
    if compile_blocks:
        for unit in block_units(model):
            unit.compile()  # in place (no `_orig_mod.` in names), like torchtitan's per-block compile


def build_optimizer(model: nn.Module, args: argparse.Namespace, info: DistInfo) -> torch.optim.AdamW:
    """AdamW over the model's (layer-decayed) parameter groups, with the run's lr and betas."""
    groups = param_groups(model, args.weight_decay, getattr(args, "layer_decay", None))
    return build_adamw(groups, args.lr, info.device, tuple(getattr(args, "opt_betas", (0.9, 0.95))))


class Backend(abc.ABC):
    """Common interface; subclasses fill in wrapping, backward, step and checkpoint I/O."""

    name = "base"

    def __init__(self, model: nn.Module, args: argparse.Namespace, info: DistInfo) -> None:
        self.args, self.info, self.unwrapped = args, info, model
        self.accum_iter = max(1, int(getattr(args, "accum_iter", 1) or 1))
        self.clip_grad = float(getattr(args, "clip_grad", None) or 0.0)
        self.dtype = DTYPES[getattr(args, "precision", "fp32")]
        self.module: nn.Module = model
        self.optimizer: torch.optim.Optimizer

    @property
    def param_groups(self) -> list[dict]:
        """Optimizer groups (with 'lr', 'lr_scale', 'weight_decay'); setting g['lr'] takes effect."""
        return self.optimizer.param_groups

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (mixed precision where the backend needs it)."""
        return contextlib.nullcontext()

    def _grad_norm_and_clip(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Pre-clip total grad norm as a device tensor; clips in place when clip_grad > 0."""
        if self.clip_grad > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.clip_grad, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)

    def full_model_state_dict(self) -> dict:
        """Consolidated fp32 CPU weights with plain-model names on rank 0 (empty elsewhere); collective."""
        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return {}
        return {clean_name(k): v.detach().float().cpu().clone() for k, v in sd.items()}

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor, is_last_microstep: bool = True) -> None:
        """Backpropagate loss / accum_iter; gradients are synchronised only on the last micro-step."""

    @abc.abstractmethod
    def step(self) -> torch.Tensor | None:
        """Clip, optimizer step, zero grads; returns the pre-clip grad norm (a tensor, no host sync)."""

    @abc.abstractmethod
    def save(self, path: str | Path, async_save: bool = False) -> Future | None:
        """Write model + optimizer state into directory `path` (collective).

        Backends without asynchronous I/O ignore `async_save`, save before returning and return None.
        """

    @abc.abstractmethod
    def load(self, path: str | Path) -> None:
        """Restore model + optimizer state from directory `path` (collective)."""


class DDPBackend(Backend):
    """DistributedDataParallel (plain module alone); autocast for bf16/fp16, GradScaler for fp16."""

    name = "ddp"
    FILE = "model.pt"

    def __init__(self, model: nn.Module, args: argparse.Namespace, info: DistInfo) -> None:
        super().__init__(model, args, info)
        model.to(info.device)
        apply_block_wrappers(model, bool(args.grad_ckpt), bool(args.compile))
        if info.world_size > 1:
            ids = [info.local_rank] if info.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizer = build_optimizer(model, args, info)
        self.scaler = torch.amp.GradScaler(info.device.type) if args.precision == "fp16" else None
        self._micro = 0  # micro-steps since the last optimizer step
        self._unsynced_forward = False

    def _ddp(self) -> bool:
        return isinstance(self.module, nn.parallel.DistributedDataParallel)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast, and DDP's no_sync for a forward that precedes a non-last micro-step.

        DDP decides at forward time whether the next backward all-reduces, so the sync choice is
        made here from the micro-step count; backward() repairs a wrong guess (see there).
        """
        skip_sync = self._ddp() and self._micro < self.accum_iter - 1
        sync_ctx = self.module.no_sync() if skip_sync else contextlib.nullcontext()
        amp_ctx = torch.autocast(self.info.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with sync_ctx, amp_ctx:
            yield
        self._unsynced_forward = skip_sync

    def backward(self, loss: torch.Tensor, is_last_microstep: bool = True) -> None:
        """Backpropagate loss / accum_iter; gradients are synchronised only on the last micro-step."""
        loss = loss / self.accum_iter
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._micro += 1
        if is_last_microstep and self._unsynced_forward:
            # The caller ended accumulation earlier than accum_iter: average the local grads by hand.
            for p in self.unwrapped.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.info.world_size)
        self._unsynced_forward = False

    def step(self) -> torch.Tensor | None:
        """Clip, optimizer step, zero grads; returns the pre-clip grad norm (a tensor, no host sync)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.unwrapped.parameters() if p.grad is not None]
        norm = self._grad_norm_and_clip(params)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        return norm

    def save(self, path: str | Path, async_save: bool = False) -> Future | None:
        """One torch.save file written by rank 0: {'model', 'optimizer', 'scaler'} with plain names."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=opts)
        if self.info.is_main:
            Path(path).mkdir(parents=True, exist_ok=True)
            state = {"model": model_sd, "optimizer": optim_sd}
            if self.scaler:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, Path(path) / self.FILE)

    def load(self, path: str | Path) -> None:
        """Every rank reads the one file (weights_only) and loads it."""
        state = torch.load(Path(path) / self.FILE, map_location="cpu", weights_only=True)
        set_state_dict(
            self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class FSDPBackend(Backend):
    """FSDP2: fully_shard per block then the root on a 1-D mesh; bf16 via MixedPrecisionPolicy; DCP I/O."""

    name = "fsdp"

    def __init__(self, model: nn.Module, args: argparse.Namespace, info: DistInfo) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        super().__init__(model, args, info)
        if args.precision == "fp16":
            raise ValueError("--dist fsdp does not support --precision fp16 (no sharded loss scaling); use bf16")
        ensure_process_group(info)
        model.to(info.device)
        apply_block_wrappers(model, bool(args.grad_ckpt), bool(args.compile))
        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.dtype else None
        kw = {"mesh": mesh, "mp_policy": mp} if mp else {"mesh": mesh}
        for unit in block_units(model):
            fully_shard(unit, **kw)
        fully_shard(model, **kw)
        self._ckpt_group = None  # gloo group for asynchronous saves, made on first use (collectively)
        # Build groups after sharding: the parameters are now DTensors (replaced in place).
        self.optimizer = build_optimizer(model, args, info)

    def backward(self, loss: torch.Tensor, is_last_microstep: bool = True) -> None:
        """Backpropagate loss / accum_iter; reduce-scatter only on the last micro-step."""
        self.module.set_requires_gradient_sync(is_last_microstep)
        (loss / self.accum_iter).backward()

    def step(self) -> torch.Tensor | None:
        """Clip, optimizer step, zero grads; returns the pre-clip grad norm (a tensor, no host sync)."""
        norm = self._grad_norm_and_clip([p for p in self.module.parameters() if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def save(self, path: str | Path, async_save: bool = False) -> Future | None:
        """Sharded DCP checkpoint: every rank writes its shards; async returns a Future instead of waiting.

        Async saving copies the state to CPU memory now and writes it from a background thread, so
        training goes on during the write. The thread's collectives run on a gloo group of their own:
        sharing the training group with a second thread could interleave collectives.
        """
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if not async_save:
            dcp.save(state, checkpoint_id=str(path))
            return None
        if self._ckpt_group is None:
            self._ckpt_group = dist.new_group(backend="gloo")
        return dcp.async_save(state, checkpoint_id=str(path), process_group=self._ckpt_group)

    def load(self, path: str | Path) -> None:
        """Load a DCP checkpoint saved by any number of ranks (resharded on read)."""
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class _CastClips(nn.Module):
    """Calls the DeepSpeed engine with the clips (first argument) cast to its half dtype.

    Only the clips: the mask noise must keep fp32 so argsort gives the same mask as fp32 runs.
    """

    def __init__(self, engine: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.engine, self.dtype = engine, dtype

    def forward(self, clips: torch.Tensor, *args, **kwargs):
        if self.dtype is not None and clips.is_floating_point():
            clips = clips.to(self.dtype)
        return self.engine(clips, *args, **kwargs)


def deepspeed_config(args: argparse.Namespace) -> dict:
    """DeepSpeed config from the flags; a --deepspeed_config JSON is merged over it (its keys win)."""
    cfg: dict = {
        "train_micro_batch_size_per_gpu": int(args.batch_size),
        "gradient_accumulation_steps": max(1, int(args.accum_iter or 1)),
        "gradient_clipping": float(args.clip_grad or 0.0),
        "zero_optimization": {"stage": int(args.zero_stage)},
        "bf16": {"enabled": args.precision == "bf16"},
        "fp16": {"enabled": args.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if getattr(args, "deepspeed_config", None):
        cfg = _merge(cfg, json.loads(Path(args.deepspeed_config).read_text()))
    return cfg


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO-1/2/3 with a torch AdamW client optimizer; DeepSpeed owns accumulation and clipping."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, args: argparse.Namespace, info: DistInfo) -> None:
        import deepspeed

        super().__init__(model, args, info)
        ensure_process_group(info)
        deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo")
        apply_block_wrappers(model, bool(args.grad_ckpt), bool(args.compile))
        self.config = deepspeed_config(args)
        self.accum_iter = int(self.config["gradient_accumulation_steps"])
        optimizer = build_optimizer(model, args, info)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        half = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float16 if self.engine.fp16_enabled() else None
        self.module = _CastClips(self.engine, half)
        self._micro = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Tell DeepSpeed, before the forward, whether this micro-step ends the accumulation (a guess
        from the count; backward() sets the caller's real answer)."""
        self.engine.set_gradient_accumulation_boundary(self._micro >= self.accum_iter - 1)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last_microstep: bool = True) -> None:
        """DeepSpeed divides by gradient_accumulation_steps itself and reduces on the boundary."""
        self.engine.set_gradient_accumulation_boundary(is_last_microstep)
        self.engine.backward(loss)
        self._micro += 1
        if not is_last_microstep:
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step counters

    def step(self) -> torch.Tensor | None:
        """Optimizer step at the boundary (DeepSpeed clips); returns its pre-clip global grad norm."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm)

    def full_model_state_dict(self) -> dict:
        """fp32 master weights gathered per parameter (works for every ZeRO stage); collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if self.info.is_main and full is not None:
                out[clean_name(name)] = full.detach().float().cpu().clone()
        if self.info.is_main:
            for name, b in self.engine.module.named_buffers():
                out[clean_name(name)] = b.detach().cpu().clone()
        return out

    def save(self, path: str | Path, async_save: bool = False) -> Future | None:
        """DeepSpeed's own sharded format under `path/zero/` (every rank writes its partition)."""
        self.engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG)

    def load(self, path: str | Path) -> None:
        """Restore module, ZeRO partitions and optimizer state (same world size and stage)."""
        load_path, _ = self.engine.load_checkpoint(
            str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {DEEPSPEED_TAG!r} under {path}")


BACKENDS = {"ddp": DDPBackend, "fsdp": FSDPBackend, "deepspeed": DeepSpeedBackend}


def setup_parallel(model: nn.Module, args: argparse.Namespace, dist_info: DistInfo) -> Backend:
    """Wrap a plain model for args.dist in {ddp, fsdp, deepspeed} and build its AdamW optimizer."""
    if args.dist not in BACKENDS:
        raise ValueError(f"unknown --dist {args.dist!r}; choose one of {sorted(BACKENDS)}")
    if args.precision not in DTYPES:
        raise ValueError(f"unknown --precision {args.precision!r}; choose one of {sorted(DTYPES)}")
    backend = BACKENDS[args.dist](model, args, dist_info)
    log.info("parallel: %s world=%d precision=%s grad_ckpt=%s compile=%s", backend.name,
             dist_info.world_size, args.precision, args.grad_ckpt, args.compile)
    return backend
