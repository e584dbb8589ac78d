"""rho-BYOL, rho-MoCo and AMT on 2 gloo ranks (DDP, FSDP2, FSDP2 + activation checkpointing, ZeRO-2, ZeRO-3)
against one plain process on the global batch: the same losses, the same momentum encoder (updated shard-
locally from DTensor shards and ZeRO-3 partitions), the same BatchNorm statistics and MoCo queue; a
checkpoint saved and loaded through the backend replays the same losses.

This file is also the torchrun worker (`python -m torch.distributed.run ... tests/test_objectives_dist.py OUT`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import CLIP, LAYER_DECAY, lr_at, make_backend  # noqa: E402

RHO, VIDEOS = 2, 4  # global batch: 4 videos x 2 clips
MOMENTUM = 0.9  # far from 1, so that the momentum encoder visibly moves in 3 steps
SCENARIOS = {
    "byol:fsdp_ckpt": {"dist": "fsdp", "grad_ckpt": True}, "byol:zero3": {"dist": "deepspeed", "zero_stage": 3},
    "moco:ddp": {"dist": "ddp"}, "moco:zero2": {"dist": "deepspeed", "zero_stage": 2},  # FSDP2: test_objectives_pretrain
    "amt:fsdp_ckpt": {"dist": "fsdp", "grad_ckpt": True}, "amt:zero3": {"dist": "deepspeed", "zero_stage": 3},
}
STEPS, EXTRA = 3, 2  # steps compared with the reference; steps replayed after a save/load


def make(kind: str) -> torch.nn.Module:
    """A tiny model of the objective, the same initial weights in every process (BatchNorm over all ranks)."""
    from models import create_model
    from util.cross_rank import convert_batchnorm

    torch.manual_seed(0)
    if kind == "amt":
        return create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, depth=2, decoder_embed_dim=64,
                            decoder_depth=1, pred_t_dim=2, mask_type="amt", throw_ratio=0.3, amt_num_videos=8)
    return convert_batchnorm(create_model("rho_vit_micro_patch8", objective=kind, rho=RHO, img_size=32, num_frames=4,
                                          depth=2, proj_dim=16, proj_hidden_dim=32, pred_hidden_dim=32, queue_size=32))


def videos(first: int, count: int) -> dict[str, torch.Tensor]:
    """Clips [count * RHO, 3, 4, 32, 32] of global videos first.. (RHO consecutive clips each), their mask
    noise and AMT weights: functions of the video index only, whatever the rank layout."""
    clips, noise, weights = [], [], []
    for v in range(first, first + count):
        g = torch.Generator().manual_seed(2000 + v)
        clips.append(torch.randn(RHO, 3, 4, 32, 32, generator=g))
        noise.append(torch.rand(RHO, 32, generator=g))
        weights.append(torch.rand(RHO, 32, generator=g))
    return {k: torch.cat(x) for k, x in (("clips", clips), ("noise", noise), ("weights", weights))}


def forward(kind: str, module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, MoCo keys or None) of one batch."""
    if kind == "amt":
        return module(batch["clips"], 0.75, batch["noise"], attention=batch["weights"])[0], None
    loss, _, keys = module(batch["clips"])
    return loss, keys


def after_step(kind: str, model: torch.nn.Module, keys: torch.Tensor | None) -> None:
    """What the rho task does after each optimiser step: EMA on the local shards, enqueue every rank's keys."""
    from util.cross_rank import all_gather_cat, ema_update

    if kind == "amt":
        return
    ema_update(model.momentum_pairs(), MOMENTUM)
    if keys is not None:
        model.enqueue(all_gather_cat(keys))


def reference(kind: str) -> tuple[list[float], dict]:
    """One plain process on the global batch: losses of STEPS + EXTRA steps, state after STEPS."""
    from util.optim import build_adamw, param_groups

    model = make(kind)
    opt = build_adamw(param_groups(model, 0.05, LAYER_DECAY), 1e-3, torch.device("cpu"))
    losses, state = [], {}
    for s in range(STEPS + EXTRA):
        if s == STEPS:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(s) * g["lr_scale"]
        loss, keys = forward(kind, model, videos(s * VIDEOS, VIDEOS))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        after_step(kind, model, None if keys is None else keys.detach())
        losses.append(float(loss.detach()))
    return losses, state


