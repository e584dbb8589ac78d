"""Time the MAE pretraining step that training runs (forward, backward, AdamW), optionally against a peer.

    python benchmarks/bench_step.py --model mae_vit_base_patch16 --frames 16 --img 224 --batch 2 \
        --mask-ratio 0.9 --peer hf
    python benchmarks/bench_step.py --device cuda --dtype bf16 --model mae_vit_large_patch16 --batch 8 \
        --compile none,blocks,model --json step.json        # eager and both compile modes, timed in turn
    torchrun --standalone --nproc_per_node 8 benchmarks/bench_step.py --device cuda --dtype bf16 \
        --model mae_vit_giant_patch14 --batch 8 --dist fsdp --grad-ckpt --hsdp-shard-size 4   # HSDP 2 x 4

Ours is built and stepped exactly as `main_pretrain.py` does: `models.create_model`, the parallel
backend of `util.parallel.setup_parallel` (`--dist ddp` in one process, or `fsdp` on a 1-rank group;
the run's precision, activation checkpointing and `--compile {none,blocks,model}`) and
`util.engine.train_step`, the function the training loop calls every step. Under torchrun with several
ranks every rank steps `--batch` clips (per GPU, as training's --batch_size) in the job's process group
(`--hsdp-shard-size` for HSDP); rank 0 prints and writes the JSON, its figures are per GPU. `--compile` takes a comma
list: each mode is built once and the steps are timed in turn (A, B, C, A, B, C, ...), so load from
other processes hits them alike. Prints median step time, clips/s, FLOPs per step (analytic, and as
`torch.utils.flop_counter` sees them), achieved GFLOP/s, MFU (on a GPU against the datasheet peak of
util/flops.py; on the CPU against a large `torch.mm` timed in the same run), peak memory. `--peer hf`
times Hugging Face `VideoMAEForPreTraining` at the same shapes with the same optimizer and prints HF
step time / ours (>= 1 means ours is at least as fast). `--profile` adds, per model, the dispatched
ATen ops and kernel launches of one step (the host's work: what compile removes) and the top ops.
`--json PATH` writes every figure for scripts (benchmarks/gpu_report.py); `--results DIR` also writes a result
file (`benchmarks/common.py`, `write_result_file`).

Benchmark-only dependencies (transformers) live in `requirements-bench.txt`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from models import create_model  # noqa: E402
from models.flops import masked_autoencoder_flops  # noqa: E402
from models.masking import num_visible  # noqa: E402
from util.distributed import DistInfo, cleanup  # noqa: E402
from util.flops import device_peak_flops, matmul_peak_flops  # noqa: E402
from util.optim import build_adamw, param_groups  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILE_MODES = ("none", "blocks", "model", "model-cudagraphs")


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
    compile: str = "none"
    ops: dict = field(default_factory=dict)  # per step: dispatched ATen ops, kernel launches (--profile)

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
    p.add_argument("--compile", default="none",
                   help="torch.compile as training does it (--compile of main_pretrain.py): none, blocks (each block) "
                        "model (whole model) or model-cudagraphs (whole model, CUDA graphs; CUDA only); a comma list "
                        "times each mode in turn")
    p.add_argument("--dist", choices=["ddp", "fsdp"], default="ddp",
                   help="the training backend: DDP in one process, or FSDP2 on a 1-rank group")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on every block")
    p.add_argument("--hsdp-shard-size", default="0",
                   help="with --dist fsdp under torchrun: HSDP shard groups of N ranks (or node), as --hsdp_shard_size")
    p.add_argument("--peer", choices=["none", "hf"], default="none")
    p.add_argument("--peer-compile", choices=["none", "model"], default="none", help="torch.compile the HF peer")
    p.add_argument("--json", default="", help="also write every figure to this JSON file")
    p.add_argument("--profile", action="store_true", help="print the top ops of a profiled step")
    p.add_argument("--profile-rows", type=int, default=12)
    p.add_argument("--mm-size", type=int, default=4096, help="side of the square fp32 matmul timed as peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-sweep", default="", help="e.g. 0,0.75,0.9,0.95: step time against the FLOP ratio")
    common.add_results_flag(p)
    args = p.parse_args(argv)
    args.compile_modes = [m for m in args.compile.split(",") if m]
    bad = [m for m in args.compile_modes if m not in COMPILE_MODES]
    if bad or not args.compile_modes:
        p.error(f"--compile takes a comma list of {', '.join(COMPILE_MODES)}; got {args.compile!r}")
    return args


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


def op_counts(events: list) -> dict[str, int]:
    """Host work of one profiled step: ATen ops dispatched from Python or compiled code (not those nested in
    another op), kernel launches (CUDA), and entries into compiled graphs."""
    def nested(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return {"aten_ops": sum(1 for e in events if e.name.startswith("aten::") and not nested(e)),
            "launches": sum(1 for e in events if "LaunchKernel" in e.name),
            "compiled_regions": sum(1 for e in events if e.name.startswith("Torch-Compiled Region"))}


def profile_step(step: Callable[[], torch.Tensor], device: torch.device, rows: int) -> tuple[dict, str]:
    """(op counts, top ops by self time) of one profiled step."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with torch.profiler.profile(activities=acts) as prof:
        step()
        common.sync(device)
    return op_counts(prof.events()), prof.key_averages().table(sort_by=sort, row_limit=rows)


