"""--compile (torch.compile per block, inductor on CPU) with activation checkpointing, DDP, one process.

Slow: inductor compiles C++ kernels for every block variant (about 1-2 minutes on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from common import MASK_RATIO, batch, make_backend, make_model, micro_step  # noqa: E402

from util.distributed import DistInfo  # noqa: E402
from util.optim import clean_name  # noqa: E402


@pytest.mark.slow
def test_compiled_blocks_match_eager() -> None:
    """Compiled + checkpointed blocks give the eager loss and gradients (1e-5), with clean parameter names."""
    clips, noise = batch([0, 1, 2, 3])
    eager = make_model()
    loss_ref, _, _ = eager(clips, MASK_RATIO, noise)
    loss_ref.backward()
    grads_ref = {n: p.grad for n, p in eager.named_parameters()}
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    backend = make_backend(make_model(), info, compile="blocks", grad_ckpt=True)
    loss = micro_step(backend, clips, noise)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    for name, p in backend.unwrapped.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[clean_name(name)], rtol=1e-5, atol=1e-6)
    assert sorted(backend.full_model_state_dict()) == sorted(eager.state_dict())
    assert torch.isfinite(backend.step())
