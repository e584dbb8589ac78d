"""Import weights from our checkpoints and from the public MAE-ST / PySlowFast / VideoMAE releases.

Every format is first renamed to one canonical layout (our `MaskedAutoencoderViT` names: fused
`attn.qkv`, `norm`, `decoder_*`, `head`), then adapted to the target model: the decoder is dropped
for a classifier, the encoder's final `norm` becomes the pooled `fc_norm` (as MAE-ST fine-tuning
reuses it after global pooling), positional tables are resized to the model's token grid and
converted between separable and joint forms, and a head of the wrong size is skipped.

Formats (detected from the keys):
- ours: `{"model": sd}` exports or plain state dicts; wrapper prefixes are stripped.
- mae_st: the official release / model code: separate `attn.q/k/v` linears, separable pos-embeds.
- pyslowfast: `.pyth` files (`model_state`), `head.projection`, decoder under `pred_head.*` with one
  joint `decoder_pos_embed`.
- videomae: `encoder.`/`decoder.` prefixes, fused qkv with `q_bias`/`v_bias` (k has no bias) and a
  fixed 1-D sin-cos table that is not stored: it is regenerated for the target's token count. Load
  it into a model built with `sep_pos_embed=False, cls_embed=False` for an exact import.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from models.video_vit import (
    resize_joint_pos_embed,
    resize_spatial_pos_embed,
    resize_temporal_pos_embed,
    separable_pos_table,
)

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]
NON_ENCODER_PREFIXES = ("head.", "decoder_", "mask_token")


@dataclass
class LoadReport:
    """What `load_pretrained` did: the format it saw and every key it could not place."""

    source_format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # present in both, wrong shape (e.g. a 400-way head)
    dropped: list[str] = field(default_factory=list)  # decoder weights not wanted by a classifier
    notes: list[str] = field(default_factory=list)  # resizes and approximations

    @property
    def missing_encoder(self) -> list[str]:
        """Missing keys that belong to the encoder (the head and decoder may legitimately be new)."""
        return [k for k in self.missing if not k.startswith(NON_ENCODER_PREFIXES)]

    def summary(self) -> str:
        """One line: format and counts."""
        return (f"{self.source_format} weights: {len(self.missing)} missing ({len(self.missing_encoder)} encoder), "
                f"{len(self.unexpected)} unexpected, {len(self.skipped)} skipped for shape, "
                f"{len(self.dropped)} decoder dropped, {len(self.notes)} notes")

    def log(self, logger: logging.Logger = log) -> None:
        """Log the summary line, then each list that is not empty."""
        logger.info(self.summary())
        for name in ("missing", "unexpected", "skipped", "notes"):
            if getattr(self, name):
                logger.info("  %s: %s", name, getattr(self, name))


# ----------------------------------------------------------------------------- reading
# Files are read (weights-only, wrapper prefixes stripped, containers unwrapped) by
# `util.checkpoint.read_weights`; this module maps the keys of a flat state dict onto a model.


def detect_format(sd: StateDict) -> str:
    """'videomae', 'pyslowfast', 'mae_st' or 'ours' from the key names."""
    keys = list(sd)
    if any(k.startswith("encoder.") or k.endswith("attn.q_bias") for k in keys):
        return "videomae"
    if any(k.startswith(("pred_head.", "head.projection.")) for k in keys):
        return "pyslowfast"
    if any(k.endswith("attn.q.weight") for k in keys):
        return "mae_st"
    return "ours"


# ----------------------------------------------------------------------------- canonical names
def _fuse_attention(sd: StateDict) -> StateDict:
    """Separate q/k/v linears, or qkv with q_bias/v_bias, -> one qkv linear with a full bias."""
    out = dict(sd)
    for k in [k for k in sd if k.endswith("attn.q.weight")]:
        pre = k[: -len("q.weight")]
        out[pre + "qkv.weight"] = torch.cat([out.pop(pre + n + ".weight") for n in "qkv"])
        if pre + "q.bias" in sd:
            out[pre + "qkv.bias"] = torch.cat([out.pop(pre + n + ".bias") for n in "qkv"])
    for k in [k for k in sd if k.endswith("attn.q_bias")]:
        pre = k[: -len("q_bias")]
        q_bias, v_bias = out.pop(pre + "q_bias"), out.pop(pre + "v_bias")
        # VideoMAE gives the key projection no bias: zeros reproduce it exactly.
        out[pre + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return out


def _rename(sd: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    """Apply the first matching regex rule to each key."""
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            if re.match(pattern, k):
                k = re.sub(pattern, repl, k)
                break
        out[k] = v
    return out


def to_canonical(sd: StateDict, fmt: str) -> StateDict:
    """Rename a state dict of format `fmt` into our MAE names (encoder, decoder, head)."""
    if fmt == "pyslowfast":
        depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"pred_head\.transforms\.0\.(\d+)\.", k))),
                        default=-1)
        # The last module of the decoder sequence is its final norm, the ones before are blocks.
        sd = _rename(sd, [
            (rf"^pred_head\.transforms\.0\.{depth - 1}\.", "decoder_norm."),
            (r"^pred_head\.transforms\.0\.(\d+)\.", r"decoder_blocks.\1."),
            (r"^pred_head\.projections\.0\.", "decoder_pred."),
            (r"^head\.projection\.", "head."),
        ])
    elif fmt == "videomae":
        sd = _rename(sd, [
            (r"^encoder\.", ""),
            (r"^decoder\.blocks\.", "decoder_blocks."),
            (r"^decoder\.norm\.", "decoder_norm."),
            (r"^decoder\.head\.", "decoder_pred."),
            (r"^encoder_to_decoder\.", "decoder_embed."),
        ])
    return _fuse_attention(sd)


# ----------------------------------------------------------------------------- positional tables
def sincos_1d_table(num_tokens: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed table [1, N, D]: sin on even, cos on odd channels of pos / 10000^(2i/D)."""
    pos = torch.arange(num_tokens, dtype=torch.float64).unsqueeze(1)
    exponent = 2 * (torch.arange(dim) // 2).double() / dim
    angles = pos / torch.pow(10000.0, exponent)
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.float().unsqueeze(0)


def infer_grid(num_tokens: int, target: tuple[int, int, int]) -> tuple[int, int, int]:
    """A square (T, H, W) grid with T*H*W = num_tokens, preferring the target's spatial size, then its T."""
    t0, h0, _ = target
    options = [(num_tokens // (s * s), s, s) for s in range(1, int(math.isqrt(num_tokens)) + 1)
               if num_tokens % (s * s) == 0]
    if not options:
        raise ValueError(f"cannot read a position table of {num_tokens} tokens as a T x S x S grid")
    for grid in options:
        if grid[1] == h0:
            return grid
    for grid in options:
        if grid[0] == t0:
            return grid
    return min(options, key=lambda g: abs(math.log(g[1] / h0)))


def _split_joint(table: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest separable (least-squares) form of a joint table [1, THW, D]: (spatial [1,HW,D], temporal [1,T,D])."""
    t, h, w = grid
    x = table.reshape(t, h * w, -1)
    spatial = x.mean(0, keepdim=True)
    temporal = x.mean(1).unsqueeze(0) - x.mean((0, 1))
    return spatial, temporal


def _adapt_pos(canon: StateDict, model: nn.Module, prefix: str, grid: tuple[int, int, int], dim: int,
               fmt: str, notes: list[str]) -> None:
    """Write the model's positional keys (prefix '' or 'decoder_') into canon, resized and converted."""
    mine = dict(model.named_parameters())
    sp, tp, cl, joint = (prefix + n for n in ("pos_embed_spatial", "pos_embed_temporal", "pos_embed_class",
                                               "pos_embed"))
    want_sep = sp in mine
    if not want_sep and joint not in mine:
        return
    want_cls = cl in mine or (joint in mine and mine[joint].shape[1] == math.prod(grid) + 1)
    if sp in canon and tp in canon:
        spatial, temporal, cls_pos = canon.pop(sp), canon.pop(tp), canon.pop(cl, None)
    elif joint in canon:
        table = canon.pop(joint)
        n = table.shape[1]
        num_prefix = _num_prefix(n, grid, has_cls="cls_token" in canon)
        cls_pos = table[:, :num_prefix] if num_prefix else None
        src = infer_grid(n - num_prefix, grid)
        if not want_sep:
            canon[joint] = _with_cls(resize_joint_pos_embed(table[:, num_prefix:], src, grid), cls_pos, want_cls)
            if src != grid:
                notes.append(f"{joint}: resized {src} -> {grid} (trilinear)")
            return
        spatial, temporal = _split_joint(table[:, num_prefix:], src)
        notes.append(f"{joint}: joint table projected to separable spatial + temporal (least squares)")
    elif fmt == "videomae":
        # VideoMAE never stores its table: regenerate it for this model's token count, as VideoMAE does.
        body = sincos_1d_table(math.prod(grid), dim)
        notes.append(f"{joint}: VideoMAE fixed sin-cos table regenerated for grid {grid}")
        if not want_sep:
            canon[joint] = _with_cls(body, None, want_cls)
            return
        spatial, temporal, cls_pos = *_split_joint(body, grid), None
        notes.append(f"{joint}: sin-cos table approximated as separable; build the model with "
                     "sep_pos_embed=False for an exact import")
    else:
        return
    new_s, new_t = resize_spatial_pos_embed(spatial, grid[1:]), resize_temporal_pos_embed(temporal, grid[0])
    if new_s.shape != spatial.shape or new_t.shape != temporal.shape:
        notes.append(f"{prefix}pos_embed: spatial {spatial.shape[1]} -> {new_s.shape[1]}, "
                     f"temporal {temporal.shape[1]} -> {new_t.shape[1]} tokens")
    if want_sep:
        canon[sp], canon[tp] = new_s, new_t
        if cls_pos is not None and want_cls:
            canon[cl] = cls_pos
    else:
        canon[joint] = _with_cls(separable_pos_table(new_s, new_t), cls_pos, want_cls)


def _num_prefix(n: int, grid: tuple[int, int, int], has_cls: bool) -> int:
    """1 when a joint table of n rows starts with a class position, else 0."""
    if n == math.prod(grid) + 1:
        return 1
    if n == math.prod(grid) or not has_cls:
        return 0
    return int(_is_grid(n - 1))


def _is_grid(n: int) -> bool:
    return any(n % (s * s) == 0 for s in range(2, math.isqrt(n) + 1))


def _with_cls(body: torch.Tensor, cls_pos: torch.Tensor | None, want_cls: bool) -> torch.Tensor:
    """Prepend the class position (zeros when the checkpoint has none) if the model's table has one."""
    if not want_cls:
        return body
    return torch.cat([cls_pos if cls_pos is not None else torch.zeros_like(body[:, :1]), body], dim=1)


# ----------------------------------------------------------------------------- adapting and loading
def adapt_to_model(canon: StateDict, model: nn.Module, fmt: str = "ours") -> tuple[StateDict, LoadReport]:
    """Fit a canonical state dict to `model`: decoder, norms, positional tables and head."""
    report = LoadReport(fmt)
    mine = model.state_dict()
    canon = dict(canon)
    if not any(k.startswith("decoder_") for k in mine):
        # Pretraining-only parts: the decoder and AdaMAE's token sampler.
        for k in [k for k in canon if k.startswith(("decoder_", "mask_token", "decoder.", "adaptive_sampler."))]:
            report.dropped.append(k)
            del canon[k]
    # Pretrained encoders end in `norm`; a mean-pooling classifier applies that norm as `fc_norm`.
    if "fc_norm.weight" in mine and "norm.weight" not in mine and "fc_norm.weight" not in canon:
        for p in ("weight", "bias"):
            if "norm." + p in canon:
                canon["fc_norm." + p] = canon.pop("norm." + p)
    grid = tuple(model.patch_embed.grid_size)
    _adapt_pos(canon, model, "", grid, model.patch_embed.proj.out_channels, fmt, report.notes)
    if "decoder_embed.weight" in mine:
        _adapt_pos(canon, model, "decoder_", grid, mine["decoder_embed.weight"].shape[0], fmt, report.notes)
    for k in [k for k in canon if k in mine and canon[k].shape != mine[k].shape]:
        report.skipped.append(f"{k} {tuple(canon[k].shape)} vs model {tuple(mine[k].shape)}")
        del canon[k]
    report.missing = [k for k in mine if k not in canon]
    report.unexpected = [k for k in canon if k not in mine]
    return {k: v for k, v in canon.items() if k in mine}, report


def convert_state_dict(sd: StateDict, model: nn.Module) -> tuple[StateDict, LoadReport]:
    """A flat state dict of any supported format -> (state dict for `model`, report); nothing is loaded yet."""
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    fmt = detect_format(sd)
    return adapt_to_model(to_canonical(sd, fmt), model, fmt)


def load_pretrained(model: nn.Module, state_dict: StateDict, *, source: str = "state dict",
                    strict_encoder: bool = True) -> LoadReport:
    """Load a flat state dict of any supported format into `model` (a ViT classifier or MAE); returns the report.

    `strict_encoder` raises when an encoder weight is missing or has the wrong shape (the head and
    decoder may be new). The report is logged: a summary line and each non-empty key list. Read
    files with `util.checkpoint.read_weights` (weights-only, our folders included).
    """
    name = source
    sd, report = convert_state_dict(state_dict, model)
    report.log()
    bad_shape = [s for s in report.skipped if not s.startswith(NON_ENCODER_PREFIXES)]
    if strict_encoder and (report.missing_encoder or bad_shape):
        raise ValueError(f"{name}: cannot fill the encoder ({report.summary()}); missing: "
                         f"{report.missing_encoder}; wrong shape: {bad_shape}; unexpected: {report.unexpected}")
    model.load_state_dict(sd, strict=False)
    return report
