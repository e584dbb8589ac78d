"""torchrun worker: runs many backend scenarios in one process group, writes results.json on rank 0.

usage: torchrun --nproc_per_node N tests/dist/worker.py OUT_DIR SCENARIO [SCENARIO ...]
A scenario is `<backend>[:accum=K][:ckpt][:compile=blocks|model][:hsdp=N|node]`, backend in ddp, fsdp, zero1, zero2, zero3, or one of the
special ones below. Assertions live in the pytest side; this file only measures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    batch,
    lr_at,
    make_backend,
    make_model,
    micro_indices,
    micro_step,
    reference_run,
)

from util import distributed as du  # noqa: E402
from util.checkpoint import find_latest, load_checkpoint, save_checkpoint  # noqa: E402


def parse(scenario: str) -> tuple[dict, dict]:
    """'zero3:accum=2:ckpt' -> (setup_parallel flags, options)."""
    name, *opts = scenario.split(":")
    flags: dict = {"dist": name} if name in ("ddp", "fsdp") else {"dist": "deepspeed", "zero_stage": int(name[-1])}
    extra: dict = {}
    for o in opts:
        k, _, v = o.partition("=")
        if k == "accum":
            flags["accum_iter"] = int(v)
        elif k == "ckpt":
            flags["grad_ckpt"] = True
        elif k == "noclip":
            flags["clip_grad"] = 0.0
        elif k in ("bf16", "fp16"):
            flags["precision"] = k
        elif k == "compile":
            flags["compile"] = v
        elif k == "hsdp":
            flags["hsdp_shard_size"] = v if v == "node" else int(v)
        else:
            extra[k] = v
    return flags, extra


def build(info: du.DistInfo, flags: dict):
    """A fresh tiny model wrapped by the scenario's backend."""
    accum = flags.get("accum_iter", 1)
    return make_backend(make_model(), info, **flags, batch_size=4 // info.world_size // accum), accum


def train_steps(backend, info: du.DistInfo, accum: int, steps: range) -> tuple[list[float], list[float]]:
    """Run optimizer steps; returns the global mean loss and grad norm of each."""
    losses, norms = [], []
    for s in steps:
        for g in backend.param_groups:
            g["lr"] = lr_at(s) * g["lr_scale"]
        total = torch.zeros(())
        for m in range(accum):
            clips, noise = batch(micro_indices(s, info.rank, info.world_size, accum, m))
            loss = micro_step(backend, clips, noise, is_last=m == accum - 1)
            total += loss.detach().float() / accum
        norm = backend.step()
        losses.append(float(du.all_reduce_mean(total)))
        norms.append(float(norm) if norm is not None else float("nan"))
    return losses, norms


def diffs(sd: dict, ref: dict) -> dict:
    """Max |a - b| over all entries, and max |a - b| / |b| over entries with |b| > 1e-2; keys must match."""
    if set(sd) != set(ref):
        raise AssertionError(f"key mismatch: {sorted(set(sd) ^ set(ref))[:5]}")
    abs_d, rel_d = 0.0, 0.0
    for k in ref:
        a, b = sd[k].float(), ref[k].float()
        d = (a - b).abs()
        abs_d = max(abs_d, float(d.max()))
        big = b.abs() > 1e-2
        if big.any():
            rel_d = max(rel_d, float((d[big] / b[big].abs()).max()))
    return {"max_abs": abs_d, "max_rel": rel_d}


def run_parity_and_resume(info, scenario: str, out: Path, ref: tuple) -> dict:
    """N steps vs the plain reference, then save at step 3, run 2 more, load, rerun the 2: same losses."""
    flags, _ = parse(scenario)
    backend, accum = build(info, flags)
    ref_losses, ref_sd, ref_norms = ref
    losses, norms = train_steps(backend, info, accum, range(3))
    sd = backend.full_model_state_dict()
    res = {"losses": losses, "ref_losses": ref_losses[:3], "norms": norms, "ref_norms": ref_norms[:3]}
    if info.is_main:
        res["params"] = diffs(sd, ref_sd)
    if getattr(backend, "mesh", None) is not None:  # FSDP2: the mesh and how a weight is laid out on it
        p = max(backend.module.parameters(), key=lambda t: t.numel())  # the largest weight
        res["mesh"] = {"shape": list(backend.mesh.shape), "names": list(backend.mesh.mesh_dim_names or ()),
                       "placements": [repr(x) for x in p.placements], "local_numel": p.to_local().numel(),
                       "numel": p.numel()}
    ckpt_out = out / scenario.replace(":", "_")
    if info.is_main:  # what full_model_state_dict gives, to compare with the offline export
        ckpt_out.mkdir(parents=True, exist_ok=True)
        torch.save(sd, ckpt_out / "full_state_step3.pt")
    save_checkpoint(backend, ckpt_out, "step-3", {"global_step": 3, "epoch": 0, "step_in_epoch": 3})
    res["after_save"], _ = train_steps(backend, info, accum, range(3, 5))
    load_checkpoint(backend, find_latest(ckpt_out))
    res["after_load"], _ = train_steps(backend, info, accum, range(3, 5))
    res["ref_after"] = ref_losses[3:5]
    return res


def grads_of(backend) -> dict:
    """Full gradients by plain name after a backward (gathered for DeepSpeed ZeRO-3)."""
    from util.optim import clean_name

    out = {}
    if backend.name == "deepspeed":
        from deepspeed.utils import safe_get_full_grad

        for n, p in backend.engine.module.named_parameters():
            out[clean_name(n)] = safe_get_full_grad(p).detach().clone()
    else:
        for n, p in backend.module.named_parameters():
            g = p.grad
            out[clean_name(n)] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def run_ckpt_equivalence(info, scenario: str) -> dict:
    """One forward/backward with and without activation checkpointing: loss and every gradient."""
    got = {}
    for ckpt in (False, True):
        flags, _ = parse(scenario)
        flags["grad_ckpt"] = ckpt
        backend, _ = build(info, flags)
        clips, noise = batch(micro_indices(0, info.rank, info.world_size, 1, 0))
        loss = micro_step(backend, clips, noise)
        got[ckpt] = (float(du.all_reduce_mean(loss.detach())), grads_of(backend))
        backend.step()
    (l0, g0), (l1, g1) = got[False], got[True]
    return {"loss": l0, "loss_ckpt": l1, "grads": diffs(g1, g0), "num_grads": len(g0)}


def run_short_accumulation(info, scenario: str) -> dict:
    """accum_iter=2 configured but the caller ends every step after 1 micro-step (e.g. an epoch tail):
    gradients must still be averaged over ranks, so the replicas stay identical."""
    flags, _ = parse(scenario)
    flags["accum_iter"] = 2
    backend, _ = build(info, flags)
    for s in range(2):
        clips, noise = batch(micro_indices(s, info.rank, info.world_size, 1, 0))
        micro_step(backend, clips, noise, is_last=True)
        backend.step()
    flat = torch.cat([p.detach().reshape(-1) for p in backend.unwrapped.parameters()])
    rank0 = flat.clone()
    torch.distributed.broadcast(rank0, src=0)
    return {"max_abs_diff_to_rank0": float((flat - rank0).abs().max())}


def main() -> None:
    out, scenarios = Path(sys.argv[1]), sys.argv[2:]
    info = du.init_distributed()
    ref = reference_run(5)
    results: dict = {"world_size": info.world_size}
    for sc in scenarios:
        if sc.startswith("ckpt_equiv="):
            results[sc] = run_ckpt_equivalence(info, sc.split("=", 1)[1])
        elif sc.startswith("short_accum="):
            results[sc] = run_short_accumulation(info, sc.split("=", 1)[1])
        elif sc.startswith("resume_from="):
            # Continue a checkpoint written by another world size (FSDP2: DCP reshards on load).
            _, _, rest = sc.partition("=")
            src, scenario = rest.split(",")
            flags, _ = parse(scenario)
            backend, accum = build(info, flags)
            state = load_checkpoint(backend, find_latest(src))
            results[sc] = {"losses": train_steps(backend, info, accum, range(3, 5))[0],
                           "global_step": state["global_step"], "saved_world": state["world_size"]}
        else:
            results[sc] = run_parity_and_resume(info, sc, out, ref)
        du.barrier()
    if info.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    du.cleanup()


if __name__ == "__main__":
    main()
