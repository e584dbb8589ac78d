"""Masking ablation at toy scale: mask type x ratio -> linear-probe accuracy, step time; where AdaMAE
looks; what decoder masking saves on a ViT-B 16x224 step.

    python benchmarks/masking_ablation.py --quick          # ~20 min on 2 shared CPU cores
    python benchmarks/masking_ablation.py                  # longer runs, main_finetune.py --linprobe

1. Ablation (the toy counterpart of MAE-ST's mask-type / mask-ratio tables): on the generated motion
   videos (`datasets.ensure_synthetic_dataset`; the label is the motion, one frame says nothing), a
   micro MAE is pretrained for `--steps` steps per (mask type, ratio), then linearly probed on frozen
   features: in-script (`--probe features`: mean-pooled encoder tokens, standardised, L2 logistic
   regression, accuracy over val+test videos) or with the project's `main_finetune.py --linprobe`
   (`--probe linprobe`). Prints a table and writes `ablation.png`.
2. Where AdaMAE looks: on videos with one moving object on a static background (`single_object=True`,
   boxes in boxes.json; plain background by default, `--motion_background`), the share of visible tokens
   that touch the object, adaptive vs random. Alone: `--quick --where-only`.
3. ViT-B 16x224 train-step time (batch 1, fp32, 90% masking): random vs adaptive sampler, decoder
   masking 0 vs 0.5, interleaved in one run so machine load hits all variants alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets import ensure_synthetic_dataset, read_list_file  # noqa: E402
from models import create_model  # noqa: E402
from util.lr_sched import lr_at  # noqa: E402
from util.optim import build_adamw, param_groups  # noqa: E402

MASK_TYPES = ("random", "tube", "frame", "cube", "adaptive")
RATIOS = (0.75, 0.9, 0.95)
FRAMES, STRIDE, SIZE, PATCH = 8, 2, 64, 8  # clip of 8 frames every 2nd (16-frame span), 64 px
MEAN, STD = 0.45, 0.225


def load_split(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode every video of a split: uint8 [N, T, H, W, 3], labels [N], relative paths."""
    videos, labels, rels = [], [], []
    for path, label in read_list_file(f"{root}/{split}.csv", root):
        with av.open(path) as c:
            videos.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
        labels.append(label)
        rels.append(str(Path(path).relative_to(root)))
    return torch.from_numpy(np.stack(videos)), torch.tensor(labels), rels


