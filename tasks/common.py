"""Flag sections and helpers that more than one pretraining task needs (no task imports another's module).

- `StartConfig`: the objective and the weights a fresh pretraining run starts from (every objective).
- `MaskingConfig`: what the encoder is hidden and what the MAE decoder regresses (the MAE family, and
  video-text, whose video tower masks the same way and whose SMAUG loss uses the same decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.convert import LoadReport, load_pretrained
from models.masking import MASK_TYPES
from tasks import PRETRAIN
from util.config import flag, positive
from util.weights import read_weights


@dataclass
class StartConfig:
    """Which objective, and what a fresh run starts from."""

    objective: str = flag("mae", "pretraining objective: mae (masked spacetime autoencoding, MAE-ST; AdaMAE and AMT "
                          "through --mask_type), rho_byol / rho_moco (rho clips of a video as positives), videotext "
                          "(masked video-text contrastive: FLIP/MAC, + MAE loss: SMAUG); --help with it lists its "
                          "flags", choices=PRETRAIN)
    init_from: str = flag("", "start a fresh run from these weights (file or run folder; weights only)")
    allow_unexpected_keys: bool = flag(False, "load --init_from weights even if some have no place in the model "
                                       "(they are dropped, so the model computes something else)")


@dataclass
class MaskingConfig:
    """What the encoder does not see, and the decoder that regresses it."""

    mask_ratio: float = flag(0.9, "share of tokens hidden from the encoder", check=lambda r: 0 < r < 1, rule="in (0, 1)")
    mask_type: str = flag("random", "mask sampler; adaptive: AdaMAE's learned sampler as published "
                          "(adaptive_detached: the variant of docs/adamae.md)", choices=sorted(MASK_TYPES))
    norm_pix_loss: bool = flag(True, "regress per-patch normalised pixels")
    pred_t_dim: int = flag(8, "frames the decoder predicts (every T/pred_t_dim-th)", check=positive, rule="> 0")
    decoder_embed_dim: int = flag(512, "decoder width", check=positive, rule="> 0")
    decoder_depth: int = flag(4, "decoder blocks", check=positive, rule="> 0")
    decoder_num_heads: int = flag(16, "decoder attention heads", check=positive, rule="> 0")


def load_start_weights(model: nn.Module, start: StartConfig, **kw: bool) -> LoadReport:
    """Fill `model` from --init_from (MAE-ST, PySlowFast, VideoMAE or our own weights), as checked by the key map."""
    return load_pretrained(model, read_weights(start.init_from), source=start.init_from,
                           allow_unexpected=start.allow_unexpected_keys, **kw)