def run(kind: str, flags: dict, info, out: Path) -> dict:
    """STEPS steps on this rank's share of each global batch, a save, EXTRA steps, a load, the EXTRA steps again."""
    from util import distributed as du
    from util.checkpoint import find_latest, load_checkpoint, save_checkpoint
    from util.cross_rank import all_gather_cat

    model = make(kind)
    per_rank = VIDEOS // info.world_size
    backend = make_backend(model, info, **flags, batch_size=per_rank * RHO)

    def steps(span: range) -> list[float]:
        losses = []
        for s in span:
            for g in backend.param_groups:
                g["lr"] = lr_at(s) * g["lr_scale"]
            with backend.microstep(True), backend.precision():
                loss, keys = forward(kind, backend.module, videos(s * VIDEOS + info.rank * per_rank, per_rank))
                backend.backward(loss)
            backend.step()
            after_step(kind, model, None if keys is None else keys.detach())
            losses.append(float(du.all_reduce_mean(loss.detach())))
        return losses

    result = {"losses": steps(range(STEPS))}
    state = backend.full_model_state_dict()  # collective: consolidated on rank 0
    if kind == "amt":  # the attention pass through the wrapped model equals the plain model's
        backend.module.eval()
        with torch.no_grad():
            clips = videos(info.rank * per_rank, per_rank)["clips"]
            result["attention"] = all_gather_cat(backend.module(clips, return_cls_attention=True)).tolist()
        backend.module.train()
    ckpt = out / kind / "_".join(f"{k}{v}" for k, v in flags.items())
    save_checkpoint(backend, ckpt, f"step-{STEPS}", {"global_step": STEPS, "epoch": 0, "step_in_epoch": STEPS})
    result["after_save"] = steps(range(STEPS, STEPS + EXTRA))
    load_checkpoint(backend, find_latest(ckpt))
    result["after_load"] = steps(range(STEPS, STEPS + EXTRA))
    if info.is_main:
        result["state"] = {k: v for k, v in state.items()}
    return result


def worker(out: Path, only: list[str]) -> None:
    """Every scenario (or those named) on this rank; rank 0 writes results.json and each consolidated state."""
    from util import distributed as du

    info = du.init_distributed()
    results: dict = {}
    for name, flags in SCENARIOS.items():
        if only and name not in only:
            continue
        res = run(name.split(":")[0], flags, info, out)
        if info.is_main:
            torch.save(res.pop("state"), out / f"{name.replace(':', '_')}.pt")
        results[name] = res
        du.barrier()
    if info.is_main:
        (out / "results.json").write_text(json.dumps(results))
    du.cleanup()


def test_objectives_on_two_ranks_match_one_process(tmp_path: Path) -> None:
    from dist_launch import torchrun

    torchrun(2, str(Path(__file__).resolve()), tmp_path, timeout=900)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(SCENARIOS)
    # The references run here, in a process without a process group (no collective can touch them).
    refs = {kind: reference(kind) for kind in {name.split(":")[0] for name in SCENARIOS}}
    for name, r in results.items():
        kind = name.split(":")[0]
        ref_losses, ref_state = refs[kind]
        close = lambda a, b: all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) for x, y in zip(a, b, strict=True))  # noqa: E731
        assert close(r["losses"], ref_losses[:STEPS]), (name, r["losses"], ref_losses)
        assert close(r["after_save"], ref_losses[STEPS:]), (name, r["after_save"], ref_losses)
        assert r["after_load"] == r["after_save"], name  # the checkpoint holds everything: an exact replay
        state = torch.load(tmp_path / f"{name.replace(':', '_')}.pt", weights_only=True)
        assert set(state) == set(ref_state), (name, sorted(set(state) ^ set(ref_state))[:5])
        initial = make(kind).state_dict()
        for key, want in ref_state.items():  # every parameter and buffer: momentum copies, queue, BN statistics
            got, want = state[key].float(), want.float()
            scale = 1.0 if key.endswith(("running_var", "running_mean")) else 0.0  # relative for BN statistics
            assert (got - want).abs().max() <= 3e-5 * (1 + scale * want.abs().max()), (name, key)
            if key.startswith(("momentum_", "queue")) and not torch.equal(want, initial[key].float()):
                assert not torch.equal(got, initial[key].float()), (name, key)  # momentum encoder and queue moved too
        if kind == "moco":
            assert int(state["queue_ptr"]) == STEPS * VIDEOS * RHO
        if kind == "amt":
            plain = make(kind)
            plain.load_state_dict(ref_state)
            with torch.no_grad():
                want = torch.cat([plain.eval()(videos(v, 1)["clips"], return_cls_attention=True)
                                  for v in range(VIDEOS)])
            torch.testing.assert_close(torch.tensor(r["attention"]), want, atol=1e-5, rtol=0)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