@dataclass
class Bench:
    """A model under test: its training-step closure and what is measured outside the timed loop."""

    result: Result
    step: Callable[[], torch.Tensor]


def prepare(name: str, params: int, step: Callable[[], torch.Tensor], args: argparse.Namespace,
            device: torch.device, flops_analytic: int) -> Bench:
    """Warm a training-step closure up while measuring its peak memory."""
    common.reset_peak_memory(device)
    before = common.current_memory(device)
    for _ in range(max(1, args.warmup)):
        step()
    common.sync(device)
    peak = common.peak_memory(device)
    result = Result(name, [], flops_analytic, 0, peak, params, extra={"step_mem": peak - before})
    return Bench(result, step)


def run_interleaved(benches: list[Bench], args: argparse.Namespace, device: torch.device) -> None:
    """Time the models' steps in turn (A, B, A, B, ...) so load from other processes hits all alike."""
    times = common.time_in_turn({str(i): b.step for i, b in enumerate(benches)}, args.steps, device)
    for i, b in enumerate(benches):
        b.result.step_times.extend(times[str(i)])
    for b in benches:
        # torch.compile'd graphs hide their ops from the counter; it counts eager steps only.
        b.result.flops_counter = count_flops(b.step) if b.result.compile == "none" else 0
        if args.profile:
            b.result.ops, b.result.profile = profile_step(b.step, device, args.profile_rows)


def bench_ours(args: argparse.Namespace, device: torch.device, clips: torch.Tensor, noise: torch.Tensor,
               compile_mode: str = "none", info: DistInfo | None = None) -> Bench:
    """Our MaskedAutoencoderViT, wrapped and stepped as main_pretrain.py does it."""
    model = create_model(args.model, num_frames=args.frames, img_size=args.img).to(device).train()
    flops = model.flops_per_clip(args.mask_ratio)["train_step"] * args.batch
    params = sum(p.numel() for p in model.parameters())
    backend = common.build_backend(model, device, args.dtype, args.dist, args.grad_ckpt, compile_mode, args.batch,
                                   info=info, hsdp_shard_size=args.hsdp_shard_size)
    step = common.train_step_fn(backend, {"clips": clips, "noise": noise}, common.mae_loss(args.mask_ratio))

    name = "ours" if len(args.compile_modes) == 1 else f"ours ({'eager' if compile_mode == 'none' else compile_mode})"
    bench = prepare(name, params, step, args, device, flops)
    bench.result.compile = compile_mode
    return bench


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
    fwd_model = torch.compile(peer) if args.peer_compile == "model" else peer
    opt = peer_optimizer(peer, device)

    def step() -> torch.Tensor:
        with autocast(args, device):
            loss = fwd_model(pixel_values, bool_masked_pos=bool_masked_pos).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    bench = prepare("hf VideoMAE", sum(p.numel() for p in peer.parameters()), step, args, device, flops)
    bench.result.compile = args.peer_compile
    return bench


