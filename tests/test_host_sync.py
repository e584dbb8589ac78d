"""The training step never makes the host wait for the device, nor copies host data to it, except on log and
save steps (issue 13): checked on the CPU by listing every op that would do so on a GPU (tests/host_sync.py).

First the step itself (`util.engine.train_step` through the real backends, every mask sampler, decoder
masking, accumulation, each precision), then the whole run loop of `main_pretrain.py`, where reads are
allowed only in the log and save code (NaN check, metric means, the logger, checkpoints) and on the data
side (the loader builds host tensors by design; they reach the device with a non-blocking copy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
sys.path.insert(0, str(ROOT / "tests"))
from common import batch, make_backend  # noqa: E402
from host_sync import HostSyncAudit  # noqa: E402

from models import create_model  # noqa: E402
from util.distributed import DistInfo  # noqa: E402
from util.engine import train_step  # noqa: E402

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine run ~20x slower with two spinning threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw) -> torch.nn.Module:
    """The tests' micro MAE with model options."""
    torch.manual_seed(0)
    return create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, t_patch_size=2, depth=2,
                        decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, **kw)


def audited_steps(backend, accum: int = 1, mask_ratio: float = 0.75, n: int = 2) -> list:
    """Events of `n` audited train_steps, after one unaudited step (the optimizer state exists then)."""
    clips, noise = batch([0, 1, 2, 3])
    micro = [{"clips": clips[i::accum], "noise": noise[i::accum]} for i in range(accum)]

    def loss_fn(module, b):
        return module(b["clips"], mask_ratio, b["noise"])[0]

    train_step(backend, micro, loss_fn, accum)
    with HostSyncAudit() as audit:
        for _ in range(n):
            loss, norm, _, _ = train_step(backend, micro, loss_fn, accum)
    assert torch.isfinite(loss) and torch.isfinite(norm)  # (outside the audit: reading them is the log step's job)
    return audit.events