def clips_at(videos: torch.Tensor, idx: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Normalised clips [B, 3, FRAMES, H, W] of videos `idx` from frame `starts` (no spatial augmentation:
    a flip would change the motion label)."""
    t = starts[:, None] + STRIDE * torch.arange(FRAMES)
    x = videos[idx[:, None], t].float().div_(255)  # [B, T, H, W, 3]
    return ((x - MEAN) / STD).permute(0, 4, 1, 2, 3).contiguous()


def make_mae(mask_type: str, decoder_mask_ratio: float = 0.0, norm_pix_loss: bool = True) -> torch.nn.Module:
    """The demo's micro MAE on 8 x 64 x 64 clips (4 x 8 x 8 = 256 tokens)."""
    torch.manual_seed(0)
    return create_model("mae_vit_micro_patch8", img_size=SIZE, num_frames=FRAMES, t_patch_size=2, pred_t_dim=4,
                        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, mask_type=mask_type,
                        decoder_mask_ratio=decoder_mask_ratio, norm_pix_loss=norm_pix_loss)


def pretrain(model: torch.nn.Module, videos: torch.Tensor, ratio: float, steps: int, batch: int,
             lr: float = 1.5e-3, seed: int = 0, sampler_lr_scale: float = 1.0) -> dict:
    """AdamW with warm-up + cosine; random clips and mask noise drawn from (seed, step). Returns stats.

    `sampler_lr_scale` multiplies the learning rate of the adaptive sampler's parameters only."""
    groups = []
    for g in param_groups(model, 0.05, None):
        for is_sampler in (False, True):
            sel = [i for i, n in enumerate(g["names"]) if n.startswith("adaptive_sampler.") == is_sampler]
            if sel:
                scale = g["lr_scale"] * (sampler_lr_scale if is_sampler else 1.0)
                groups.append({**g, "params": [g["params"][i] for i in sel], "names": [g["names"][i] for i in sel],
                               "lr_scale": scale})
    opt = build_adamw(groups, lr, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    times, losses, entropy = [], [], float("nan")
    span = videos.shape[1] - STRIDE * (FRAMES - 1)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step / steps, lr, 0.0, 0.1, 1.0) * g.get("lr_scale", 1.0)
        idx = torch.randint(len(videos), (batch,), generator=gen)
        clips = clips_at(videos, idx, torch.randint(span, (batch,), generator=gen))
        noise = torch.rand(batch, model.patch_embed.num_patches, generator=gen)
        t0 = time.perf_counter()
        loss = model(clips, ratio, noise)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if model.mask_type == "adaptive":
            entropy = float(model.sampler_metrics["sampler_entropy"])
    return {"step_ms": 1000 * statistics.median(times), "loss": statistics.mean(losses[-10:]), "entropy": entropy}


@torch.no_grad()
def features(model: torch.nn.Module, videos: torch.Tensor, views: int = 3) -> torch.Tensor:
    """Frozen encoder features [N, views, D]: mean of all output tokens (no masking) of evenly spaced clips."""
    model.eval()
    span = videos.shape[1] - STRIDE * (FRAMES - 1)
    out = []
    for v in range(views):
        start = round(v * (span - 1) / max(views - 1, 1))
        feats = []
        for chunk in torch.arange(len(videos)).split(32):
            latent = model.forward_encoder(clips_at(videos, chunk, torch.full((len(chunk),), start)), 0.0)[0]
            feats.append(latent[:, int(model.cls_embed):].mean(1))
        out.append(torch.cat(feats))
    return torch.stack(out, 1)


def probe_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int = 8, l2: float = 1e-3) -> float:
    """Linear probe: standardise, L2 logistic regression (LBFGS) on every train view; test by averaging views."""
    n, v, d = train_f.shape
    x = train_f.reshape(n * v, d)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, y = (x - mu) / sd, train_y.repeat_interleave(v)
    lin = torch.nn.Linear(d, num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = lin((test_f - mu) / sd).softmax(-1).mean(1)
    return 100.0 * float((logits.argmax(-1) == test_y).float().mean())


def linprobe_with_main_finetune(model: torch.nn.Module, data: str, out: Path, epochs: int) -> float:
    """The project's linear probe (`main_finetune.py --linprobe`) on the pretrained weights: top-1 on test."""
    import main_finetune
    from util.config import parse_args

    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, out / "pretrained.pth")
    argv = ["--linprobe", "--finetune", str(out / "pretrained.pth"), "--data_path", data, "--output_dir",
            str(out / "linprobe"), "--epochs", str(epochs), "--num_workers", "0", "--blr", "0.1", "--weight_decay",
            "0.0", "--smoothing", "0.0", "--input_size", str(SIZE), "--num_frames", str(FRAMES),
            "--sampling_rate", str(STRIDE), "--auto_resume", "--save_every", "0"]
    args = parse_args(main_finetune.get_args_parser(), argv, default_config=main_finetune.DEMO_CONFIG)
    return float(main_finetune.main(args)["eval"]["top1"])


def ablation(args: argparse.Namespace, out: Path) -> list[dict]:
    """Pretrain + probe every (mask type, ratio); returns table rows."""
    data = ensure_synthetic_dataset(num_videos=args.videos)
    train_v, train_y, _ = load_split(data, "train")
    evals = [load_split(data, s) for s in ("val", "test")]
    eval_v, eval_y = torch.cat([e[0] for e in evals]), torch.cat([e[1] for e in evals])
    print(f"data: {len(train_v)} train, {len(eval_v)} val+test videos from {data}", flush=True)
    rows = []
    for ratio in args.ratios:
        for mask_type in args.mask_types:
            model = make_mae(mask_type)
            stats = pretrain(model, train_v, ratio, args.steps, args.batch)
            if args.probe == "linprobe":
                acc = linprobe_with_main_finetune(model, data, out / f"{mask_type}_{ratio}", args.probe_epochs)
            else:
                acc = probe_accuracy(features(model, train_v), train_y, features(model, eval_v), eval_y)
            rows.append({"mask_type": mask_type, "ratio": ratio, "probe_top1": acc, **stats})
            print(f"  {mask_type:8s} {ratio:.2f}  probe {acc:5.1f}%  loss {stats['loss']:.3f}  "
                  f"step {stats['step_ms']:.0f} ms", flush=True)
    return rows


