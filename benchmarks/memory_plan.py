"""Memory per GPU for MAE-ST pretraining: parameters, gradients, optimizer state, activations.

    python benchmarks/memory_plan.py --model mae_vit_huge_patch16 --batch_size 2 --mask_ratio 0.9 \
        --precision bf16 --world_size 64            # every backend, with and without checkpointing
    python benchmarks/memory_plan.py --calibrate     # check the activation formula (every --ckpt_mode) on the CPU
    python benchmarks/memory_plan.py --model mae_vit_large_patch16 --fit_gib 68   # largest per-GPU batch that fits
    python benchmarks/memory_plan.py --model mae_vit_giant_patch14 --batch_size 32 --world_size 64   # ViT-g (docs/scale.md)
    python benchmarks/memory_plan.py --model mae_vit_giant_patch14 --world_size 64 --hsdp_shard_size 8   # + an HSDP row

"computed" figures are analytic. Activations count the tensors autograd saves per transformer
Block (ours: pre-norm, fused qkv, SDPA, timm Mlp with GELU) at the encoder's visible token count
K + 1 and the decoder's full count L + 1; `--calibrate` measures the same on the CPU with
torch.autograd.graph.saved_tensors_hooks and prints both; for each checkpointing mode (`--ckpt_mode` none,
block, every_k, selective, applied by util.parallel itself) it measures what a stack of Blocks keeps alive after
its forward (kept_bytes) beside the formula, and the second table gives the totals per mode. With a GPU, `--measure` runs one real
step on one device (no sharding) and reports torch.cuda.max_memory_allocated, labelled "measured"; on the
CPU it runs the same step and reports the process's resident-memory growth (a smoke test of the path, not
a GPU figure). `--fit_gib G` finds, per backend, the largest power-of-two per-GPU batch (videos) whose
computed total fits in G GiB when the GPUs (or accumulation steps) make up `--clips_per_step` (512).
`--hsdp_shard_size N` adds an `hsdp` row: FSDP2's layout with the states divided by the shard group N, not
the world size (N = world size is the fsdp row, N = 1 is a full replica per GPU as DDP's), and prints what
each GPU sends per step inside its group and across the groups (ring collectives, FSDP2's bf16 all-gathers and
fp32 gradient reductions). Not counted: the CUDA context and allocator caching (~1-3 GB), NCCL buffers, DataLoader memory.
`--json PATH` writes every figure for scripts (benchmarks/gpu_report.py); `--results DIR` writes a result file
(memory_plan_computed_<yyyymmdd>.md, or the measuring device's name with --measure).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_results_flag, recording  # noqa: E402
from models import create_model  # noqa: E402
from util.parallel import CKPT_MODES, apply_checkpointing  # noqa: E402

GiB = 2**30
BACKENDS = ("ddp", "fsdp", "zero1", "zero2", "zero3")  # "hsdp" joins them when --hsdp_shard_size is given
# Saved bytes per (token x model dim) of one Block, from the tensors autograd keeps (see calibrate()):
#   norm1 in, qkv in, q|k|v (one buffer, 3), attention out (= proj in: SDPA returns a [B, N, H, d] layout,
#   so the reshape is a view), norm2 in, fc1 in, GELU in (4), fc2 in (4): 16 per token x dim.
# fp32: 16 x 4 B. bf16 autocast (DDP): the residual stream and LayerNorm inputs stay fp32 (2 x 4 B), the rest
# is bf16 (14 x 2 B). bf16 parameters (FSDP2 MixedPrecisionPolicy, DeepSpeed bf16): all 16 x 2 B.
BYTES_PER_TOKEN_DIM = {"fp32": 64, "bf16_autocast": 36, "bf16_params": 32}
# The same per token, split by width: 8 tensors of the model dim and 2 of the MLP's hidden width (GELU in, fc2 in),
# which is 4 x dim for ViT-B/L/H and 48/11 x dim for ViT-g. bf16 autocast keeps 2 of the 8 (residual, LN in) fp32.


def block_token_bytes(dim: int, hidden: int, kind: str) -> int:
    """Bytes autograd saves per token in one Block of width `dim` and MLP width `hidden` (the table above)."""
    if kind == "fp32":
        return (8 * dim + 2 * hidden) * 4
    if kind == "bf16_params":
        return (8 * dim + 2 * hidden) * 2
    if kind == "bf16_autocast":
        return 2 * dim * 4 + (6 * dim + 2 * hidden) * 2
    raise ValueError(f"unknown activation kind {kind!r}; choose one of {list(BYTES_PER_TOKEN_DIM)}")


def activation_kind(precision: str, backend: str) -> str:
    """Which dtype layout the activations have for this precision and backend."""
    if precision == "fp32":
        return "fp32"
    return "bf16_autocast" if backend == "ddp" else "bf16_params"


def block_bytes(batch: int, tokens: int, dim: int, heads: int, kind: str, mlp_hidden: int | None = None) -> int:
    """Bytes autograd saves in one Block's forward (plus LayerNorm statistics and the SDPA log-sum-exp).

    `mlp_hidden` defaults to 4 x dim (ViT-B/L/H); ViT-g's is 6144 = 1408 x 48 / 11.
    """
    per = block_token_bytes(dim, 4 * dim if mlp_hidden is None else mlp_hidden, kind)
    stats = batch * tokens * (2 * 2 * 4 + heads * 4)  # mean+rstd of 2 LayerNorms, logsumexp per head (fp32)
    return batch * tokens * per + stats


def model_shape(model_name: str, num_frames: int, input_size: int) -> dict:
    """Parameter counts and token geometry of a factory model, built on the meta device (no memory)."""
    with torch.device("meta"):
        m = create_model(model_name, img_size=input_size, num_frames=num_frames)
    enc_block = sum(p.numel() for p in m.blocks[0].parameters())
    return dict(
        params=sum(p.numel() for p in m.parameters()),
        block_params=enc_block,
        dim=m.blocks[0].norm1.normalized_shape[0], heads=m.blocks[0].attn.num_heads, depth=len(m.blocks),
        mlp=m.blocks[0].mlp.fc1.out_features, dec_mlp=m.decoder_blocks[0].mlp.fc1.out_features,
        dec_dim=m.decoder_blocks[0].norm1.normalized_shape[0], dec_heads=m.decoder_blocks[0].attn.num_heads,
        dec_depth=len(m.decoder_blocks), tokens=m.patch_embed.num_patches, cls=int(m.cls_embed),
        pred_dim=m.decoder_pred.out_features, clip_values=3 * num_frames * input_size * input_size,
    )


def block_input_bytes(batch: int, tokens: int, dim: int, kind: str) -> int:
    """Bytes a checkpointed Block keeps: its input (the residual stream: fp32 unless the parameters are bf16)."""
    return batch * tokens * dim * (2 if kind == "bf16_params" else 4)


def sac_block_bytes(batch: int, tokens: int, dim: int, heads: int, kind: str, mlp_hidden: int | None = None) -> int:
    """Bytes one Block keeps under selective (per-op) checkpointing (util.parallel.sac_policy).

    Its input, and the outputs of the matmuls and of attention: qkv (3 x dim), SDPA (dim, plus its fp32
    log-sum-exp per head), proj (dim), fc1 (MLP width), fc2 (dim); LayerNorm, GELU and casts are recomputed.
    """
    hidden = 4 * dim if mlp_hidden is None else mlp_hidden
    matmul_width = 4 if kind == "fp32" else 2
    kept = (6 * dim + hidden) * matmul_width + heads * 4
    return block_input_bytes(batch, tokens, dim, kind) + batch * tokens * kept


def normalise_mode(checkpointing: bool | str) -> str:
    """A checkpointing mode name from a mode or the old bool (True: block)."""
    if isinstance(checkpointing, bool):
        return "block" if checkpointing else "none"
    if checkpointing not in CKPT_MODES:
        raise ValueError(f"unknown checkpointing mode {checkpointing!r}; choose one of {list(CKPT_MODES)}")
    return checkpointing


def kept_and_recomputed(units: list[tuple[int, int]], mode: str, every: int) -> tuple[int, int]:
    """(bytes kept after the forward, largest transient of one recomputed unit) for units of (full, kept-if-ckpt) bytes.

    `units` are in `shard_units()` order; every_k checkpoints units 0, every, 2 x every, ...
    """
    ckpt = [mode in ("block", "selective") or (mode == "every_k" and i % every == 0) for i in range(len(units))]
    kept = sum(small if c else full for (full, small), c in zip(units, ckpt, strict=True))
    if mode == "selective":  # recompute rebuilds what the policy dropped, one block at a time
        return kept, max((full - small for full, small in units), default=0)
    return kept, max((full for (full, _), c in zip(units, ckpt, strict=True) if c), default=0)


def block_units(batch: int, tokens: int, dim: int, heads: int, kind: str, mlp_hidden: int, count: int,
                mode: str) -> list[tuple[int, int]]:
    """`count` identical Blocks as (saved bytes without checkpointing, bytes kept when checkpointed in `mode`)."""
    full = block_bytes(batch, tokens, dim, heads, kind, mlp_hidden)
    small = (sac_block_bytes(batch, tokens, dim, heads, kind, mlp_hidden) if mode == "selective"
             else block_input_bytes(batch, tokens, dim, kind))
    return [(full, small)] * count


def activations(shape: dict, batch: int, mask_ratio: float, kind: str, checkpointing: bool | str,
                every: int = 2) -> int:
    """Peak saved-activation bytes of one forward+backward, for a checkpointing mode (or the old bool).

    Modes as util.parallel applies them: none; block (each unit keeps its input, one recomputed at a time in
    backward); every_k (units 0, every, 2 x every, ... of encoder-then-decoder order); selective (each unit
    keeps its input and its matmul and attention outputs; the rest of one block is rebuilt at a time).
    """
    mode = normalise_mode(checkpointing)
    L = shape["tokens"]
    n_enc = int(L * (1 - mask_ratio)) + shape["cls"]
    n_dec = L + shape["cls"]
    # Outside the blocks: the clip, the prediction and the fp32 loss target (+ its normalised copy).
    head = batch * (shape["clip_values"] * 4 + n_dec * shape["pred_dim"] * (2 + 3 * 4))
    units = (block_units(batch, n_enc, shape["dim"], shape["heads"], kind, shape["mlp"], shape["depth"], mode)
             + block_units(batch, n_dec, shape["dec_dim"], shape["dec_heads"], kind, shape["dec_mlp"],
                           shape["dec_depth"], mode))
    kept, transient = kept_and_recomputed(units, mode, every)
    return kept + transient + head


def states(shape: dict, backend: str, precision: str, world: int, shard: int = 0) -> tuple[float, float, float]:
    """(parameter, gradient, optimizer) bytes per GPU; AdamW keeps two fp32 moments per parameter.

    `hsdp` is FSDP2 sharded over groups of `shard` ranks: every state divides by the group, not the world.
    """
    P, W, half = shape["params"], world, precision != "fp32"
    blk = shape["block_params"]
    if backend == "hsdp":
        if shard < 1 or world % shard:
            raise ValueError(f"--hsdp_shard_size {shard} must divide --world_size {world} (and be >= 1)")
        W, backend = shard, "fsdp"  # replicas hold the same shard: only the group divides
    if backend == "ddp":  # full replica; DDP's gradient buckets hold a second copy of the grads
        # (one process trains the plain module, without DDP and its buckets: util.parallel.DDPBackend)
        return 4 * P, (2 if W > 1 else 1) * 4 * P, 8 * P
    if backend == "fsdp":  # sharded fp32; two blocks gathered at once (current + prefetch) in param dtype
        gathered = 2 * blk * (2 if half else 4)
        return 4 * P / W + gathered, 4 * P / W + gathered, 8 * P / W
    stage = int(backend[-1])
    model_bytes = 2 if half else 4
    master = 4 * P / W if half else 0  # DeepSpeed keeps fp32 master weights, partitioned under ZeRO
    params = (model_bytes * P / W if stage == 3 else model_bytes * P) + master
    grads = model_bytes * P / W if stage >= 2 else model_bytes * P
    return params, grads, 8 * P / W


def communication(shape: dict, precision: str, world: int, shard: int) -> dict:
    """GiB each GPU sends per optimiser step, (FSDP2's collectives as ring algorithms) inside its shard group and
    across the groups: parameters all-gathered in forward and again in backward (param dtype), gradients
    reduce-scattered in fp32 in the group, then (HSDP) the 1/N gradient shard all-reduced over the W/N replicas."""
    P, n = shape["params"], shard or world
    replicas = world // n
    gather = 2 * (n - 1) / n * P * (2 if precision != "fp32" else 4)
    scatter = (n - 1) / n * P * 4
    across = 2 * (replicas - 1) / replicas * P / n * 4
    return {"shard_group": n, "replicas": replicas, "in_group_gib": (gather + scatter) / GiB, "across_gib": across / GiB}


def plan(model: str, batch: int, mask_ratio: float, precision: str, world: int, backends: tuple[str, ...],
         num_frames: int = 16, input_size: int = 224, every: int = 2, hsdp_shard_size: int = 0) -> list[dict]:
    """Rows of the memory table (GiB per GPU), computed; `every` is every_k's k, `hsdp_shard_size` the hsdp row's group."""
    shape = model_shape(model, num_frames, input_size)
    rows = []
    for backend in backends:
        p, g, o = states(shape, backend, precision, world, hsdp_shard_size)
        kind = activation_kind(precision, backend)
        a0 = activations(shape, batch, mask_ratio, kind, False)
        a1 = activations(shape, batch, mask_ratio, kind, True)
        modes = {m: activations(shape, batch, mask_ratio, kind, m, every) for m in CKPT_MODES}
        rows.append(dict(backend=backend, params=p / GiB, grads=g / GiB, optim=o / GiB, act=a0 / GiB,
                         act_ckpt=a1 / GiB, total=(p + g + o + a0) / GiB, total_ckpt=(p + g + o + a1) / GiB,
                         act_modes={m: a / GiB for m, a in modes.items()},
                         total_modes={m: (p + g + o + a) / GiB for m, a in modes.items()}))
    return rows


def format_table(rows: list[dict], title: str) -> str:
    """Markdown table of plan() rows."""
    head = ("| backend | params | grads | optimizer | activations | act. (ckpt) | total | total (ckpt) |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [f"{title}", "", head]
    for r in rows:
        lines.append(f"| {r['backend']} | " + " | ".join(f"{r[k]:.2f}" for k in
                     ("params", "grads", "optim", "act", "act_ckpt", "total", "total_ckpt")) + " |")
    return "\n".join(lines) + "\n\n(GiB per GPU, computed)"


def format_modes_table(rows: list[dict], every: int) -> str:
    """Markdown table of the total per checkpointing mode (`--ckpt_mode`) for plan() rows."""
    names = [f"every_k (k={every})" if m == "every_k" else m for m in CKPT_MODES]
    lines = ["total per --ckpt_mode (activations in brackets)", "",
             "| backend | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for r in rows:
        lines.append(f"| {r['backend']} | " + " | ".join(f"{r['total_modes'][m]:.2f} ({r['act_modes'][m]:.2f})"
                                                       for m in CKPT_MODES) + " |")
    return "\n".join(lines) + "\n\n(GiB per GPU, computed)"


def saved_bytes(fn: Callable[..., object], *inputs: torch.Tensor, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of distinct storages autograd saves while running fn (parameters excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(seen.values())


def calibrate(batch: int = 2, tokens: int = 197, dim: int = 128, heads: int = 4) -> list[tuple[str, int, int]]:
    """(kind, measured, formula) saved bytes of one of our Blocks on the CPU."""
    from models.video_vit import Block

    torch.manual_seed(0)
    block = Block(dim, heads, 4.0, qkv_bias=True)
    params = tuple(block.parameters())
    out = []
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    out.append(("fp32", saved_bytes(block, x, exclude=params), block_bytes(batch, tokens, dim, heads, "fp32")))
    xb = x.detach().bfloat16().requires_grad_()
    half = Block(dim, heads, 4.0, qkv_bias=True).bfloat16()
    out.append(("bf16_params", saved_bytes(half, xb, exclude=tuple(half.parameters())),
                block_bytes(batch, tokens, dim, heads, "bf16_params")))
    giant = Block(dim, heads, 48 / 11, qkv_bias=True)  # ViT-g's MLP ratio: hidden = int(dim x 48 / 11)
    out.append(("fp32, MLP 48/11", saved_bytes(giant, x, exclude=tuple(giant.parameters())),
                block_bytes(batch, tokens, dim, heads, "fp32", giant.mlp.fc1.out_features)))
    return out


def kept_bytes(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor,
               exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of distinct storages made during fn's forward that are still alive when it returns (its output aside).

    What the autograd graph holds for backward, whatever holds it: autograd's saved tensors without
    checkpointing (the same figure as saved_bytes), the inputs a checkpoint keeps for its recompute, the op
    outputs a selective-checkpoint policy caches. Tracked with weak storage references from a dispatch mode.
    """
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    made: list[tuple[StorageWeakRef, int, int]] = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    made.append((StorageWeakRef(st), st.data_ptr(), st.nbytes()))
            return out

    with Track():
        out = fn(*inputs)
    skip = {t.untyped_storage().data_ptr() for t in (*exclude, out)}
    alive = {ptr: n for ref, ptr, n in made if not ref.expired() and ptr not in skip}
    del out
    return sum(alive.values())


class BlockStack(torch.nn.Module):
    """Blocks run in order, handing them over as `shard_units()` so util.parallel checkpoints them as in a model."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def shard_units(self) -> list[torch.nn.Module]:
        """The blocks."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks on a copy of x (so the first block's input is made inside, like every later one's)."""
        x = x.clone()
        for blk in self.blocks:
            x = blk(x)
        return x


def calibrate_modes(batch: int = 2, tokens: int = 197, dim: int = 128, heads: int = 4, depth: int = 4,
                    every: int = 2) -> list[tuple[str, str, int, int]]:
    """(mode, kind, measured, formula) bytes a stack of `depth` Blocks keeps after its forward on the CPU.

    Each checkpointing mode is applied by util.parallel.apply_checkpointing (the training code's own),
    fp32 and bf16 parameters; ViT-g's 48/11 MLP too.
    """
    from models.video_vit import Block

    out = []
    for kind, ratio in (("fp32", 4.0), ("bf16_params", 4.0), ("fp32", 48 / 11)):
        for mode in CKPT_MODES:
            torch.manual_seed(0)
            stack = BlockStack([Block(dim, heads, ratio, qkv_bias=True) for _ in range(depth)])
            dtype = torch.bfloat16 if kind == "bf16_params" else torch.float32
            stack.to(dtype)
            apply_checkpointing(stack, mode, every)
            x = torch.randn(batch, tokens, dim, dtype=dtype, requires_grad=True)
            measured = kept_bytes(stack, x, exclude=tuple(stack.parameters()))
            hidden = stack.blocks[0].mlp.fc1.out_features if hasattr(stack.blocks[0], "mlp") else \
                stack.blocks[0]._checkpoint_wrapped_module.mlp.fc1.out_features
            units = block_units(batch, tokens, dim, heads, kind, hidden, depth, mode)
            formula, _ = kept_and_recomputed(units, mode, every)
            label = kind if ratio == 4.0 else f"{kind}, MLP 48/11"
            out.append((mode, label, measured, formula))
    return out


def fit(model: str, budget_gib: float, backend: str, mask_ratio: float, precision: str, checkpointing: bool | str,
        repeat_aug: int = 4, clips_per_step: int = 512, num_frames: int = 16, input_size: int = 224,
        every: int = 2) -> dict | None:
    """Largest power-of-two per-GPU batch (videos) whose computed total fits `budget_gib`, with the GPUs
    (times accumulation steps) that make up `clips_per_step`; None if not even one video fits.
    `checkpointing` is a mode (or the old bool: True is block)."""
    mode = normalise_mode(checkpointing)
    best = None
    videos = 1
    while videos * repeat_aug <= clips_per_step:
        clips = videos * repeat_aug
        world = clips_per_step // clips
        row = plan(model, clips, mask_ratio, precision, world, (backend,), num_frames, input_size, every)[0]
        total = row["total_modes"][mode]
        if total <= budget_gib:
            best = {"backend": backend, "grad_ckpt": checkpointing, "batch_size": videos, "repeat_aug": repeat_aug,
                    "clips_per_gpu": clips, "gpus_x_accum": world, "computed_gib": total}
        videos *= 2
    return best


def measure(model: str, batch: int, mask_ratio: float, precision: str, checkpointing: bool,
            num_frames: int = 16, input_size: int = 224, device: str = "cuda") -> dict:
    """One real training step on one device (the training backend in one process: DDP layout, no sharding).

    CUDA: peak bytes from torch.cuda.max_memory_allocated. CPU: growth of the process's resident memory
    (states: after building and one step; peak: its high-water mark during the next step).
    """
    from benchmarks import common

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    common.reset_peak_memory(dev)
    start = common.current_memory(dev)
    m = create_model(model, img_size=input_size, num_frames=num_frames)
    backend = common.build_backend(m, dev, precision, grad_ckpt=checkpointing, micro_batch=batch)
    clips = torch.randn(batch, 3, num_frames, input_size, input_size, device=dev)
    noise = torch.rand(batch, m.patch_embed.num_patches, device=dev)
    step = common.train_step_fn(backend, {"clips": clips, "noise": noise}, common.mae_loss(mask_ratio))
    for _ in range(2):  # the second step has the optimizer state already allocated
        base = common.current_memory(dev)
        common.reset_peak_memory(dev)
        step()
    peak = common.peak_memory(dev)
    if cuda:
        return dict(states=base / GiB, peak=peak / GiB, act=(peak - base) / GiB, method="torch.cuda.max_memory_allocated")
    return dict(states=(base - start) / GiB, peak=(peak - start) / GiB, act=(peak - base) / GiB,
                method="CPU resident-memory growth (not a GPU figure)")


def main(argv: list[str] | None = None) -> dict:
    """CLI: print the computed table (and calibration / GPU measurement when asked); returns every figure."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mae_vit_large_patch16")
    p.add_argument("--batch_size", type=int, default=2, help="videos per GPU per micro-step")
    p.add_argument("--repeat_aug", type=int, default=4, help="clips per video: the GPU sees batch x repeat_aug")
    p.add_argument("--mask_ratio", type=float, default=0.9)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--world_size", type=int, default=64)
    p.add_argument("--backend", default="all", choices=["all", *BACKENDS, "hsdp"])
    p.add_argument("--hsdp_shard_size", type=int, default=0,
                   help="add an hsdp row: FSDP2 sharded within groups of N ranks (e.g. the GPUs per node)")
    p.add_argument("--num_frames", type=int, default=16)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--ckpt_every", type=int, default=2, help="k of the every_k checkpointing column (--ckpt_mode)")
    p.add_argument("--calibrate", action="store_true",
                   help="compare the Block formula with autograd's saved tensors, and each checkpointing mode's")
    p.add_argument("--measure", action="store_true", help="also run one step on this GPU (if there is one)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="where --measure runs (cpu: the same step, resident-memory growth; a smoke test)")
    p.add_argument("--fit_gib", type=float, default=0.0,
                   help="largest power-of-two per-GPU batch whose computed total fits in this many GiB")
    p.add_argument("--clips_per_step", type=int, default=512, help="clips per optimiser step for --fit_gib")
    p.add_argument("--json", default="", help="also write every figure to this JSON file")
    add_results_flag(p)
    a = p.parse_args(argv)
    with recording(a.results, "memory_plan", __file__, argv, hardware="computed") as rec:
        rec.data = report(a)
        if rec.data["measured"]:  # a measurement is named by the device that made it
            rec.device, rec.hardware = a.device, ""
    if a.json:
        Path(a.json).write_text(json.dumps(rec.data, indent=1))
    return rec.data


def report(a: argparse.Namespace) -> dict:
    """Print the tables the flags ask for; returns every figure."""
    clips = a.batch_size * a.repeat_aug
    backends = BACKENDS if a.backend == "all" else (a.backend,)
    if a.backend == "hsdp" and not a.hsdp_shard_size:
        raise SystemExit("--backend hsdp needs --hsdp_shard_size N (the ranks of one shard group, e.g. GPUs per node)")
    if a.hsdp_shard_size and "hsdp" not in backends:
        backends = (*backends, "hsdp")
    rows = plan(a.model, clips, a.mask_ratio, a.precision, a.world_size, backends, a.num_frames, a.input_size,
                a.ckpt_every, a.hsdp_shard_size)
    print(format_table(rows, f"{a.model}: {clips} clips/GPU ({a.batch_size} x repeat {a.repeat_aug}), "
                             f"{a.num_frames}x{a.input_size}^2, mask {a.mask_ratio}, {a.precision}, "
                             f"{a.world_size} GPUs"))
    print()
    print(format_modes_table(rows, a.ckpt_every))
    comm = []
    if a.hsdp_shard_size:
        shape = model_shape(a.model, a.num_frames, a.input_size)
        comm = [communication(shape, a.precision, a.world_size, n) for n in (0, a.hsdp_shard_size)]
        flat, hsdp = comm
        print(f"\ncommunication per GPU per step: fsdp (one group of {a.world_size}) sends {flat['in_group_gib']:.2f} "
              f"GiB on rings that cross every node once the job spans several; hsdp {a.hsdp_shard_size} sends "
              f"{hsdp['in_group_gib']:.2f} GiB inside its group (one node's fast links when N = GPUs per node) and "
              f"{hsdp['across_gib']:.2f} GiB across the {hsdp['replicas']} replicas (the gradient all-reduce)")
    if a.calibrate:
        for kind, measured, formula in calibrate():
            print(f"calibration ({kind}, one Block, CPU): autograd saved {measured} B, formula {formula} B "
                  f"({measured / formula:.3f}x)")
        for mode, kind, measured, formula in calibrate_modes(every=a.ckpt_every):
            print(f"calibration (--ckpt_mode {mode}, {kind}, 4 Blocks, CPU): kept after forward {measured} B, "
                  f"formula {formula} B ({measured / formula:.3f}x)")
    out: dict = {"model": a.model, "clips_per_gpu": clips, "mask_ratio": a.mask_ratio, "precision": a.precision,
                 "world_size": a.world_size, "hsdp_shard_size": a.hsdp_shard_size, "computed": rows,
                 "communication": comm, "measured": [], "fit": []}
    if a.fit_gib:
        print(f"\nlargest per-GPU batch whose computed total fits {a.fit_gib:g} GiB, {a.clips_per_step} clips per "
              f"optimiser step (repeat_aug {a.repeat_aug}; GPUs x accum_iter make up the rest):\n")
        print("| backend | act. ckpt | batch_size (videos) | clips / GPU | GPUs x accum_iter | computed GiB |\n"
              "| --- | --- | ---: | ---: | ---: | ---: |")
        for backend in backends:
            for ckpt in (False, True):
                best = fit(a.model, a.fit_gib, backend, a.mask_ratio, a.precision, ckpt, a.repeat_aug,
                           a.clips_per_step, a.num_frames, a.input_size)
                if best is None:
                    print(f"| {backend} | {'yes' if ckpt else 'no'} | does not fit | | | |")
                    continue
                out["fit"].append(best)
                print(f"| {backend} | {'yes' if ckpt else 'no'} | {best['batch_size']} | {best['clips_per_gpu']} | "
                      f"{best['gpus_x_accum']} | {best['computed_gib']:.1f} |")
    if a.measure:
        if a.device == "cuda" and not torch.cuda.is_available():
            print("measured: no GPU here; figures above are computed only")
        else:
            for ckpt in (False, True):
                m = measure(a.model, clips, a.mask_ratio, a.precision, ckpt, a.num_frames, a.input_size, a.device)
                computed = plan(a.model, clips, a.mask_ratio, a.precision, 1, ("ddp",), a.num_frames,
                                a.input_size)[0]["total_ckpt" if ckpt else "total"]
                out["measured"].append({"grad_ckpt": ckpt, **m, "computed_1gpu": computed})
                print(f"measured (1 {a.device.upper() if a.device == 'cpu' else 'GPU'}, ddp layout, ckpt={ckpt}): "
                      f"states {m['states']:.2f} GiB, activations {m['act']:.2f} GiB, peak {m['peak']:.2f} GiB "
                      f"(computed {computed:.2f})  [{m['method']}]")
    return out


if __name__ == "__main__":
    main()
