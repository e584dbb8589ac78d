"""Wrap a plain model for training: DDP, FSDP2 or DeepSpeed ZeRO-1/2/3, behind one small interface.

The run loop drives every backend the same way, and says which micro-step is the last (no guessing):

    for i, batch in enumerate(micro_batches):
        with backend.microstep(is_last=i == accum_iter - 1):   # gradient sync only on the last
            with backend.precision():                          # autocast (evaluation uses it too)
                loss = task.loss(backend.module, batch)
            backend.backward(loss)                             # divided by accum_iter
    grad_norm = backend.step()                                 # clip, optimizer step, zero grads

Set the lr through `backend.param_groups` (re-read it after `load`: loading replaces the group dicts).
The model tells us its units (`model.shard_units()`: its blocks); activation checkpointing, compile and
FSDP2 sharding are applied to those from outside, in that order (torchtitan's order), so this module
never imports a model class.

Activation checkpointing has four modes (`checkpoint_mode`): none; block (every unit recomputed in
backward, `--grad_ckpt`); every_k (units 0, k, 2k, ...); selective (every unit, per op: the outputs of
matmuls and attention are kept, the cheap ops between them -- LayerNorm, GELU, casts, adds -- are
recomputed; torch's selective-checkpoint contexts, as torchtitan's per-op SAC).
"""

from __future__ import annotations

import abc
import contextlib
import copy
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
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from util.config import OptimConfig, ParallelConfig
from util.distributed import DistInfo, ensure_process_group, fsdp_mesh, fsdp_mesh_shape
from util.errors import ConfigError, read_json_object
from util.optim import build_optimizer, clean_name

log = logging.getLogger(__name__)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEEPSPEED_TAG = "zero"  # fixed tag: one DeepSpeed checkpoint per checkpoint directory


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The model's own units (`model.shard_units()`), or their checkpoint wrappers once wrapped."""
    if not hasattr(model, "shard_units"):
        return []
    units = model.shard_units()
    wrappers = {id(m._checkpoint_wrapped_module): m for m in model.modules() if isinstance(m, CheckpointWrapper)}
    return [wrappers.get(id(u), u) for u in units]


CKPT_MODES = ("none", "block", "every_k", "selective")


def _sac_save_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps: matmuls and every SDPA kernel (CPU and GPU)."""
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
             "_scaled_dot_product_fused_attention_overrideable")
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


SAC_SAVE_OPS = _sac_save_ops()


def sac_policy(ctx: object, func: object, *args, **kwargs) -> CheckpointPolicy:
    """Keep matmul and attention outputs (the FLOPs); recompute everything else (memory-bound, cheap)."""
    return CheckpointPolicy.MUST_SAVE if func in SAC_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def sac_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Fresh (forward, recompute) selective-checkpoint contexts for one checkpointed call."""
    return create_selective_checkpoint_contexts(sac_policy)


def checkpoint_mode(cfg: ParallelConfig) -> str:
    """The checkpointing mode the flags ask for: `--ckpt_mode`, or block for a bare `--grad_ckpt`.

    Refuses `--ckpt_every` other than its default outside every_k (it would be silently ignored).
    """
    mode = cfg.ckpt_mode if cfg.ckpt_mode != "none" else ("block" if cfg.grad_ckpt else "none")
    if mode not in CKPT_MODES:
        raise ValueError(f"unknown --ckpt_mode {cfg.ckpt_mode!r}; choose one of {list(CKPT_MODES)}")
    default_every = ParallelConfig.__dataclass_fields__["ckpt_every"].default
    if mode != "every_k" and cfg.ckpt_every != default_every:
        raise ValueError(f"--ckpt_every {cfg.ckpt_every} applies to --ckpt_mode every_k only (the mode is {mode}); "
                         "add --ckpt_mode every_k or drop --ckpt_every")
    if cfg.ckpt_every < 1:
        raise ValueError(f"--ckpt_every must be >= 1, got {cfg.ckpt_every}")
    return mode


