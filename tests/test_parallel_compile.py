"""--compile {blocks,model} (torch.compile, inductor on the CPU) on every backend that takes it.

Slow: inductor compiles C++ kernels for every graph (1-4 minutes each on 2 busy cores), except the
DeepSpeed refusal, which fails before any work.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from common import MASK_RATIO, batch, make_backend, make_model, micro_step  # noqa: E402
from dist_launch import torchrun  # noqa: E402

from util.distributed import DistInfo  # noqa: E402
from util.optim import clean_name  # noqa: E402

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode, grad_ckpt", [("blocks", True), ("model", False)])
def test_compiled_step_matches_eager(mode: str, grad_ckpt: bool) -> None:
    """Compiled blocks (with checkpointing) or the whole compiled model give the eager loss and gradients
    (1e-5), with clean parameter names."""
    clips, noise = batch([0, 1, 2, 3])
    eager = make_model()
    loss_ref, _, _ = eager(clips, MASK_RATIO, noise)
    loss_ref.backward()
    grads_ref = {n: p.grad for n, p in eager.named_parameters()}
    backend = make_backend(make_model(), CPU, compile=mode, grad_ckpt=grad_ckpt)
    loss = micro_step(backend, clips, noise)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    for name, p in backend.unwrapped.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[clean_name(name)], rtol=1e-5, atol=1e-6)
    assert sorted(backend.full_model_state_dict()) == sorted(eager.state_dict())
    assert torch.isfinite(backend.step())


COMPILED = ["ddp:compile=model", "fsdp:compile=model", "fsdp:compile=blocks:ckpt"]


@pytest.mark.slow
def test_compiled_backends_on_two_ranks_match_one_process(tmp_path: Path) -> None:
    """DDP and FSDP2 with the whole model compiled, and FSDP2 + checkpointing + compiled blocks (torchtitan's
    order), on 2 gloo ranks: the one-process losses and grad norms (reduction order only), weights within
    3e-5 (see tests/test_parallel.py), and a save/load round trip that continues identically."""
    torchrun(2, "worker.py", tmp_path, *COMPILED, timeout=3000)
    results = json.loads((tmp_path / "results.json").read_text())
    for scenario in COMPILED:
        r = results[scenario]
        for got, want in ((r["losses"], r["ref_losses"]), (r["norms"], r["ref_norms"]),
                          (r["after_load"], r["ref_after"])):
            assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, want, strict=True)), (scenario, r)
        assert r["params"]["max_abs"] <= 3e-5, (scenario, r["params"])
        assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(r["after_load"], r["after_save"], strict=True))


def test_deepspeed_refuses_whole_model_compile_before_any_work() -> None:
    """DeepSpeed's engine hooks into the whole model: --compile model is an error naming the way that works."""
    with pytest.raises(ValueError, match="--compile blocks"):
        make_backend(make_model(), CPU, dist="deepspeed", compile="model")