def fmt_row(cells: list[str]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(cells) + " |"


def mfu_peak(device: torch.device, dtype: str, mm_peak_flops: float) -> tuple[float, str]:
    """The FLOP/s that MFU divides by: the GPU's datasheet peak for the dtype, or the CPU's measured mm peak."""
    if device.type == "cuda":
        return device_peak_flops(device, dtype)
    return mm_peak_flops, "measured fp32 torch.mm"


def result_dict(r: Result, args: argparse.Namespace, peak: float) -> dict:
    """One model's figures for --json."""
    return {"name": r.name, "compile": r.compile, "median_s": r.median, "min_s": min(r.step_times),
            "max_s": max(r.step_times), "step_times": r.step_times, "clips_per_s": args.batch / r.median,
            "flops_per_step": r.flops_analytic, "tflops": r.flops_analytic / r.median / 1e12,
            "mfu": r.flops_analytic / r.median / peak, "params": r.params,
            "peak_mem_gib": r.peak_mem_bytes / 2**30, "step_mem_gib": r.extra["step_mem"] / 2**30, "ops": r.ops}


def report(results: list[Result], args: argparse.Namespace, peak: float, device: torch.device) -> str:
    """Markdown table of all results, plus the peer ratio."""
    mem_kind = "peak alloc" if device.type == "cuda" else "peak RSS"
    head = ["model", "params", "median step (s)", "min / max (s)", "clips/s", "TFLOP/step (analytic)",
            "TFLOP/step (counter)", "TFLOP/s", "MFU", mem_kind, "step mem"]
    lines = [fmt_row(head), fmt_row(["---"] * len(head))]
    for r in results:
        achieved = r.flops_analytic / r.median
        lines.append(fmt_row([
            r.name, f"{r.params / 1e6:.1f}M", f"{r.median:.3f}",
            f"{min(r.step_times):.3f} / {max(r.step_times):.3f}", f"{args.batch / r.median:.2f}",
            f"{r.flops_analytic / 1e12:.3f}", f"{r.flops_counter / 1e12:.3f}" if r.flops_counter else "n/a",
            f"{achieved / 1e12:.3f}", f"{100 * achieved / peak:.1f}%", f"{r.peak_mem_bytes / 2**30:.2f} GiB",
            f"{r.extra['step_mem'] / 2**30:.2f} GiB",
        ]))
    out = "\n".join(lines)
    peers = [r for r in results if r.name.startswith("hf")]
    for ours in (r for r in results if not r.name.startswith("hf")):
        for peer in peers:
            out += (f"\n\nratio (HF step time / {ours.name}): {peer.median / ours.median:.3f} on medians, "
                    f"{min(peer.step_times) / min(ours.step_times):.3f} on fastest steps  (>= 1.0: ours at least as fast)")
    if any(r.ops for r in results):
        out += "\n\nHost work per step (one profiled step): ATen ops dispatched (not nested in another op), kernel " \
               "launches, entries into compiled graphs\n\n| model | median step (s) | ATen ops | launches | compiled regions |" \
               "\n| --- | ---: | ---: | ---: | ---: |"
        for r in results:
            out += (f"\n| {r.name} | {r.median:.4f} | {r.ops['aten_ops']} | {r.ops['launches'] if device.type == 'cuda' else 'n/a'}"
                    f" | {r.ops['compiled_regions']} |")
    return out


def mask_sweep(args: argparse.Namespace, device: torch.device, clips: torch.Tensor, noise: torch.Tensor
               ) -> tuple[str, list[dict]]:
    """Our step at several mask ratios (timed in turn): measured speed-up against the FLOP ratio."""
    benches = []
    for ratio in (float(r) for r in args.mask_sweep.split(",")):
        sub = argparse.Namespace(**{**vars(args), "mask_ratio": ratio})
        bench = bench_ours(sub, device, clips, noise, args.compile_modes[0])
        bench.result.name = f"{ratio:.2f}"
        benches.append(bench)
    run_interleaved(benches, argparse.Namespace(**{**vars(args), "profile": False}), device)
    base = benches[0].result
    compiled = f", compile {args.compile_modes[0]}" if args.compile_modes[0] != "none" else ""
    lines = [f"\n## masking speed-up: {args.model}, {args.frames}x{args.img}x{args.img}, batch {args.batch}, "
             f"{args.dtype}, {device.type}{compiled}\n",
             "| mask ratio | median step (s) | speed-up vs first | FLOP ratio | speed-up / FLOP ratio |",
             "| --- | ---: | ---: | ---: | ---: |"]
    rows = []
    for b in benches:
        r = b.result
        speedup, flop_ratio = base.median / r.median, base.flops_analytic / r.flops_analytic
        lines.append(f"| {r.name} | {r.median:.3f} | {speedup:.2f}x | {flop_ratio:.2f}x | {speedup / flop_ratio:.2f} |")
        rows.append({"ratio": float(r.name), "median_s": r.median, "step_times": r.step_times, "speedup": speedup,
                     "flop_ratio": flop_ratio, "efficiency": speedup / flop_ratio, "flops_per_step": r.flops_analytic})
    return "\n".join(lines), rows


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's core count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def write_json(path: str, payload: dict) -> None:
    """Write --json output (atomically: a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print the table; returns the figures (--json, --results)."""
    args = parse_args(argv)
    info = common.job_info(args.device)
    if info.world_size > 1 and (args.peer != "none" or args.mask_sweep):
        raise SystemExit("--peer and --mask-sweep run in one process: start them without torchrun")
    if not info.is_main:  # the other ranks step in the same collectives, quietly
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            data = measure(args, info)
        cleanup()
        return data
    name = "bench_step-mask-sweep" if args.mask_sweep else "bench_step-hf" if args.peer == "hf" else "bench_step"
    with common.recording(args.results, name, __file__, argv, device=args.device) as rec:
        rec.data = measure(args, info)
    if args.json:
        write_json(args.json, rec.data)
    cleanup()
    return rec.data


def measure(args: argparse.Namespace, info: DistInfo | None = None) -> dict:
    """Time the steps the flags ask for and print the tables (as rank `info` of a torchrun job); returns every figure."""
    info = info or common.one_process(torch.device(args.device))
    device = info.device
    torch.manual_seed(args.seed)
    mm_peak = matmul_peak_gflops(device, args.mm_size) * 1e9

    clips = torch.randn(args.batch, 3, args.frames, args.img, args.img, device=device)
    with torch.device("meta"):
        L = create_model(args.model, num_frames=args.frames, img_size=args.img).patch_embed.num_patches
    noise = torch.rand(args.batch, L, device=device)
    payload = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda if
               device.type == "cuda" else None, "args": dict(vars(args)), "world_size": info.world_size}

    if args.mask_sweep:
        table, rows = mask_sweep(args, device, clips, noise)
        print(table)
        return {**payload, "mask_sweep": rows}
    benches = [bench_ours(args, device, clips, noise, mode, info) for mode in args.compile_modes]
    if args.peer == "hf":
        gc.collect()
        benches.append(bench_hf(args, device, clips, noise))
    run_interleaved(benches, args, device)
    results = [b.result for b in benches]
    mm_peak = max(mm_peak, matmul_peak_gflops(device, args.mm_size) * 1e9)
    peak, peak_source = mfu_peak(device, args.dtype, mm_peak)

    K = num_visible(L, args.mask_ratio)
    modes = ", ".join(args.compile_modes)
    print(f"\n## step benchmark: {args.model}, {args.frames}x{args.img}x{args.img}, batch {args.batch}, "
          f"mask {args.mask_ratio} ({K}/{L} tokens visible), {args.dtype}, {device.type}, {args.dist}"
          f"{f' on {info.world_size} ranks' if info.world_size > 1 else ''}"
          f"{f', HSDP shard groups of {args.hsdp_shard_size}' if args.hsdp_shard_size != '0' else ''}"
          f"{f', compile {modes}' if modes != 'none' else ''}{', grad-ckpt' if args.grad_ckpt else ''}")
    print(f"torch {torch.__version__}, {device_name(device)}, {torch.get_num_threads()} threads; MFU against "
          f"{peak / 1e12:.3f} TFLOP/s ({peak_source})\n")
    print(report(results, args, peak, device))
    print("\nSteps are timed in turn (A, B, A, B, ...). Peak memory is the process's (models built later include "
          "the earlier ones' resident memory); step mem = peak - memory before the warm-up steps (activations, "
          "grads, AdamW state).")
    print("FLOPs: analytic = 3 x forward matmul FLOPs (models/flops.py), used for TFLOP/s and MFU; the counter "
          "(torch.utils.flop_counter, eager models only) misses fused CPU flash attention.")
    for r in results:
        print(f"step times {r.name}: " + ", ".join(f"{t:.3f}" for t in r.step_times))
    for r in results:
        if r.profile:
            print(f"\n### profile: {r.name} (one step, top ops by self time)\n{r.profile}")
    return {**payload, "peak_flops": peak, "peak_source": peak_source, "tokens": L, "visible": K,
            "results": [result_dict(r, args, peak) for r in results]}


if __name__ == "__main__":
    main()