def apply_checkpointing(model: nn.Module, mode: str = "block", every: int = 1) -> int:
    """Activation checkpointing (non-reentrant) around the model's units in place; returns how many were wrapped.

    block: every unit; every_k: units 0, every, 2 x every, ... (in `shard_units()` order); selective: every
    unit, with `sac_policy` choosing per op what is saved. Parameter names stay clean.
    """
    if mode == "none":
        return 0
    units = shard_units(model)
    if mode == "every_k":
        units = units[::every]
    elif mode not in ("block", "selective"):
        raise ValueError(f"unknown checkpointing mode {mode!r}; choose one of {list(CKPT_MODES)}")
    ids = {id(u) for u in units}
    extra = {"context_fn": sac_contexts} if mode == "selective" else {}
    wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **extra)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: id(m) in ids)
    return len(ids)


WHOLE_MODEL = ("model", "model-cudagraphs")  # the --compile modes that compile the wrapped model in one graph


def apply_compile(module: nn.Module, mode: str, backend: str = "inductor") -> None:
    """torch.compile in place (no `_orig_mod.` in names): each unit ("blocks") or the whole module ("model"),
    the latter with CUDA graphs ("model-cudagraphs": inductor's reduce-overhead mode)."""
    if mode == "blocks":
        for unit in shard_units(module):
            unit.compile(backend=backend)  # like torchtitan's per-block compile
    elif mode == "model":
        module.compile(backend=backend)  # one graph per step shape: the visible-token count is fixed (static shapes)
    elif mode == "model-cudagraphs":
        module.compile(mode="reduce-overhead")  # static shapes: forward and backward each replay one CUDA graph
    elif mode != "none":
        raise ValueError(f"compile mode must be none, blocks, model or model-cudagraphs, got {mode!r}")


def check_compile(cfg: ParallelConfig, device: torch.device) -> None:
    """Refuse a --compile mode that cannot work here (ConfigError naming the fix) before any work starts."""
    if cfg.compile != "model-cudagraphs":
        return
    why = [text for bad, text in (
        (device.type != "cuda", "CUDA graphs need a CUDA device, and this run is on the CPU"),
        (cfg.dist == "deepspeed", "DeepSpeed's engine hooks into the whole model (a whole-model graph cannot capture it)"),
        (cfg.dist == "fsdp", "FSDP2 frees and re-gathers the parameters around every block (a CUDA graph needs "
                             "fixed addresses)"),
        (cfg.compile_backend != "inductor", f"CUDA graphs are inductor's reduce-overhead mode, not "
                                            f"--compile_backend {cfg.compile_backend}")) if bad]
    if why:
        raise ConfigError(f"--compile model-cudagraphs: {'; '.join(why)}; use --compile model (or blocks), or run on "
                          "a CUDA GPU with --dist ddp and --compile_backend inductor")


def prepare(model: nn.Module, cfg: ParallelConfig) -> None:
    """What every backend applies to the plain model first: checkpointing, then per-block compile."""
    apply_checkpointing(model, checkpoint_mode(cfg), cfg.ckpt_every)
    if cfg.compile == "blocks":
        apply_compile(model, "blocks", cfg.compile_backend)


