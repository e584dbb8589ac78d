"""Flag sections and helpers that more than one task needs (no task imports another's module).

- `StartConfig`: the objective and the weights a fresh pretraining run starts from (every objective).
- `MaskingConfig`: what the encoder is hidden and what the MAE decoder regresses (the MAE family, and
  video-text, whose video tower masks the same way and whose SMAUG loss uses the same decoder).
- `TestedTask`: when a fine-tuning task (classification, detection) runs its test.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from torch import nn

from models.convert import LoadReport, load_pretrained
from models.masking import MASK_TYPES
from tasks import PRETRAIN
from util.config import flag, positive
from util.task import RunContext, Task
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


class TestedTask(Task):
    """A fine-tuning task scored by its own `test`: every `eval_every` epochs, after training, and for --eval."""

    cfg: Any  # its config section: eval_every (epochs between tests, 0: end only) and finetune (start weights)

    @abc.abstractmethod
    def test(self, ctx: RunContext, tag: str) -> dict:
        """Score the model on the evaluation split; `tag` names the moment in the log."""

    def has_start_weights(self, ctx: RunContext) -> bool:
        """True when --finetune names weights to load; --eval without them (and no checkpoint) is an error."""
        if not self.cfg.finetune and self.cfg.eval:
            raise ValueError(f"--eval needs weights: --resume DIR, a checkpoint in {ctx.out}, or --finetune FILE")
        return bool(self.cfg.finetune)

    def on_epoch_end(self, ctx: RunContext) -> None:
        done, every = ctx.state.epoch + 1, self.cfg.eval_every
        if every and done % every == 0 and done < ctx.cfg.loop.epochs:
            self.test(ctx, f"epoch {done}")

    def on_train_end(self, ctx: RunContext) -> dict:
        return self.test(ctx, f"final, step {ctx.state.global_step}")

    def evaluate(self, ctx: RunContext) -> dict:
        return self.test(ctx, f"eval of {ctx.cfg.ckpt.resume or self.cfg.finetune or 'latest'}")
