"""Mask samplers and mask strategies: which spacetime tokens the encoder sees.

A *mask strategy* is the object the MAE is built with (`MaskStrategy`): `strategy.sample(batch, grid,
ratio, noise, ...) -> Mask`. The model calls it once per forward and hands the `Mask` on to its decoder
and loss, so nothing about one forward is kept on the model. `SamplerMasking` wraps the plain samplers
below; AdaMAE's learned sampler (models/adamae.py) and AMT (models/amt.py) are strategies too, and
`models.mae.build_mask_strategy` builds any of them by its `--mask_type` name.

Every sampler has one signature, `sampler(batch, grid, ratio, noise=None, generator=None)`, and
returns `(ids_keep [B, K], ids_restore [B, L], mask [B, L])` with `mask == 1` for hidden tokens.
All keep exactly `K = int(L * (1 - ratio))` tokens per sample so batches stay dense.

Each sampler turns the per-sample uniform `noise [B, L]` into a score and keeps the K lowest scores,
so the data side can draw the noise per sample (seeded by sample index) and the mask does not depend
on the number of ranks or workers. Structured samplers add an integer "group rank" to the noise:
all tokens of the best-ranked group (a tube, a frame, a cube) come before the next group, and when
K is not a whole number of groups the last group is kept in part (ordered by the token noise).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Grid = tuple[int, int, int]
MaskOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def num_visible(num_tokens: int, ratio: float) -> int:
    """Tokens kept per sample: K = int(L * (1 - ratio)), at least one."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return max(1, int(num_tokens * (1 - ratio)))


def _noise(batch: int, grid: Grid, noise: torch.Tensor | None, generator: torch.Generator | None,
           device: torch.device | str | None) -> torch.Tensor:
    L = grid[0] * grid[1] * grid[2]
    if noise is None:
        gen_device = generator.device if generator is not None else (device or "cpu")
        noise = torch.rand(batch, L, generator=generator, device=gen_device)
        return noise.to(device) if device is not None else noise
    if noise.shape != (batch, L):
        raise ValueError(f"mask noise must have shape [batch, tokens] = {(batch, L)}, got {tuple(noise.shape)}")
    return noise