class Backend(abc.ABC):
    """Common interface; subclasses fill in wrapping, sync, backward, step and checkpoint I/O."""

    name = "base"

    def __init__(self, model: nn.Module, cfg: ParallelConfig, info: DistInfo, accum_iter: int) -> None:
        self.cfg, self.info, self.unwrapped = cfg, info, model
        self.accum_iter = accum_iter
        self.dtype = DTYPES[cfg.precision]
        self.module: nn.Module = model
        self.optimizer: torch.optim.Optimizer
        self.clip_grad = 0.0

    @property
    def param_groups(self) -> list[dict]:
        """Optimizer groups (with 'lr', 'lr_scale', 'weight_decay'); setting g['lr'] takes effect."""
        return self.optimizer.param_groups

    def precision(self) -> contextlib.AbstractContextManager:
        """Context for forward passes, training and evaluation alike (mixed precision where it is autocast)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def microstep(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward and backward: gradients are synchronised only if `is_last`."""

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
    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate loss / accum_iter (inside `microstep`)."""

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

    def __init__(self, model: nn.Module, cfg: ParallelConfig, optim: OptimConfig, lr: float, info: DistInfo,
                 accum_iter: int, micro_batch: int) -> None:
        super().__init__(model, cfg, info, accum_iter)
        self.clip_grad = optim.clip_grad
        model.to(info.device)
        prepare(model, cfg)
        if info.world_size > 1:
            ids = [info.local_rank] if info.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.compile in WHOLE_MODEL:
            apply_compile(self.module, cfg.compile, cfg.compile_backend)  # DDP's graph is split at its buckets
        self.optimizer = build_optimizer(model, optim, lr, info.device)
        self.scaler = torch.amp.GradScaler(info.device.type) if cfg.precision == "fp16" else None

    def precision(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on the device, or nothing for fp32."""
        return torch.autocast(self.info.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def microstep(self, is_last: bool) -> contextlib.AbstractContextManager:
        """DDP's no_sync for every micro-step but the last (it decides at forward time, hence a context)."""
        if is_last or not isinstance(self.module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate loss / accum_iter, through the loss scaler for fp16."""
        loss = loss / self.accum_iter
        (self.scaler.scale(loss) if self.scaler else loss).backward()

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
        return None

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
    """FSDP2: fully_shard per unit then the root, on a flat mesh or HSDP's 2-D one; bf16 via MixedPrecisionPolicy; DCP I/O.

    HSDP (`--hsdp_shard_size N`): parameters are sharded over the N ranks of a group and replicated
    across groups; gradients are reduce-scattered in the group, then all-reduced across groups. Grad
    norms are DTensors over the whole mesh: `full_tensor()` reduces the partial norm over both dims.
    """

    name = "fsdp"

    def __init__(self, model: nn.Module, cfg: ParallelConfig, optim: OptimConfig, lr: float, info: DistInfo,
                 accum_iter: int, micro_batch: int) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        super().__init__(model, cfg, info, accum_iter)
        if cfg.precision == "fp16":
            raise ValueError("--dist fsdp does not support --precision fp16 (no sharded loss scaling); use bf16")
        fsdp_mesh_shape(info.world_size, cfg.hsdp_shard_size)  # refuses a bad group size before any work
        self.clip_grad = optim.clip_grad
        ensure_process_group(info)
        model.to(info.device)
        prepare(model, cfg)
        self.mesh = mesh = fsdp_mesh(info.device.type, info.world_size, cfg.hsdp_shard_size)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.dtype else None
        kw = {"mesh": mesh, "mp_policy": mp} if mp else {"mesh": mesh}
        for unit in shard_units(model):
            fully_shard(unit, **kw)
        fully_shard(model, **kw)
        if cfg.compile == "model":
            apply_compile(model, "model", cfg.compile_backend)
        self._ckpt_group = None  # gloo group for asynchronous saves, made on first use (collectively)
        # Build groups after sharding: the parameters are now DTensors (replaced in place).
        self.optimizer = build_optimizer(model, optim, lr, info.device)

    def microstep(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Reduce-scatter gradients only in the last micro-step's backward."""
        self.module.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate loss / accum_iter."""
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


def deepspeed_config(cfg: ParallelConfig, optim: OptimConfig, accum_iter: int, micro_batch: int) -> dict:
    """DeepSpeed config from the flags; a --deepspeed_config JSON is merged over it, and must agree with them.

    The loop runs `accum_iter` micro-steps and DeepSpeed divides each loss by its own
    `gradient_accumulation_steps`; the loop's precision context and DeepSpeed's bf16/fp16 switches and
    the two clipping values must be the same too. A disagreement is an error naming both values.
    """
    generated: dict = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_iter,
        "gradient_clipping": float(optim.clip_grad),
        "zero_optimization": {"stage": int(cfg.zero_stage)},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not cfg.deepspeed_config:
        return generated
    user = read_json_object(cfg.deepspeed_config, "--deepspeed_config")
    if "activation_checkpointing" in user:
        # DeepSpeed's engine never reads this section: it only configures deepspeed.checkpointing.checkpoint,
        # which a model must call itself, and ours are plain modules checkpointed from outside.
        raise ValueError(f"{cfg.deepspeed_config}: the activation_checkpointing section would be silently ignored "
                         "(DeepSpeed applies it only inside models that call deepspeed.checkpointing, and these "
                         "models are checkpointed from outside); drop it and use --grad_ckpt or --ckpt_mode "
                         "block|every_k|selective")
    merged = _merge(generated, user)
    checks = [
        ("gradient_accumulation_steps", "--accum_iter", accum_iter, merged["gradient_accumulation_steps"]),
        ("train_micro_batch_size_per_gpu", "--batch_size", micro_batch, merged["train_micro_batch_size_per_gpu"]),
        ("gradient_clipping", "--clip_grad", float(optim.clip_grad), float(merged["gradient_clipping"])),
        ("bf16.enabled", "--precision", cfg.precision == "bf16", bool(merged["bf16"].get("enabled"))),
        ("fp16.enabled", "--precision", cfg.precision == "fp16", bool(merged["fp16"].get("enabled"))),
        ("zero_optimization.stage", "--zero_stage", cfg.zero_stage, merged["zero_optimization"].get("stage")),
    ]
    for key, flag_name, want, got in checks:
        if want != got:
            shown = cfg.precision if flag_name == "--precision" else want
            raise ValueError(f"{cfg.deepspeed_config}: {key} is {got!r} but {flag_name} gives {shown!r}; "
                             f"make them agree (or drop {key} from the JSON: the flags fill it in)")
    return merged


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO-1/2/3 with a torch AdamW client optimizer; DeepSpeed owns accumulation and clipping."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: ParallelConfig, optim: OptimConfig, lr: float, info: DistInfo,
                 accum_iter: int, micro_batch: int) -> None:
        if cfg.compile in WHOLE_MODEL:
            # The engine runs ZeRO's partitioning and gradient-reduction hooks around and inside the model;
            # a whole-model graph would have to trace them. Blocks compile inside the engine as usual.
            raise ValueError("--compile model is not available with --dist deepspeed (DeepSpeed's engine hooks "
                             "into the whole model); use --compile blocks (each block compiled) or none")
        import deepspeed

        super().__init__(model, cfg, info, accum_iter)
        self.config = deepspeed_config(cfg, optim, accum_iter, micro_batch)  # checked before any work
        ensure_process_group(info)
        deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo")
        prepare(model, cfg)
        optimizer = build_optimizer(model, optim, lr, info.device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        half = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float16 if self.engine.fp16_enabled() else None
        self.module = _CastClips(self.engine, half)
        self._is_last = True

    @contextlib.contextmanager
    def microstep(self, is_last: bool) -> Iterator[None]:
        """Tell DeepSpeed before the forward whether this micro-step ends the accumulation."""
        self._is_last = is_last
        self.engine.set_gradient_accumulation_boundary(is_last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed divides by gradient_accumulation_steps itself and reduces on the boundary."""
        self.engine.backward(loss)
        if not self._is_last:
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step counters

    def step(self) -> torch.Tensor | None:
        """Optimizer step at the boundary (DeepSpeed clips); returns its pre-clip global grad norm."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm)

    def full_model_state_dict(self) -> dict:
        """fp32 master weights gathered per parameter (works for every ZeRO stage); collective."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None and not p.requires_grad:  # a frozen parameter (e.g. a momentum encoder) has no fp32 master
                with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                    full = p.data.detach().float().cpu().clone()
            if self.info.is_main and full is not None:
                out[clean_name(name)] = full.detach().float().cpu().clone()
        if self.info.is_main:
            for name, b in self.engine.module.named_buffers():
                out[clean_name(name)] = b.detach().cpu().clone()
        return out

    def save(self, path: str | Path, async_save: bool = False) -> Future | None:
        """DeepSpeed's own sharded format under `path/zero/` (every rank writes its partition)."""
        self.engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG)
        return None

    def load(self, path: str | Path) -> None:
        """Restore module, ZeRO partitions and optimizer state (same world size and stage)."""
        load_path, _ = self.engine.load_checkpoint(
            str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {DEEPSPEED_TAG!r} under {path}")


def carry_optimizer_state(backend: Backend, source: dict) -> list[str]:
    """Load a consolidated optimizer state (plain names) into a fresh backend; returns the names that start fresh.

    A tensor whose shape changed (a position table resized for more frames or a larger input) or that the
    source lacks gets Adam's initial state (step 0, zero moments): its old moments describe other
    coordinates. Every other tensor keeps its step count and both moments. The lr and weight decay are the
    new run's (its param groups are kept).
    """
    if backend.name == "deepspeed":
        raise ValueError("--init_optimizer keep is not available with --dist deepspeed (ZeRO partitions the "
                         "optimizer state itself); use --dist ddp or fsdp, or --init_optimizer reset")
    shapes = {clean_name(n): tuple(p.shape) for n, p in backend.module.named_parameters() if p.requires_grad}
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    _, target = get_state_dict(backend.module, backend.optimizer, options=full)
    state, fresh = {}, []
    for name, shape in shapes.items():
        old = {k: v for k, v in source["state"].get(name, {}).items()}
        if old and all(tuple(v.shape) == shape for k, v in old.items() if k != "step" and torch.is_tensor(v)):
            state[name] = old
        else:
            fresh.append(name)
            state[name] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros(shape),
                           "exp_avg_sq": torch.zeros(shape)}
    set_optimizer_state_dict(backend.module, backend.optimizer, {"state": state, "param_groups": target["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))
    return sorted(fresh)


BACKENDS = {"ddp": DDPBackend, "fsdp": FSDPBackend, "deepspeed": DeepSpeedBackend}


def setup_parallel(model: nn.Module, cfg: ParallelConfig, optim: OptimConfig, lr: float, info: DistInfo,
                   accum_iter: int = 1, micro_batch: int = 1) -> Backend:
    """Wrap a plain model for `cfg.dist` in {ddp, fsdp, deepspeed} and build its AdamW optimizer at `lr`."""
    if cfg.dist not in BACKENDS:
        raise ValueError(f"unknown --dist {cfg.dist!r}; choose one of {sorted(BACKENDS)}")
    if cfg.precision not in DTYPES:
        raise ValueError(f"unknown --precision {cfg.precision!r}; choose one of {sorted(DTYPES)}")
    mode = checkpoint_mode(cfg)  # refuses contradictory checkpointing flags before any work
    check_compile(cfg, info.device)
    if str(cfg.hsdp_shard_size) not in ("0", "") and cfg.dist != "fsdp":
        raise ValueError(f"--hsdp_shard_size {cfg.hsdp_shard_size} needs --dist fsdp (HSDP is FSDP2 on a 2-D mesh; "
                         f"--dist {cfg.dist} has no shard groups): add --dist fsdp or drop --hsdp_shard_size")
    backend = BACKENDS[cfg.dist](model, cfg, optim, lr, info, accum_iter, micro_batch)
    mesh = f" mesh={fsdp_mesh_shape(info.world_size, cfg.hsdp_shard_size)}" if cfg.dist == "fsdp" else ""
    log.info("parallel: %s%s world=%d precision=%s checkpointing=%s%s compile=%s", backend.name, mesh, info.world_size,
             cfg.precision, mode, f" (k={cfg.ckpt_every})" if mode == "every_k" else "", cfg.compile)
    return backend