@pytest.mark.parametrize("model_kw", [
    {}, {"mask_type": "tube"}, {"mask_type": "frame"}, {"mask_type": "cube"}, {"mask_type": "adaptive"},
    {"decoder_mask_ratio": 0.5}, {"target_frames": "linspace"}, {"sep_pos_embed": False, "cls_embed": False},
    {"mask_type": "amt", "throw_ratio": 0.25},
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_train_step_never_syncs_for_any_model_option(model_kw: dict) -> None:
    """DDP backend (one process), bf16 autocast, clipping on: no op of the step reads or copies host data."""
    backend = make_backend(tiny(**model_kw), CPU, precision="bf16")
    events = audited_steps(backend)
    assert not events, "\n".join(f"{e.op}: {e.frames()}" for e in events)


@pytest.mark.parametrize("dist, precision, accum, grad_ckpt", [
    ("ddp", "fp32", 2, False), ("ddp", "fp16", 1, False), ("ddp", "bf16", 1, True),
    ("fsdp", "bf16", 1, False), ("fsdp", "fp32", 2, True),
])
def test_train_step_never_syncs_on_each_backend(dist: str, precision: str, accum: int, grad_ckpt: bool) -> None:
    """DDP (fp16 loss scaling included: the fused AdamW takes the scaler's inf check on the device) and FSDP2."""
    backend = make_backend(tiny(), CPU, dist=dist, precision=precision, accum_iter=accum, grad_ckpt=grad_ckpt)
    events = audited_steps(backend, accum=accum)
    assert not events, "\n".join(f"{e.op}: {e.frames()}" for e in events)


def test_amt_step_with_its_attention_table_never_syncs() -> None:
    """AMT as PretrainTask.loss runs it: each clip's weights read from the uint8 per-video table through
    the clip's geometry (an integer gather and grid_sample on the device), then masking and throwing."""
    from models.amt import clip_attention_weights

    model = tiny(mask_type="amt", throw_ratio=0.25, amt_num_videos=6)
    model.amt_attention.copy_(torch.randint(0, 256, model.amt_attention.shape, generator=torch.Generator().manual_seed(0)))
    backend = make_backend(model, CPU, precision="bf16")
    clips, noise = batch([0, 1, 2, 3])
    index = torch.tensor([5, 0, 3, 3])
    # (start s, duration s, crop top, left, height, width, flip): models.amt.GEOMETRY_FIELDS
    geometry = torch.tensor([[0.5, 4.0, 0.1, 0.2, 0.8, 0.7, 1.0], [0.0, 2.0, 0.0, 0.0, 1.0, 1.0, 0.0],
                             [3.0, 9.5, 0.3, 0.1, 0.5, 0.6, 0.0], [1.0, 9.5, 0.0, 0.4, 0.6, 0.6, 1.0]])

    def loss_fn(module, b):
        attention = clip_attention_weights(model.amt_attention[b["index"]].float() / 255, b["geometry"],
                                           model.grid_size, model.patch_embed.t_patch_size, 0.25, model.num_frames)
        loss, _, _, aux = module(b["clips"], 0.75, b["noise"], attention=attention, return_aux=True)
        thrown.append(aux["thrown"])
        return loss

    thrown = []
    micro = [{"clips": clips, "noise": noise, "index": index, "geometry": geometry}]
    train_step(backend, micro, loss_fn, 1)
    with HostSyncAudit() as audit:
        train_step(backend, micro, loss_fn, 1)
    assert not audit.events, "\n".join(f"{e.op}: {e.frames()}" for e in audit.events)
    assert thrown[-1].sum() > 0  # the step threw tokens: the audited path is AMT's


@pytest.mark.parametrize("objective", ["byol", "moco"])
def test_rho_step_and_its_after_step_never_sync(objective: str) -> None:
    """rho-BYOL / rho-MoCo: the step (momentum forward, BatchNorm heads, MoCo's queue) and what
    RhoTask.after_step runs after it (the EMA of the momentum copies, MoCo's enqueue) stay on the device."""
    from util.cross_rank import all_gather_cat, convert_batchnorm, ema_update

    torch.manual_seed(0)
    model = convert_batchnorm(create_model("rho_vit_micro_patch8", objective=objective, rho=2, img_size=32,
                                           num_frames=4, depth=2, proj_dim=16, proj_hidden_dim=32,
                                           pred_hidden_dim=32, queue_size=24))
    backend = make_backend(model, CPU, precision="bf16")
    clips, _ = batch([0, 1, 2, 3])
    keys: list[torch.Tensor] = []

    def loss_fn(module, b):
        loss, metrics, k = module(b["clips"])
        if k is not None:
            keys.append(k.detach())
        return loss, metrics

    def after_step() -> None:
        ema_update(model.momentum_pairs(), 0.99)
        if keys:
            model.enqueue(all_gather_cat(torch.cat(keys)))
            keys.clear()

    train_step(backend, [{"clips": clips}], loss_fn, 1)
    after_step()
    ptr = model.queue_ptr.clone() if objective == "moco" else None
    with HostSyncAudit() as audit:
        loss, _, metrics, _ = train_step(backend, [{"clips": clips}], loss_fn, 1)
        after_step()
    assert not audit.events, "\n".join(f"{e.op}: {e.frames()}" for e in audit.events)
    assert torch.isfinite(loss) and metrics
    if ptr is not None:
        assert not torch.equal(model.queue_ptr, ptr)  # the audited after_step enqueued


def test_audit_sees_what_a_gpu_would_wait_for() -> None:
    """The audit itself: .item(), torch.tensor(list) and a data-dependent shape are each listed with our line."""
    x = torch.arange(6.0)
    with HostSyncAudit() as audit:
        x.sum().item()
        torch.tensor([1, 2])
        x[x > 2].sum()
        x.nonzero()
        x[torch.arange(2)].sum()  # an integer index: the device can gather on its own
    assert [e.op.split(".")[0] for e in audit.events] == ["_local_scalar_dense", "lift_fresh", "index", "nonzero"]


# The log and save code, where the loop may read values (it is what logging means).
LOG_AND_SAVE = {("util/engine.py", "check"), ("util/engine.py", "means"), ("util/engine.py", "first_bad_step"),
                ("util/trainer.py", "save"), ("util/logger.py", "log")}


def test_training_loop_syncs_only_on_log_and_save_steps(tmp_path: Path) -> None:
    """main_pretrain.py, 6 steps, a log every 3 and a save every 3: every read is in log/save or data code."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "dist" / "sync_audit_worker.py"), str(out),
                           "--synthetic_videos", "24", "--input_size", "32", "--num_frames", "4", "--pred_t_dim", "2",
                           "--repeat_aug", "1", "--batch_size", "2", "--num_workers", "0", "--decoder_embed_dim", "64",
                           "--decoder_depth", "1", "--precision", "bf16", "--epochs", "1", "--max_steps", "6",
                           "--log_every", "3", "--save_every", "3", "--vis_every", "0", "--warmup_epochs", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = json.loads((out / "sync_events.json").read_text())
    in_loop = [e for e in events if any(fn == "_train_epoch" for _, _, fn in e["stack"])]
    data_side = [e for e in in_loop if e["data_side"]]
    logging = [e for e in in_loop if any((f, fn) in LOG_AND_SAVE for f, _, fn in e["stack"])]
    bad = [e for e in in_loop if e not in data_side and e not in logging]
    assert not bad, "\n".join(f"{e['op']}: " + " <- ".join(f"{f}:{n} {fn}" for f, n, fn in reversed(e["stack"]))
                              for e in bad[:10])
    # The audit saw the loop: the log steps read their values (2 logs, 2 saves), the data side built its tensors.
    assert len(logging) >= 4 and data_side
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [3, 6]


def test_fused_adamw_on_cpu_matches_the_foreach_update() -> None:
    """util.optim builds a fused AdamW on the CPU too (no per-parameter host read of the step count);
    given the same gradients it makes the same updates as the foreach implementation."""
    from util.optim import build_adamw, param_groups

    models = [tiny(), tiny()]
    fused = build_adamw(param_groups(models[0], 0.05), 1e-3, torch.device("cpu"))
    assert fused.defaults["fused"] is True
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(models[1], 0.05)]
    foreach = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), foreach=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        foreach.step()
    moved = 0.0
    for a, b, c in zip(models[0].parameters(), models[1].parameters(), tiny().parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        moved = max(moved, float((a - c).abs().max()))
    assert moved > 1e-3  # 3 steps of lr 1e-3 moved the weights: the comparison is not of untouched tensors


def _fsdp_outputs(model: torch.nn.Module, precision: str, run) -> list:
    """Warnings raised while `run(module)` calls the FSDP2-wrapped model in a train step's precision."""
    import warnings

    backend = make_backend(model, CPU, dist="fsdp", precision=precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with backend.precision():
            run(backend.module)
    return [str(w.message) for w in caught if "view tensor" in str(w.message)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model_kw", [{}, {"cls_embed": False}, {"decoder_mask_ratio": 0.5},
                                      {"mask_type": "adaptive"}, {"mask_type": "amt", "throw_ratio": 0.25}],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_fsdp2_wrapped_mae_returns_no_view_tensors(model_kw: dict, precision: str) -> None:
    """FSDP2 warns (and an in-place op would drop its pre-backward hook) when a wrapped module returns a view."""
    clips, noise = batch([0, 1, 2, 3])
    for b in (4, 1):  # one sample: a sliced [1, L, P] view is contiguous, so .contiguous() would not do
        views = _fsdp_outputs(tiny(**model_kw), precision, lambda m, b=b: m(clips[:b], 0.75, noise[:b]))
        assert not views, views


def test_fsdp2_wrapped_classifier_rho_and_videotext_return_no_view_tensors() -> None:
    """The other models the FSDP2 backend wraps: the fine-tuning classifier, rho-BYOL and the video-text pair."""
    from models.videotext import videotext_model
    from util.cross_rank import convert_batchnorm

    clips, noise = batch([0, 1, 2, 3])
    tokens = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    builds = {
        "classifier": (lambda: create_model("vit_micro_patch8", img_size=32, num_frames=4, depth=2, num_classes=3),
                       lambda m: m(clips)),
        "rho_byol": (lambda: convert_batchnorm(create_model("rho_vit_micro_patch8", objective="byol", rho=2,
                                                            img_size=32, num_frames=4, depth=2)),
                     lambda m: m(clips)),
        "videotext": (lambda: videotext_model("mae_vit_micro_patch8", vocab_size=50, context_length=8, text_width=32,
                                              text_depth=1, text_heads=2, embed_dim=16, mae_decoder=True,
                                              img_size=32, num_frames=4, t_patch_size=2, depth=2,
                                              decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4),
                      lambda m: m(clips, tokens, 0.5, noise)),
    }
    for name, (build, run) in builds.items():
        for precision in ("fp32", "bf16"):  # bf16: FSDP2 casts BatchNorm weights, not its statistics
            torch.manual_seed(0)
            views = _fsdp_outputs(build(), precision, run)
            assert not views, (name, precision, views)