def token_box_overlap(boxes: list, starts: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[B, L] bool: token (t, h, w) of the clip from `starts[b]` overlaps the object's box in one of its frames."""
    t_grid, h_grid, w_grid = grid
    out = torch.zeros(len(starts), t_grid, h_grid, w_grid, dtype=torch.bool)
    for b, s in enumerate(starts.tolist()):
        for t in range(t_grid):
            for f in (2 * t, 2 * t + 1):  # the two frames of a 2-frame token
                x0, y0, x1, y1 = boxes[b][s + STRIDE * f][0]
                out[b, t, y0 // PATCH:(y1 - 1) // PATCH + 1, x0 // PATCH:(x1 - 1) // PATCH + 1] = True
    return out.flatten(1)


@torch.no_grad()
def visible_on_object(model: torch.nn.Module, videos: torch.Tensor, boxes: list, ratio: float, seed: int = 1) -> float:
    """Share of the visible tokens that touch the moving object, over 4 random clips per video."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    span = videos.shape[1] - STRIDE * (FRAMES - 1)
    hits = total = 0
    for _ in range(4):
        starts = torch.randint(span, (len(videos),), generator=gen)
        noise = torch.rand(len(videos), model.patch_embed.num_patches, generator=gen)
        mask = model(clips_at(videos, torch.arange(len(videos)), starts), ratio, noise)[2]
        on = token_box_overlap(boxes, starts, model.grid_size)
        hits += int((on & (mask == 0)).sum())
        total += int((mask == 0).sum())
    return hits / total


def motion_rates(args: argparse.Namespace) -> dict:
    """Pretrain adaptive and random on single-object videos; share of visible tokens on the object."""
    data = ensure_synthetic_dataset(num_videos=args.videos, single_object=True, background=args.motion_background)
    all_boxes = json.loads(Path(data, "boxes.json").read_text())
    train_v, _, _ = load_split(data, "train")
    eval_parts = [load_split(data, s) for s in ("val", "test")]
    eval_v = torch.cat([e[0] for e in eval_parts])
    eval_boxes = [all_boxes[r] for e in eval_parts for r in e[2]]
    out = {"object_token_share": float(token_box_overlap(eval_boxes, torch.zeros(len(eval_v), dtype=torch.long),
                                                        (4, SIZE // PATCH, SIZE // PATCH)).float().mean())}
    for mask_type in ("random", "adaptive"):
        model = make_mae(mask_type, norm_pix_loss=args.motion_norm_pix)
        stats = pretrain(model, train_v, args.motion_ratio, args.motion_steps, args.motion_batch or args.batch,
                         lr=args.motion_lr, sampler_lr_scale=args.motion_sampler_lr_scale)
        out[mask_type] = visible_on_object(model, eval_v, eval_boxes, args.motion_ratio)
        out[mask_type + "_entropy"] = stats["entropy"]
    out["ratio_adaptive_over_random"] = out["adaptive"] / max(out["random"], 1e-9)
    return out


def vitb_step_times(repeats: int) -> dict:
    """Median ViT-B 16x224 train-step seconds (batch 1, fp32, 90% masking) of each variant, interleaved."""
    variants = {"random, decoder_mask 0": ("random", 0.0), "random, decoder_mask 0.5": ("random", 0.5),
                "adaptive, decoder_mask 0": ("adaptive", 0.0), "adaptive, decoder_mask 0.5": ("adaptive", 0.5)}
    models = {}
    for name, (mt, dmr) in variants.items():
        torch.manual_seed(0)
        models[name] = create_model("mae_vit_base_patch16", num_frames=16, t_patch_size=2, pred_t_dim=8,
                                    mask_type=mt, decoder_mask_ratio=dmr).train()
    clips, noise = torch.randn(1, 3, 16, 224, 224), torch.rand(1, 1568)
    times: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(repeats + 1):  # the first round warms up allocators and kernels
        for name, model in models.items():
            t0 = time.perf_counter()
            model(clips, 0.9, noise)[0].backward()
            if r:
                times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    return {n: statistics.median(t) for n, t in times.items()}


def plot(rows: list[dict], path: Path) -> None:
    """Probe accuracy vs mask ratio, one line per mask type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for mt in dict.fromkeys(r["mask_type"] for r in rows):
        sel = [r for r in rows if r["mask_type"] == mt]
        axes[0].plot([r["ratio"] for r in sel], [r["probe_top1"] for r in sel], "o-", label=mt)
        axes[1].plot([r["ratio"] for r in sel], [r["step_ms"] for r in sel], "o-", label=mt)
    axes[0].set(xlabel="mask ratio", ylabel="linear probe top-1 (%)", title="probe accuracy (8 motion classes)")
    axes[1].set(xlabel="mask ratio", ylabel="ms / step", title="micro MAE step time (CPU)")
    axes[0].axhline(100 / 8, color="gray", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Run the three parts and print their tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (~20 min on 2 shared CPU cores)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps per run (120; quick 40)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--videos", type=int, default=96, help="generated videos (70%% train, 30%% probe test)")
    p.add_argument("--mask_types", nargs="+", default=list(MASK_TYPES), choices=MASK_TYPES)
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--probe", choices=["features", "linprobe"], default=None,
                   help="in-script probe on frozen features, or main_finetune.py --linprobe (default unless --quick)")
    p.add_argument("--probe_epochs", type=int, default=10, help="epochs of main_finetune.py --linprobe")
    p.add_argument("--motion_steps", type=int, default=None, help="pretraining steps for the where-it-looks test")
    p.add_argument("--motion_ratio", type=float, default=0.9)
    # Raw pixels by default here: at a few hundred steps the per-patch normalised error is still flat
    # (object ~ background), so the reward carries no signal yet; raw-pixel error separates them early.
    p.add_argument("--motion_norm_pix", action=argparse.BooleanOptionalAction, default=False)
    # A plain static background: its raw-pixel error falls far below the object's within the short run,
    # which is what the policy gradient (probability ~ error at equilibrium) needs to concentrate. With
    # the textured one the object/background error ratio stays ~2.6x at 150 steps (measured 1.6x rate).
    p.add_argument("--motion_background", choices=["texture", "smooth", "plain"], default="plain",
                   help="static background of the single-object videos (datasets.synthetic backgrounds)")
    p.add_argument("--motion_lr", type=float, default=1.5e-3)
    p.add_argument("--motion_batch", type=int, default=None, help="batch of the where-it-looks runs (--batch)")
    p.add_argument("--motion_sampler_lr_scale", type=float, default=1.0,
                   help="learning-rate multiplier of the adaptive sampler's parameters in the where-it-looks runs")
    p.add_argument("--where-only", dest="where_only", action="store_true",
                   help="run only part 2 (where the encoder looks)")
    p.add_argument("--vitb_repeats", type=int, default=3, help="timed ViT-B steps per variant (0: skip)")
    p.add_argument("--skip", nargs="*", default=[], choices=["ablation", "motion", "vitb"])
    p.add_argument("--out", default="runs/masking_ablation")
    args = p.parse_args()
    if args.where_only:
        args.skip = sorted(set(args.skip) | {"ablation", "vitb"})
    args.steps = args.steps or (40 if args.quick else 120)
    args.motion_steps = args.motion_steps or (150 if args.quick else 300)
    args.probe = args.probe or ("features" if args.quick else "linprobe")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict = {"args": vars(args)}
    t0 = time.time()

    if "ablation" not in args.skip:
        print(f"== ablation: {args.steps} pretraining steps x batch {args.batch}, probe: {args.probe}", flush=True)
        rows = results["ablation"] = ablation(args, out)
        print("\n| mask type | " + " | ".join(f"{r:.2f}" for r in args.ratios) + " | ms/step at " +
              " / ".join(f"{r:.2f}" for r in args.ratios) + " |")
        print("|---|" + "---|" * (len(args.ratios) + 1))
        for mt in args.mask_types:
            sel = {r["ratio"]: r for r in rows if r["mask_type"] == mt}
            print(f"| {mt} | " + " | ".join(f"{sel[r]['probe_top1']:.1f}" for r in args.ratios) + " | " +
                  " / ".join(f"{sel[r]['step_ms']:.0f}" for r in args.ratios) + " |")
        plot(rows, out / "ablation.png")
        print(f"plot: {out / 'ablation.png'}  (chance: 12.5%)", flush=True)

    if "motion" not in args.skip:
        print(f"\n== where the encoder looks: one moving object, {args.motion_steps} steps at {args.motion_ratio}",
              flush=True)
        m = results["motion"] = motion_rates(args)
        print(f"tokens touching the object: {m['object_token_share']:.1%} of all")
        print(f"visible tokens on the object: random {m['random']:.1%}, adaptive {m['adaptive']:.1%} "
              f"({m['ratio_adaptive_over_random']:.2f}x; sampler entropy {m['adaptive_entropy']:.2f} nats, "
              f"uniform {np.log(256):.2f})", flush=True)

    if "vitb" not in args.skip and args.vitb_repeats:
        print("\n== ViT-B 16x224 train step (batch 1, fp32, mask 0.9), interleaved", flush=True)
        v = results["vitb_step_s"] = vitb_step_times(args.vitb_repeats)
        base = v["random, decoder_mask 0"]
        for name, s in v.items():
            print(f"  {name:28s} {s:6.2f} s  ({base / s:.2f}x of random, decoder_mask 0)")
    results["minutes"] = (time.time() - t0) / 60
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\ndone in {results['minutes']:.1f} min; {out / 'results.json'}")


if __name__ == "__main__":
    main()