def _rank(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim (0 = smallest), as float."""
    return values.argsort(dim=-1).argsort(dim=-1).to(torch.float32)


def masks_from_scores(score: torch.Tensor, ratio: float) -> MaskOutput:
    """Keep the K lowest-score tokens per sample; return (ids_keep, ids_restore, mask)."""
    L = score.shape[1]
    K = num_visible(L, ratio)
    ids_shuffle = score.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :K]
    # A token is hidden iff its place in the shuffled order is >= K: one comparison on the device
    # (writing a Python 0 into a slice would build a host scalar tensor every step).
    mask = (ids_restore >= K).to(torch.float32)
    return ids_keep, ids_restore, mask


def random_masking(batch: int, grid: Grid, ratio: float, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, device: torch.device | str | None = None) -> MaskOutput:
    """Spacetime-agnostic random masking (the MAE-ST default): any K tokens."""
    return masks_from_scores(_noise(batch, grid, noise, generator, device), ratio)


def tube_masking(batch: int, grid: Grid, ratio: float, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None) -> MaskOutput:
    """Space-only masking: one spatial mask shared by every time slice (whole tubes kept)."""
    noise = _noise(batch, grid, noise, generator, device)
    t, h, w = grid
    per_token = noise.view(batch, t, h * w)
    tube_rank = _rank(per_token[:, 0, :])  # one random order of spatial positions per sample
    score = tube_rank[:, None, :] + per_token  # whole tubes first; noise orders inside a partial one
    return masks_from_scores(score.reshape(batch, -1), ratio)


def frame_masking(batch: int, grid: Grid, ratio: float, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None) -> MaskOutput:
    """Time-only masking: whole time slices kept or hidden (a partial slice when K needs it)."""
    noise = _noise(batch, grid, noise, generator, device)
    t, h, w = grid
    per_token = noise.view(batch, t, h * w)
    frame_rank = _rank(per_token[:, :, 0])
    score = frame_rank[:, :, None] + per_token
    return masks_from_scores(score.reshape(batch, -1), ratio)


def cube_masking(batch: int, grid: Grid, ratio: float, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 cube: Grid = (2, 4, 4)) -> MaskOutput:
    """Spacetime-block masking: the grid is cut into cubes (random offset per sample) kept whole."""
    noise = _noise(batch, grid, noise, generator, device)
    t, h, w = grid
    ct, ch, cw = (min(c, g) for c, g in zip(cube, grid, strict=True))
    dev = noise.device
    # Per-sample grid offsets from the noise (scaled so they do not follow a token's own noise).
    frac = torch.frac(noise[:, :3] * 9973.0)
    # python ints, not a device tensor made from a list: that would copy from the host (a GPU sync)
    off = torch.stack([frac[:, 0] * ct, frac[:, 1] * ch, frac[:, 2] * cw], dim=1).long()  # [B, 3]
    tt = torch.arange(t, device=dev).view(t, 1, 1)
    hh = torch.arange(h, device=dev).view(1, h, 1)
    ww = torch.arange(w, device=dev).view(1, 1, w)
    # Largest cube index along a dim with offset < c is (g - 1 + c - 1) // c, hence the counts.
    nt, nh, nw = (t + ct - 2) // ct + 1, (h + ch - 2) // ch + 1, (w + cw - 2) // cw + 1
    cube_t = (tt[None] + off[:, 0, None, None, None]) // ct
    cube_h = (hh[None] + off[:, 1, None, None, None]) // ch
    cube_w = (ww[None] + off[:, 2, None, None, None]) // cw
    cube_id = ((cube_t * nh + cube_h) * nw + cube_w).reshape(batch, -1)  # [B, L]
    n_cubes = nt * nh * nw
    cube_noise = torch.frac(noise[:, torch.arange(n_cubes, device=dev) % noise.shape[1]] * 7919.0)
    cube_rank = _rank(cube_noise).gather(1, cube_id)
    return masks_from_scores(cube_rank + noise, ratio)


MASK_SAMPLERS: dict[str, Callable[..., MaskOutput]] = {
    "random": random_masking,
    "tube": tube_masking,
    "frame": frame_masking,
    "cube": cube_masking,
}


@dataclass
class Mask:
    """One forward's mask: what the encoder keeps, and what the strategy's decoder or loss needs besides."""

    ids_keep: torch.Tensor  # [B, K] tokens the encoder sees, in the order it sees them
    ids_restore: torch.Tensor  # [B, L] un-shuffles [kept..., hidden...] back to token order
    mask: torch.Tensor  # [B, L] 1 = hidden from the encoder
    log_probs: torch.Tensor | None = None  # AdaMAE: log p of every token [B, L], with grad (its policy gradient)
    ids_masked: torch.Tensor | None = None  # AMT: the hidden tokens to reconstruct [B, M] (the others are thrown)
    thrown: torch.Tensor | None = None  # AMT: [B, L] 1 = thrown (in neither encoder, decoder nor loss)


class MaskStrategy(abc.ABC):
    """Which tokens the encoder sees: `sample(...) -> Mask`; the defaults suit a strategy without weights or loss."""

    name: str = ""
    # True when `sample` reads the embedded tokens (AdaMAE): the model must then embed every tubelet, not
    # only the visible ones.
    needs_tokens: bool = False
    # How a patch's pixel targets are normalised in the recipe the strategy comes from ("patch" or "channel").
    target_norm: str = "patch"

    @abc.abstractmethod
    def sample(self, batch: int, grid: Grid, ratio: float, noise: torch.Tensor | None = None, *,
               tokens: torch.Tensor | None = None, attention: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> Mask:
        """Draw the mask of `batch` samples over `grid`, keeping K = int(L * (1 - ratio)) tokens each."""

    def extra_loss(self, mask: Mask, token_errors: torch.Tensor, loss_mask: torch.Tensor
                   ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(term added to the reconstruction loss or None, detached scalars to log) for one forward."""
        return None, {}

    def check(self, num_tokens: int, cls_embed: bool, decoder_mask_ratio: float) -> None:  # noqa: B027
        """Raise now, not at the first step, if this strategy cannot run on a model so configured."""

    def finish_init(self) -> None:  # noqa: B027 - optional hook
        """The strategy's own init of its weights, run after the model's blanket init (which covers them too)."""

    def shard_units(self) -> list[nn.Module]:
        """Blocks of the strategy's network that parallelism wraps like the model's own blocks."""
        return []


class SamplerMasking(MaskStrategy):
    """A strategy from one of the plain samplers above: a function of (batch, grid, ratio, noise) only."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sampler = get_mask_sampler(name)

    def sample(self, batch: int, grid: Grid, ratio: float, noise: torch.Tensor | None = None, *,
               tokens: torch.Tensor | None = None, attention: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> Mask:
        """The sampler's (ids_keep, ids_restore, mask) for the per-sample `noise` (random when None)."""
        return Mask(*self.sampler(batch, grid, ratio, noise=noise, device=device))

    def __repr__(self) -> str:
        return f"SamplerMasking({self.name!r})"


# Every --mask_type: the samplers above plus AdaMAE's learned one (a module, models/adamae.py, built
# by the model because it needs the patch embeddings; it is not a plain function of the noise) and
# AMT's attention-driven masking and throwing (models/amt.py: it also needs the attention weights).
# AdaMAE as published (wgcban/adamae) and the project's earlier variant of it (docs/adamae.md).
ADAPTIVE_TYPES: tuple[str, ...] = ("adaptive", "adaptive_detached")
MASK_TYPES: tuple[str, ...] = (*MASK_SAMPLERS, *ADAPTIVE_TYPES, "amt")


def running_cell_rank(grid: Grid, device: torch.device | str | None = None) -> torch.Tensor:
    """Rank 0..3 of each token [L] inside its 2x2 spatial cell, rotated by one position per time step.

    VideoMAE v2's running cell: keeping the tokens of rank < 4 * (1 - ratio) keeps the same share of
    every cell in every frame (no region goes unsupervised) while the kept positions move with time,
    so a token dropped at time t is reconstructed at a neighbouring time; video is redundant along
    time, so little signal is lost while the decoder sees half the tokens at ratio 0.5.
    """
    t, h, w = grid
    tt = torch.arange(t, device=device).view(t, 1, 1)
    # Cell positions in cyclic order (0,0) (0,1) (1,1) (1,0): a rank < 2 window is a cell edge
    # that rotates round the cell, instead of jumping diagonally.
    hh = torch.arange(h, device=device).view(1, h, 1) % 2
    ww = torch.arange(w, device=device).view(1, 1, w) % 2
    pos = hh * 2 + (ww ^ hh)  # (0,0)->0, (0,1)->1, (1,1)->2, (1,0)->3
    return ((pos - tt) % 4).reshape(-1)


def decoder_targets(mask: torch.Tensor, grid: Grid, ratio: float, noise: torch.Tensor | None = None,
                    num_hidden: int | None = None) -> torch.Tensor:
    """Hidden tokens the decoder reconstructs under running-cell decoder masking: ids [B, M].

    M = int(hidden * (1 - ratio)) with hidden = L - K, the same for every sample so batches stay dense;
    hidden tokens are taken in running-cell rank order (ties broken by a hash of the per-sample noise),
    so when the encoder mask hides about as many rank<keep tokens as needed, the kept set is the
    running-cell pattern itself, and otherwise it is filled from the next rank.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"decoder_mask_ratio must be in [0, 1), got {ratio}")
    B, L = mask.shape
    # Pass num_hidden (L - K, known from shapes) to avoid reading the mask back to the host.
    hidden = int(mask[0].sum().item()) if num_hidden is None else num_hidden
    M = max(1, int(hidden * (1 - ratio)))
    rank = running_cell_rank(grid, mask.device).float().expand(B, L)
    # Scaled so the tie-break does not follow the encoder's own ordering of the same noise.
    tie = torch.frac(noise.float() * 104729.0) if noise is not None else torch.zeros(B, L, device=mask.device)
    score = rank + tie + (1.0 - mask) * 8.0  # visible tokens last: never targets
    return score.argsort(dim=1, stable=True)[:, :M]


DECODER_MASK_TYPES = ("run_cell", "rotating_hidden")


def run_cell_hidden_per_cell(ratio: float) -> int:
    """Positions of each 2x2 cell the decoder drops, int(4 * ratio), which VideoMAE v2 requires in 1..3."""
    dropped = int(4 * ratio)
    if not 0 < dropped < 4:
        raise ValueError(f"run_cell decoder masking drops int(4 x ratio) of the 4 positions of each 2x2 cell, "
                         f"which must be 1, 2 or 3: decoder_mask_ratio {ratio} gives {dropped} (use 0.25 to 0.99)")
    return dropped


def run_cell_decoded(batch: int, grid: Grid, ratio: float, noise: torch.Tensor | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """VideoMAE v2's running-cell decoder mask: [B, L], 1 where the decoder places a mask token.

    Each 2x2 spatial cell is a ring of 4 slots, int(4 * ratio) of them "dropped" in a row; slot i of the
    ring (cell position i = 2 * row + column) is dropped in time step t when (i + phase + t + 1) mod 4 is
    below that count: at ratio 0.5 the kept pair alternates between a row and a diagonal. The phase
    (0..3) is one per sample, drawn from the sample's mask noise (hashed, so it does not follow the
    encoder's ordering of that noise); without noise, at random. Visible tokens get mask tokens too
    where the cell keeps them; the loss counts only the hidden ones.
    """
    t, h, w = grid
    if h % 2 or w % 2:
        raise ValueError(f"run_cell decoder masking tiles 2x2 cells: the token grid {h}x{w} must be even in both")
    dropped = run_cell_hidden_per_cell(ratio)
    if noise is not None:
        phase = (torch.frac(noise.double().sum(dim=1) * 104729.0) * 4).long().clamp(0, 3).to(device or noise.device)
    else:
        phase = torch.randint(0, 4, (batch,), device=device)
    tt = torch.arange(t, device=phase.device).view(1, t, 1, 1)
    cell = (2 * (torch.arange(h, device=phase.device) % 2).view(1, 1, h, 1)
            + (torch.arange(w, device=phase.device) % 2).view(1, 1, 1, w))
    slot = (cell + phase.view(-1, 1, 1, 1) + tt + 1) % 4
    return (slot >= dropped).reshape(batch, t * h * w).float()


def run_cell_targets(batch: int, grid: Grid, ratio: float, noise: torch.Tensor | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Token ids [B, M] of the running-cell positions the decoder fills with mask tokens (M = L x kept / 4)."""
    decoded = run_cell_decoded(batch, grid, ratio, noise, device)
    M = grid[0] * grid[1] * grid[2] * (4 - run_cell_hidden_per_cell(ratio)) // 4
    return (1.0 - decoded).argsort(dim=1, stable=True)[:, :M]


def get_mask_sampler(name: str) -> Callable[..., MaskOutput]:
    """Look up a sampler by name, with the valid names in the error."""
    if name not in MASK_SAMPLERS:
        raise ValueError(f"unknown mask_type {name!r}; choose one of {sorted(MASK_SAMPLERS)}")
    return MASK_SAMPLERS[name]
