"""torchrun worker: the video-text loss over the global batch, on every backend, against one plain process.

usage: torchrun --nproc_per_node N tests/dist/videotext_worker.py OUT_DIR SCENARIO [SCENARIO ...]
A scenario is `<backend>[:smaug]`, backend in ddp, fsdp, zero1, zero2, zero3; `smaug` adds the MAE decoder
loss and token sparsification. Every rank also computes the reference (one plain model on the whole
global batch) itself; rank 0 writes results.json. Assertions live in tests/test_videotext_dist.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CLIP, make_backend  # noqa: E402

from models.videotext import videotext_loss, videotext_model  # noqa: E402
from util import distributed as du  # noqa: E402
from util.gather import RankGather  # noqa: E402
from util.optim import build_adamw, param_groups  # noqa: E402

GLOBAL_BATCH, STEPS, LR, MASK, CTX, VOCAB = 8, 2, 2e-3, 0.5, 8, 40
MAE_WEIGHT = 0.5


def make_model(smaug: bool) -> torch.nn.Module:
    """A tiny dual encoder, the same initial weights in every process."""
    torch.manual_seed(0)
    return videotext_model("mae_vit_micro_patch8", VOCAB, context_length=CTX, text_width=32, text_depth=1,
                           text_heads=2, embed_dim=16, mae_decoder=smaug, sparsify_keep=0.5 if smaug else 1.0,
                           sparsify_layer=1, img_size=32, num_frames=4, t_patch_size=2, depth=2, pred_t_dim=2,
                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def sample(idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip, mask noise and caption ids of global sample idx (independent of the rank layout)."""
    g = torch.Generator().manual_seed(500 + idx)
    ids = torch.randint(4, VOCAB, (CTX,), generator=g)
    n = int(torch.randint(2, CTX - 1, (1,), generator=g))
    ids[0], ids[n] = 1, 2  # [SOT] ... [EOT] then padding
    ids[n + 1:] = 0
    return torch.randn(3, 4, 32, 32, generator=g), torch.rand(32, generator=g), ids


def batch(indices: list[int]) -> tuple[torch.Tensor, ...]:
    """Stacked clips, noise and ids of these samples."""
    return tuple(torch.stack(x) for x in zip(*(sample(i) for i in indices), strict=True))


def loss_of(module: torch.nn.Module, clips, noise, ids, cross, smaug: bool) -> torch.Tensor:
    """What VideoTextTask.loss computes."""
    return videotext_loss(module(clips, ids, MASK, noise), cross, MAE_WEIGHT if smaug else 0.0)[0]


def reference(smaug: bool) -> tuple[list[float], dict]:
    """One plain process, the whole global batch per step: losses and the first step's gradients."""
    model = make_model(smaug)
    opt = build_adamw(param_groups(model, 0.05), LR, torch.device("cpu"))
    losses, first_grads = [], {}
    for s in range(STEPS):
        clips, noise, ids = batch(list(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)))
        loss = loss_of(model, clips, noise, ids, None, smaug)
        loss.backward()
        if s == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, first_grads


def run(info: du.DistInfo, scenario: str) -> dict:
    """STEPS optimiser steps on this rank's slice of each global batch; global losses and weight differences."""
    name, *opts = scenario.split(":")
    smaug = "smaug" in opts
    flags = {"dist": name} if name in ("ddp", "fsdp") else {"dist": "deepspeed", "zero_stage": int(name[-1])}
    per_rank = GLOBAL_BATCH // info.world_size
    backend = make_backend(make_model(smaug), info, lr=LR, batch_size=per_rank, layer_decay=1.0, **flags)
    losses, grads = [], {}
    for s in range(STEPS):
        start = s * GLOBAL_BATCH + info.rank * per_rank
        clips, noise, ids = batch(list(range(start, start + per_rank)))
        with backend.microstep(True):
            with backend.precision():
                loss = loss_of(backend.module, clips, noise, ids, RankGather(), smaug)
            backend.backward(loss)
        if s == 0:
            grads = full_grads(backend)
        backend.step()
        # The loss value is already the global one on every rank: no averaging here.
        losses.append(float(loss.detach()))
        all_losses = du.all_gather_object(losses[-1])
        if max(all_losses) - min(all_losses) > 1e-6:
            raise AssertionError(f"ranks logged different losses: {all_losses}")
    ref_losses, ref_grads = reference(smaug)
    # Gradients, not weights, are compared: AdamW turns float noise on a zero gradient (e.g. the
    # key bias, to which softmax is blind) into a full lr-sized step.
    diffs = {k: float((grads[k] - g).abs().max()) for k, g in ref_grads.items() if k in grads}
    return {"losses": losses, "ref_losses": ref_losses, "max_abs_grad_diff": max(diffs.values()),
            "worst": max(diffs, key=diffs.get), "max_abs_grad": max(float(g.abs().max()) for g in ref_grads.values()),
            "missing": sorted(set(ref_grads) - set(grads))}


def full_grads(backend) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient by plain name after a backward (gathered for FSDP2 and ZeRO)."""
    from util.optim import clean_name

    out = {}
    if backend.name == "deepspeed":
        from deepspeed.utils import safe_get_full_grad

        for n, p in backend.engine.module.named_parameters():
            out[clean_name(n)] = safe_get_full_grad(p).detach().float().clone()
        return out
    for n, p in backend.module.named_parameters():
        g = p.grad
        out[clean_name(n)] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().float().clone()
    return out


def main() -> None:
    out, scenarios = Path(sys.argv[1]), sys.argv[2:]
    info = du.init_distributed()
    results = {"world_size": info.world_size}
    for sc in scenarios:
        results[sc] = run(info, sc)
        du.barrier()
    if info.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    du.cleanup()


if __name__ == "__main__":
    main()
