"""`decoder_mask_type="run_cell"` against OpenGVLab/VideoMAEv2 (dataset/masking_generator.py `Cell`,
`RunningCellMaskingGenerator`; models/modeling_pretrain.py; engine_for_pretraining.py).

The patterns are written out by hand from that code: a 4-slot ring [dropped x n, kept x (4 - n)], read
from pointer phase + t + 1 and laid out as a 2x2 cell (row-major), tiled over the frame.
"""

from __future__ import annotations

import pytest
import torch

from models import create_model
from models.masking import random_masking, run_cell_decoded

# 1 = the decoder puts a mask token there, for phase 0, time steps 0..3.
HALF_PHASE0 = torch.tensor([
    [[0, 1], [1, 0]],  # pointer 1: ring [1,0,0,1] dropped -> the anti-diagonal is decoded
    [[1, 1], [0, 0]],  # pointer 2: [0,0,1,1] -> the top row
    [[1, 0], [0, 1]],  # pointer 3: [0,1,1,0] -> the diagonal
    [[0, 0], [1, 1]],  # pointer 0: [1,1,0,0] -> the bottom row
], dtype=torch.float)
QUARTER_PHASE0 = torch.tensor([  # ratio 0.25: one slot dropped, (1,1), (1,0), (0,1), (0,0) in turn
    [[1, 1], [1, 0]],
    [[1, 1], [0, 1]],
    [[1, 0], [1, 1]],
    [[0, 1], [1, 1]],
], dtype=torch.float)


def phases(pattern: torch.Tensor, t: int) -> list[torch.Tensor]:
    """The sequences [t, 2, 2] of the four phases: phase p at step f is phase 0 at step f + p."""
    return [pattern[[(f + p) % 4 for f in range(t)]] for p in range(4)]


@pytest.mark.parametrize("ratio,pattern", [(0.5, HALF_PHASE0), (0.25, QUARTER_PHASE0), (0.3, QUARTER_PHASE0)])
def test_run_cell_pattern_is_v2s_with_a_phase_per_sample(ratio: float, pattern: torch.Tensor) -> None:
    t, h, w, B = 6, 4, 6, 64
    noise = torch.rand(B, t * h * w, generator=torch.Generator().manual_seed(0))
    decoded = run_cell_decoded(B, (t, h, w), ratio, noise).view(B, t, h // 2, 2, w // 2, 2)
    seen = set()
    for b in range(B):
        cells = decoded[b].permute(1, 3, 0, 2, 4)  # [cell row, cell col, t, 2, 2]
        first = cells[0, 0]
        assert torch.equal(cells, first.expand_as(cells))  # one 2x2 pattern tiled over every frame
        matches = [p for p, seq in enumerate(phases(pattern, t)) if torch.equal(first, seq)]
        assert len(matches) == 1, first
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}  # drawn per sample, all four phases occur
    # The phase is a function of the sample's noise: the same noise, the same pattern.
    assert torch.equal(run_cell_decoded(B, (t, h, w), ratio, noise), run_cell_decoded(B, (t, h, w), ratio, noise))


def test_run_cell_refuses_ratios_and_grids_v2_cannot_tile() -> None:
    with pytest.raises(ValueError, match="1, 2 or 3"):
        run_cell_decoded(1, (2, 2, 2), 0.2)
    with pytest.raises(ValueError, match="even"):
        run_cell_decoded(1, (2, 3, 2), 0.5)
    with pytest.raises(ValueError, match="1, 2 or 3"):
        create_model("mae_vit_micro_patch8", img_size=32, num_frames=8, decoder_mask_ratio=0.1)


def test_mask_tokens_at_every_running_cell_position_and_loss_on_the_hidden_ones() -> None:
    # modeling_pretrain.py: decoder input = visible tokens + mask tokens at ~decode_mask (visible positions
    # included); engine: labels at ~decode_mask, loss weighted by bool_masked_pos there, over their count.
    torch.manual_seed(0)
    model = create_model("mae_vit_micro_patch8", img_size=32, num_frames=8, pred_t_dim=4, decoder_embed_dim=64,
                         decoder_depth=1, decoder_num_heads=4, depth=2, decoder_mask_ratio=0.5).train()
    grid, B, L = (4, 4, 4), 3, 64
    clips, noise = torch.randn(B, 3, 8, 32, 32), torch.rand(B, L, generator=torch.Generator().manual_seed(1))
    _, _, hidden = random_masking(B, grid, 0.75, noise=noise)
    decoded = run_cell_decoded(B, grid, 0.5, noise)
    loss, pred, mask = model(clips, 0.75, noise)
    assert torch.equal(decoded.sum(1), torch.full((B,), L / 2))
    assert torch.equal((pred.abs().sum(-1) > 0).float(), decoded)  # a prediction at every decoded position
    assert ((decoded == 1) & (hidden == 0)).any()  # ... visible ones included
    assert torch.equal(mask, decoded * hidden)  # the loss: decoded and hidden
    errors = model.token_errors(clips, pred)
    torch.testing.assert_close(loss, (errors * decoded * hidden).sum() / (decoded * hidden).sum())
