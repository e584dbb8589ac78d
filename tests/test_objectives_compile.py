"""AMT and rho-BYOL under --compile (per block, and the whole model) with activation checkpointing: the eager
losses and gradients, and AMT's attention pass through the compiled blocks.

Slow: inductor compiles C++ kernels for every block variant (minutes on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from common import make_backend  # noqa: E402
from test_objectives_dist import forward, make, videos  # noqa: E402

from util.distributed import DistInfo  # noqa: E402
from util.optim import clean_name  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["amt", "byol"])
@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_compiled_objectives_match_eager(kind: str, mode: str) -> None:
    batch = videos(0, 4)
    eager = make(kind)
    loss_ref, _ = forward(kind, eager, batch)
    loss_ref.backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    backend = make_backend(make(kind), info, compile=mode, grad_ckpt=True, precision="fp32")
    with backend.microstep(True):
        loss, _ = forward(kind, backend.module, batch)
        backend.backward(loss)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    for name, p in backend.unwrapped.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[clean_name(name)], rtol=1e-4, atol=1e-6)
    if kind == "amt":
        with torch.no_grad():
            compiled = backend.module.eval()(batch["clips"], return_cls_attention=True)
            torch.testing.assert_close(compiled, eager.eval()(batch["clips"], return_cls_attention=True))
