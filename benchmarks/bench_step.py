"""Time the MAE pretraining step that training runs (forward, backward, AdamW), optionally against a peer.

    python benchmarks/bench_step.py --model mae_vit_base_patch16 --frames 16 --img 224 --batch 2 \
        --mask-ratio 0.9 --peer hf

Ours is built and stepped exactly as `main_pretrain.py` does: `models.create_model`, the parallel
backend of `util.parallel.setup_parallel` (DDP in one process, the run's precision, activation
checkpointing and `--compile {none,blocks,model}`) and `util.engine.train_step`, the function the
training loop calls every step. Prints median step time, clips/s, FLOPs per step (analytic, and as `torch.utils.flop_counter`
sees them), achieved GFLOP/s, peak memory, and the share of this machine's fp32 matmul peak
(a large `torch.mm` timed in the same run). `--peer hf` times Hugging Face `VideoMAEForPreTraining`
at the same shapes with the same optimizer and prints HF step time / ours (>= 1 means ours is at
least as fast). `--profile` adds a torch.profiler table of the top ops of each model.

Benchmark-only dependencies (transformers) live in `requirements-bench.txt`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import create_model  # noqa: E402
from models.flops import masked_autoencoder_flops  # noqa: E402
from models.masking import num_visible  # noqa: E402
from util.config import OptimConfig, ParallelConfig  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.engine import train_step  # noqa: E402
from util.flops import matmul_peak_flops  # noqa: E402
from util.optim import build_adamw, param_groups  # noqa: E402
from util.parallel import setup_parallel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Result:
    """Measurements of one model's training step."""

    name: str
    step_times: list[float]
    flops_analytic: int
    flops_counter: int
    peak_mem_bytes: int
    params: int
    profile: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        """Median step time in seconds."""
        return statistics.median(self.step_times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mask-ratio", type=float, default=0.9)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16 = autocast mixed precision")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=7, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", choices=["none", "blocks", "model"], default="none",
                   help="torch.compile as training does it: each block, or the whole model (the peer: whole model)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on every block")
    p.add_argument("--peer", choices=["none", "hf"], default="none")
    p.add_argument("--profile", action="store_true", help="print the top ops of a profiled step")
    p.add_argument("--profile-rows", type=int, default=12)
    p.add_argument("--mm-size", type=int, default=4096, help="side of the square fp32 matmul timed as peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-sweep", default="", help="e.g. 0,0.75,0.9,0.95: step time against the FLOP ratio")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window (CUDA allocator, or the process RSS high-water mark)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets VmHWM, which ru_maxrss reads
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def current_memory(device: torch.device) -> int:
    """Bytes in use now (CUDA allocator, or the process RSS)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(device: torch.device) -> int:
    """Peak bytes since reset_peak_memory (CPU: max RSS of the whole process via getrusage)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak_gflops(device: torch.device, n: int, repeats: int = 5) -> float:
    """Best-of-N fp32 GFLOP/s of an n x n x n torch.mm: this machine's practical matmul peak."""
    return matmul_peak_flops(device, n, repeats) / 1e9


def autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked, else nothing."""
    if args.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peer_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The peer's AdamW: the same parameter groups, betas and weight decay as ours (util.optim)."""
    return build_adamw(param_groups(model, 0.05), 1e-4, device, (0.9, 0.95))


def count_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one step as torch.utils.flop_counter sees them (misses CPU flash attention)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def profile_table(step: Callable[[], torch.Tensor], device: torch.device, rows: int) -> str:
    """Top ops by self time of one profiled step."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with torch.profiler.profile(activities=acts) as prof:
        step()
        sync(device)
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


@dataclass
class Bench:
    """A model under test: its training-step closure and what is measured outside the timed loop."""

    result: Result
    step: Callable[[], torch.Tensor]


def prepare(name: str, params: int, step: Callable[[], torch.Tensor], args: argparse.Namespace,
            device: torch.device, flops_analytic: int) -> Bench:
    """Warm a training-step closure up while measuring its peak memory."""
    reset_peak_memory(device)
    before = current_memory(device)
    for _ in range(max(1, args.warmup)):
        step()
    sync(device)
    peak = peak_memory(device)
    result = Result(name, [], flops_analytic, 0, peak, params, extra={"step_mem": peak - before})
    return Bench(result, step)


def run_interleaved(benches: list[Bench], args: argparse.Namespace, device: torch.device) -> None:
    """Time the models' steps in turn (A, B, A, B, ...) so load from other processes hits all alike."""
    for _ in range(args.steps):
        for b in benches:
            sync(device)
            t0 = time.perf_counter()
            b.step()
            sync(device)
            b.result.step_times.append(time.perf_counter() - t0)
    for b in benches:
        # torch.compile'd graphs hide their ops from the counter; it counts eager steps only.
        b.result.flops_counter = count_flops(b.step) if args.compile == "none" else 0
        if args.profile:
            b.result.profile = profile_table(b.step, device, args.profile_rows)


