"""AdaMAE on 2 gloo ranks (FSDP2, FSDP2 + activation checkpointing, ZeRO-2) against one plain process.

The sampler's `Block` is wrapped from outside like every other block; the per-sample mask noise makes
the Gumbel draw independent of the rank layout, so the 2-rank losses equal the 1-process ones.
This file is also the torchrun worker (`python -m torch.distributed.run ... tests/test_adamae_dist.py OUT`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (  # noqa: E402,E501
    CLIP,
    GLOBAL_BATCH,
    LAYER_DECAY,
    MASK_RATIO,
    batch,
    lr_at,
    make_backend,
    micro_indices,
)

SCENARIOS = {"fsdp": {"dist": "fsdp"}, "fsdp_ckpt": {"dist": "fsdp", "grad_ckpt": True},
             "zero2": {"dist": "deepspeed", "zero_stage": 2}}
STEPS = 3


def make_adaptive() -> torch.nn.Module:
    """The tiny MAE with the adaptive sampler, same initial weights everywhere. The detached variant: the
    published sampler's dropout draws differ between one process and two ranks, so losses could not match;
    rotating_hidden decoder masking: v2's run_cell normalises the loss by each rank's own count of decoded
    hidden tokens, which varies per sample (as in VideoMAE v2), so its rank means are not the global mean."""
    from models import create_model

    torch.manual_seed(0)
    return create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, t_patch_size=2, depth=2,
                        decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, mask_type="adaptive_detached",
                        decoder_mask_ratio=0.5, decoder_mask_type="rotating_hidden")


def micro_step_with_metrics(backend, clips: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """common.micro_step, keeping the model's aux metrics (the sampler's entropy) for the comparison."""
    with backend.microstep(True):
        with backend.precision():
            loss, _, _, aux = backend.module(clips, MASK_RATIO, noise, return_aux=True)
        backend.backward(loss)
    return loss, aux["metrics"]


def reference() -> tuple[list[float], list[float]]:
    """Plain single process on the global batch: (losses, sampler entropies)."""
    from util.optim import build_adamw, param_groups

    model = make_adaptive()
    opt = build_adamw(param_groups(model, 0.05, LAYER_DECAY), 1e-3, torch.device("cpu"))
    losses, entropies = [], []
    for s in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(s) * g["lr_scale"]
        clips, noise = batch(list(range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)))
        loss, _, _, aux = model(clips, MASK_RATIO, noise, return_aux=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
        entropies.append(float(aux["metrics"]["sampler_entropy"]))
    return losses, entropies


def worker(out: Path) -> None:
    """Run every scenario on this rank; rank 0 writes results.json."""
    from util import distributed as du

    info = du.init_distributed()
    results: dict = {"reference": reference()}
    for name, flags in SCENARIOS.items():
        model = make_adaptive()
        backend = make_backend(model, info, **flags, batch_size=GLOBAL_BATCH // info.world_size)
        losses, entropies = [], []
        for s in range(STEPS):
            for g in backend.param_groups:
                g["lr"] = lr_at(s) * g["lr_scale"]
            clips, noise = batch(micro_indices(s, info.rank, info.world_size, 1, 0))
            loss, metrics = micro_step_with_metrics(backend, clips, noise)
            backend.step()
            losses.append(float(du.all_reduce_mean(loss.detach())))
            entropies.append(float(du.all_reduce_mean(metrics["sampler_entropy"])))
        head = backend.full_model_state_dict().get("adaptive_sampler.head.weight")
        results[name] = {"losses": losses, "entropies": entropies,
                         "head_moved": None if head is None else float(head.abs().max())}
        du.barrier()
    if info.is_main:
        (out / "results.json").write_text(json.dumps(results))
    du.cleanup()


def test_adaptive_sampler_two_ranks_match_one_process(tmp_path: Path) -> None:
    from dist_launch import torchrun

    torchrun(2, str(Path(__file__).resolve()), tmp_path, timeout=600)
    res = json.loads((tmp_path / "results.json").read_text())
    ref_losses, ref_entropies = res["reference"]
    for name in SCENARIOS:
        r = res[name]
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(r["losses"], ref_losses, strict=True)), (name, r)
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(r["entropies"], ref_entropies, strict=True))
        assert r["head_moved"] > 0, (name, r)  # the sampler trains (its head starts at zero)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
