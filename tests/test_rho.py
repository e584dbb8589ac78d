"""rho-BYOL / rho-MoCo (models/rho.py, util/cross_rank.py) in one process: losses against their formulas,
the momentum copies and queue, the encoder import for fine-tuning, FLOPs against the counter."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models import create_model
from models.convert import load_pretrained
from util.cross_rank import CrossRankBatchNorm1d, convert_batchnorm, cosine_momentum, ema_update

HEADS = dict(proj_dim=16, proj_hidden_dim=32, pred_hidden_dim=32, queue_size=24)


def tiny_rho(objective: str, rho: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("rho_vit_micro_patch8", objective=objective, rho=rho, img_size=32, num_frames=4, depth=2,
                        **{**HEADS, **kw})


def reference_targets(model, clips: torch.Tensor) -> torch.Tensor:
    """Momentum projections, unit length, recomputed from the momentum modules."""
    with torch.no_grad():
        return F.normalize(model.momentum_projector(model.momentum_encoder(clips)), dim=-1)


def test_byol_loss_is_the_mean_over_ordered_pairs_of_clips_of_one_video() -> None:
    model, rho = tiny_rho("byol"), 3
    clips = torch.randn(2 * rho, 3, 4, 32, 32)
    loss, metrics, keys = model(clips)
    assert keys is None
    q = F.normalize(model.predictor(model.projector(model.encode(clips))), dim=-1)
    z = reference_targets(model, clips)
    terms = [2 - 2 * (q[v * rho + i] @ z[v * rho + j]) for v in range(2) for i, j in itertools.permutations(range(rho), 2)]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    loss.backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())  # no gradient into the target


def test_moco_loss_is_cross_entropy_against_the_queue_and_keys_come_back() -> None:
    model, rho, tau = tiny_rho("moco", temperature=0.2), 3, 0.2
    clips = torch.randn(2 * rho, 3, 4, 32, 32)
    loss, _, keys = model(clips)
    q = F.normalize(model.projector(model.encode(clips)), dim=-1)
    k = reference_targets(model, clips)
    logits = [torch.cat([(q[v * rho + i] @ k[v * rho + j])[None], q[v * rho + i] @ model.queue.t()]) / tau
              for v in range(2) for i, j in itertools.permutations(range(rho), 2)]
    want = F.cross_entropy(torch.stack(logits), torch.zeros(len(logits), dtype=torch.long))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(keys, k)


def test_queue_is_a_ring_and_momentum_copies_mirror_the_online_weights() -> None:
    model = tiny_rho("moco")
    keys = torch.arange(20 * 16, dtype=torch.float32).view(20, 16)
    model.enqueue(keys)
    model.enqueue(keys[:10])  # 30 keys into 24 slots: wraps after 24
    assert int(model.queue_ptr) == 6
    torch.testing.assert_close(model.queue[:6], keys[4:10])
    torch.testing.assert_close(model.queue[6:20], keys[6:20])
    torch.testing.assert_close(model.queue[20:], keys[:4])
    pairs = model.momentum_pairs()
    assert all(torch.equal(a, b) and not b.requires_grad for a, b in pairs)
    assert len(pairs) == len(list(model.momentum_encoder.parameters())) + len(list(model.momentum_projector.parameters()))


def test_ema_update_and_its_cosine_schedule() -> None:
    online, target = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    ema_update([(online, target)], 0.9)
    torch.testing.assert_close(target.data, torch.full((3,), 0.1))
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996) and cosine_momentum(0.996, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.996, 0.5) == pytest.approx(0.998)


def test_cross_rank_batchnorm_alone_is_batchnorm() -> None:
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    synced = convert_batchnorm(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)))
    synced.load_state_dict(head.state_dict())
    assert isinstance(synced[1], CrossRankBatchNorm1d)
    frozen = convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(8).requires_grad_(False)))
    assert not any(p.requires_grad for p in frozen.parameters())  # momentum copies stay without gradient
    x = torch.randn(6, 4)
    torch.testing.assert_close(synced(x), head(x))
    torch.testing.assert_close(synced[1].running_var, head[1].running_var)


@pytest.mark.parametrize("objective", ["byol", "moco"])
def test_encoder_imports_exactly_for_fine_tuning_and_linear_probing(objective: str) -> None:
    from models.vit import to_linear_probe

    model = tiny_rho(objective)
    vit = create_model("vit_micro_patch8", img_size=32, num_frames=4, depth=2, num_classes=5, cls_embed=True)
    report = load_pretrained(vit, model.state_dict(), source="rho run")
    assert report.missing == ["head.weight", "head.bias"] and not report.unexpected
    assert any(k.startswith("momentum_encoder.") for k in report.dropped)
    clips = torch.randn(2, 3, 4, 32, 32)
    torch.testing.assert_close(vit.forward_features(clips), model.encode(clips))
    probe = to_linear_probe(vit).eval()
    torch.testing.assert_close(probe.forward_features(clips), model.encode(clips))


@pytest.mark.parametrize("objective", ["byol", "moco"])
def test_flops_match_the_counter(objective: str) -> None:
    with torch.device("meta"):
        model = create_model("rho_vit_base_patch16", objective=objective, rho=2, img_size=112, num_frames=8)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(4, 3, 8, 112, 112))
    analytic = model.flops_per_clip()
    # The counter also sees the rho x rho positive dot products (and BYOL's 2 - 2cos): a few hundred FLOPs.
    assert abs(counter.get_total_flops() / 4 - analytic["forward"]) <= 1e-4 * analytic["forward"]
    assert analytic["train_step"] == 3 * analytic["online"] + analytic["momentum"] + 2 * analytic["negatives"]