def bench_ours(args: argparse.Namespace, device: torch.device, clips: torch.Tensor, noise: torch.Tensor) -> Bench:
    """Our MaskedAutoencoderViT, wrapped and stepped as main_pretrain.py does it."""
    model = create_model(args.model, num_frames=args.frames, img_size=args.img).to(device).train()
    flops = model.flops_per_clip(args.mask_ratio)["train_step"] * args.batch
    params = sum(p.numel() for p in model.parameters())
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)
    parallel = ParallelConfig(dist="ddp", precision=args.dtype, grad_ckpt=args.grad_ckpt, compile=args.compile)
    backend = setup_parallel(model, parallel, OptimConfig(), 1e-4, info, accum_iter=1, micro_batch=args.batch)
    batch = {"clips": clips, "noise": noise}

    def loss_fn(module: nn.Module, b: dict) -> torch.Tensor:  # PretrainTask.loss for the random sampler
        return module(b["clips"], args.mask_ratio, b["noise"])[0]

    def step() -> torch.Tensor:
        return train_step(backend, [batch], loss_fn, 1)[0]

    return prepare("ours", params, step, args, device, flops)


def build_hf_peer(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """Hugging Face VideoMAEForPreTraining with our model's encoder/decoder shapes (SDPA attention)."""
    from transformers import VideoMAEConfig, VideoMAEForPreTraining  # benchmark-only dependency

    blk, dec = model.blocks[0], model.decoder_blocks[0]
    cfg = VideoMAEConfig(
        image_size=args.img,
        patch_size=model.patch_size,
        num_channels=3,
        num_frames=args.frames,
        tubelet_size=model.patch_embed.t_patch_size,
        hidden_size=blk.attn.qkv.in_features,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features,
        decoder_hidden_size=dec.attn.qkv.in_features,
        decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=dec.attn.num_heads,
        decoder_intermediate_size=dec.mlp.fc1.out_features,
        norm_pix_loss=True,
        use_mean_pooling=False,
        attn_implementation="sdpa",
    )
    return VideoMAEForPreTraining(cfg)


def bench_hf(args: argparse.Namespace, device: torch.device, clips: torch.Tensor, noise: torch.Tensor) -> Bench:
    """Hugging Face VideoMAE at the same shapes, hiding the same number of tokens per sample."""
    ref = create_model(args.model, num_frames=args.frames, img_size=args.img)
    peer = build_hf_peer(ref, args).to(device).train()
    if args.grad_ckpt:
        peer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = peer.config
    L = ref.patch_embed.num_patches
    K = num_visible(L, args.mask_ratio)
    ids_shuffle = noise.argsort(dim=1)
    bool_masked_pos = torch.ones(args.batch, L, dtype=torch.bool, device=device)
    bool_masked_pos.scatter_(1, ids_shuffle[:, :K], False)
    pixel_values = clips.transpose(1, 2).contiguous()  # HF takes [B, T, C, H, W]
    p, t = cfg.patch_size, cfg.tubelet_size
    flops = masked_autoencoder_flops(
        num_patches=L, num_visible=K, patch_dim=3 * t * p * p,
        enc_dim=cfg.hidden_size, enc_depth=cfg.num_hidden_layers, enc_mlp=cfg.intermediate_size,
        dec_dim=cfg.decoder_hidden_size, dec_depth=cfg.decoder_num_hidden_layers,
        dec_mlp=cfg.decoder_intermediate_size, pred_dim=3 * t * p * p, num_prefix=0, num_pred_tokens=L - K,
    )["train_step"] * args.batch
    del ref
    fwd_model = torch.compile(peer) if args.compile != "none" else peer
    opt = peer_optimizer(peer, device)

    def step() -> torch.Tensor:
        with autocast(args, device):
            loss = fwd_model(pixel_values, bool_masked_pos=bool_masked_pos).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return prepare("hf VideoMAE", sum(p.numel() for p in peer.parameters()), step, args, device, flops)


def fmt_row(cells: list[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def report(results: list[Result], args: argparse.Namespace, peak: float, device: torch.device) -> str:
    """Markdown table of all results, plus the peer ratio."""
    mem_kind = "peak alloc" if device.type == "cuda" else "peak RSS"
    head = ["model", "params", "median step (s)", "min / max (s)", "clips/s", "TFLOP/step (analytic)",
            "TFLOP/step (counter)", "GFLOP/s", "% of mm peak", mem_kind, "step mem"]
    lines = [fmt_row(head), fmt_row(["---"] * len(head))]
    for r in results:
        gflops = r.flops_analytic / r.median / 1e9
        lines.append(fmt_row([
            r.name, f"{r.params / 1e6:.1f}M", f"{r.median:.3f}",
            f"{min(r.step_times):.3f} / {max(r.step_times):.3f}", f"{args.batch / r.median:.2f}",
            f"{r.flops_analytic / 1e12:.3f}", f"{r.flops_counter / 1e12:.3f}" if r.flops_counter else "n/a",
            f"{gflops:.1f}", f"{100 * gflops / peak:.1f}%", f"{r.peak_mem_bytes / 2**30:.2f} GiB",
            f"{r.extra['step_mem'] / 2**30:.2f} GiB",
        ]))
    out = "\n".join(lines)
    if len(results) == 2:
        ours, peer = results
        out += (f"\n\nratio (HF step time / ours): {peer.median / ours.median:.3f} on medians, "
                f"{min(peer.step_times) / min(ours.step_times):.3f} on fastest steps  (>= 1.0: ours at least as fast)")
    return out


def mask_sweep(args: argparse.Namespace, device: torch.device, clips: torch.Tensor, noise: torch.Tensor) -> str:
    """Our step at several mask ratios (timed in turn): measured speed-up against the FLOP ratio."""
    benches = []
    for ratio in (float(r) for r in args.mask_sweep.split(",")):
        sub = argparse.Namespace(**{**vars(args), "mask_ratio": ratio})
        bench = bench_ours(sub, device, clips, noise)
        bench.result.name = f"{ratio:.2f}"
        benches.append(bench)
    run_interleaved(benches, argparse.Namespace(**{**vars(args), "profile": False}), device)
    base = benches[0].result
    lines = [f"\n## masking speed-up: {args.model}, {args.frames}x{args.img}x{args.img}, batch {args.batch}, "
             f"{args.dtype}, {device.type}\n",
             "| mask ratio | median step (s) | speed-up vs first | FLOP ratio | speed-up / FLOP ratio |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for b in benches:
        r = b.result
        speedup, flop_ratio = base.median / r.median, base.flops_analytic / r.flops_analytic
        lines.append(f"| {r.name} | {r.median:.3f} | {speedup:.2f}x | {flop_ratio:.2f}x | {speedup / flop_ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    peak = matmul_peak_gflops(device, args.mm_size)

    clips = torch.randn(args.batch, 3, args.frames, args.img, args.img, device=device)
    probe = create_model(args.model, num_frames=args.frames, img_size=args.img)
    L = probe.patch_embed.num_patches
    del probe
    noise = torch.rand(args.batch, L, device=device)

    if args.mask_sweep:
        print(mask_sweep(args, device, clips, noise))
        return
    benches = [bench_ours(args, device, clips, noise)]
    if args.peer == "hf":
        gc.collect()
        benches.append(bench_hf(args, device, clips, noise))
    run_interleaved(benches, args, device)
    results = [b.result for b in benches]
    peak_after = matmul_peak_gflops(device, args.mm_size)

    K = num_visible(L, args.mask_ratio)
    print(f"\n## step benchmark: {args.model}, {args.frames}x{args.img}x{args.img}, batch {args.batch}, "
          f"mask {args.mask_ratio} ({K}/{L} tokens visible), {args.dtype}, {device.type}"
          f"{f', compile {args.compile}' if args.compile != 'none' else ''}{', grad-ckpt' if args.grad_ckpt else ''}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 mm peak ({args.mm_size}^2): "
          f"{peak:.1f} GFLOP/s before, {peak_after:.1f} after (the higher is used)\n")
    print(report(results, args, max(peak, peak_after), device))
    print("\nSteps are timed in turn (ours, peer, ours, ...). Peak memory is the process's (the peer is "
          "built second, so its peak includes our resident model); step mem = peak - memory before the "
          "warm-up steps (activations, grads, AdamW state).")
    print("FLOPs: analytic = 3 x forward matmul FLOPs (models/flops.py), used for GFLOP/s; the counter "
          "(torch.utils.flop_counter) misses fused CPU flash attention.")
    for r in results:
        print(f"step times {r.name}: " + ", ".join(f"{t:.3f}" for t in r.step_times))
    for r in results:
        if r.profile:
            print(f"\n### profile: {r.name} (one step, top ops by self time)\n{r.profile}")


if __name__ == "__main__":
    main()
