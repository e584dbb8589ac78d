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
  it into a model built with `sep_pos_embed=False, cls_embed=False` for an exact import. VideoMAE v2
  (OpenGVLab/VideoMAEv2, ViT-g/14 included) keeps v1's key layout, so both read as this format; its
  decoder shares the encoder's MLP ratio (48/11 for ViT-g), read off `mlp.fc1` as `mlp_ratio`. v2's
  optional cosine attention (`--cos_attn`: a learned `attn.scale` per block) is not implemented here:
  such a checkpoint is refused.
Layer scale (`gamma_1`/`gamma_2`, VideoMAE `init_values`, PySlowFast `LAYER_SCALE_INIT_VALUE`) loads
by name into blocks built with `init_values > 0`.

Exact or refused: a weight with no place in the model would be dropped and the model would compute
something else, so unexpected keys are an error unless the caller accepts them (`allow_unexpected`).
A decoder loads only when the model's decoder computes what the checkpoint's code computed (class
token, heads, position-table form, layer scale; heads are not in the weights, so each format's code
fixes them: `checkpoint_model_options`); otherwise it is refused unless the caller asks for the
encoder only (`load_decoder=False`). Fine-tuning never needs the decoder.
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
DECODER_PREFIXES = ("decoder_", "mask_token", "decoder.")
# Parts only pretraining has, beside the decoder: AdaMAE's sampler, AMT's attention table, and the
# rho objectives' heads, momentum copies and MoCo queue (models/rho.py keeps its online encoder under
# the encoder's own names, so only these are left to drop for fine-tuning).
PRETRAINING_ONLY_PREFIXES = ("adaptive_sampler.", "amt_", "projector.", "predictor.", "momentum_", "queue")
# Parts a model may lack or start fresh (pretraining-only parts and the classifier head).
NON_ENCODER_PREFIXES = ("head.", *PRETRAINING_ONLY_PREFIXES, *DECODER_PREFIXES)
LAYER_SCALE_KEY = re.compile(r"^(decoder_)?blocks\.\d+\.gamma_[12]$")
# Decoder heads are not in the weights; each release's code fixes them. PySlowFast's MSSeparateHead
# builds dim_out // 64 heads (no config key); VideoMAE's pretrain_videomae_{small,base,large,huge}
# factories fix them per decoder width (no flag); mae_st's `--decoder_num_heads` defaults to 16.
VIDEOMAE_DECODER_HEADS = {192: 3, 384: 6, 512: 8, 640: 8}
MAE_ST_DECODER_HEADS = 16
# Any value > 0 builds the gammas; the checkpoint's own values are then loaded over it.
LAYER_SCALE_ON = 0.1


@dataclass
class LoadReport:
    """What `load_pretrained` did: the format it saw and every key it could not place."""

    source_format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # present in both, wrong shape (e.g. a 400-way head)
    # Parts the model does not have (a classifier's decoder, an MAE's head, AdaMAE's sampler) or a
    # decoder the caller declined with load_decoder=False.
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # resizes, approximations, conventions assumed
    # Layer-scale gammas the checkpoint lacks (it had no layer scale): they keep the model's init_values.
    initialised: list[str] = field(default_factory=list)
    # Why the checkpoint's decoder would not compute in this model what it computed where it was trained.
    decoder_problems: list[str] = field(default_factory=list)
    suggested: dict = field(default_factory=dict)  # model options that build the checkpoint's model

    @property
    def missing_encoder(self) -> list[str]:
        """Missing keys that belong to the encoder (the head and decoder may legitimately be new)."""
        return [k for k in self.missing if not k.startswith(NON_ENCODER_PREFIXES)]

    @property
    def unexpected_encoder(self) -> list[str]:
        """Unexpected keys outside the decoder (the decoder's are judged in `decoder_problems`)."""
        return [k for k in self.unexpected if not k.startswith(DECODER_PREFIXES)]

    def summary(self) -> str:
        """One line: format and counts."""
        return (f"{self.source_format} weights: {len(self.missing)} missing ({len(self.missing_encoder)} encoder), "
                f"{len(self.unexpected)} unexpected, {len(self.skipped)} skipped for shape, "
                f"{len(self.dropped)} dropped (parts the model lacks), {len(self.notes)} notes")

    def log(self, logger: logging.Logger = log) -> None:
        """Log the summary line, then each list that is not empty (weights left out at WARNING)."""
        logger.info(self.summary())
        for name in ("missing", "skipped", "dropped", "initialised", "notes"):
            if getattr(self, name):
                logger.info("  %s: %s", name, getattr(self, name))
        if self.unexpected:
            logger.warning("  unexpected (not loaded): %s", self.unexpected)


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
            # MASK.DECODER_SEP_POS_EMBED: True names the separable decoder tables dec_pos_embed_*.
            (r"^dec_pos_embed_", "decoder_pos_embed_"),
        ])
    elif fmt == "videomae":
        sd = _rename(sd, [
            (r"^encoder\.", ""),
            (r"^decoder\.blocks\.", "decoder_blocks."),
            (r"^decoder\.norm\.", "decoder_norm."),
            (r"^decoder\.head\.", "decoder_pred."),
            (r"^encoder_to_decoder\.", "decoder_embed."),
        ])
        sd = _fuse_attention(sd)
        # VideoMAE's encoder_to_decoder has no bias, nor has qkv with qkv_bias=False: zeros are exact.
        for w in [k for k in sd if k == "decoder_embed.weight" or k.endswith("attn.qkv.weight")]:
            bias = w[: -len("weight")] + "bias"
            sd.setdefault(bias, torch.zeros(sd[w].shape[0], dtype=sd[w].dtype))
        return sd
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


# ----------------------------------------------------------------------------- release conventions
def _has_decoder(sd: StateDict) -> bool:
    return any(k.startswith(DECODER_PREFIXES) for k in sd)


def _layer_scale(sd: StateDict, decoder: bool) -> bool:
    return any(LAYER_SCALE_KEY.match(k) and k.startswith("decoder_") == decoder for k in sd)


def release_options(canon: StateDict, fmt: str) -> tuple[dict, dict[str, str]]:
    """(MAE options that compute what the checkpoint's code computed, why for each one not read off a key).

    `canon` is in canonical names (`to_canonical`). Options the weights cannot show (decoder heads,
    target frames) come from the format's code; for our own checkpoints they are unknown and left out.
    """
    opts: dict = {"cls_embed": "cls_token" in canon, "init_values": LAYER_SCALE_ON if _layer_scale(canon, False) else 0.0}
    why: dict[str, str] = {}
    if "blocks.0.mlp.fc1.weight" in canon:  # hidden / width: 4 for ViT-B/L/H, 48/11 for ViT-g
        hidden, width = canon["blocks.0.mlp.fc1.weight"].shape
        opts["mlp_ratio"] = hidden / width
    if fmt == "videomae":
        opts["sep_pos_embed"] = False  # its fixed 1-D sin-cos table is joint
    elif "pos_embed_spatial" in canon or "pos_embed" in canon:
        opts["sep_pos_embed"] = "pos_embed_spatial" in canon
    if fmt == "pyslowfast":
        opts["target_frames"] = "stride"
        why["target_frames"] = "PySlowFast regresses frames[::t_patch] (MASK.TIME_STRIDE_LOSS, default True)"
    elif fmt == "mae_st":
        opts["target_frames"] = "linspace"
        why["target_frames"] = "mae_st's pretraining code regresses linspace(0, T-1, pred_t_dim) frames"
    if not _has_decoder(canon) or "decoder_embed.weight" not in canon:
        return opts, why
    dim = canon["decoder_embed.weight"].shape[0]
    opts["decoder_embed_dim"] = dim
    opts["decoder_depth"] = len({k.split(".")[1] for k in canon if k.startswith("decoder_blocks.")})
    opts["decoder_init_values"] = LAYER_SCALE_ON if _layer_scale(canon, True) else 0.0
    if fmt == "videomae":
        opts["decoder_sep_pos_embed"] = False
    elif "decoder_pos_embed_spatial" in canon or "decoder_pos_embed" in canon:
        opts["decoder_sep_pos_embed"] = "decoder_pos_embed_spatial" in canon
    if opts["cls_embed"]:
        # Without a learned token the decoder's class token must come from the encoder (PySlowFast).
        opts["decoder_cls"] = "learned" if "decoder_cls_token" in canon else "encoder"
    heads = {"pyslowfast": dim // 64, "videomae": VIDEOMAE_DECODER_HEADS.get(dim), "mae_st": MAE_ST_DECODER_HEADS}.get(fmt)
    if heads:
        opts["decoder_num_heads"] = heads
        why["decoder_num_heads"] = {
            "pyslowfast": f"PySlowFast's MAE decoder always has decoder_embed_dim // 64 = {heads} heads",
            "videomae": f"VideoMAE's pretrain factories give a {dim}-d decoder {heads} heads",
            "mae_st": f"mae_st's --decoder_num_heads default ({heads}); a run with another value looks the same",
        }[fmt] + " (weights do not record heads)"
    return opts, why


def checkpoint_model_options(state_dict: StateDict) -> dict:
    """Options for `MaskedAutoencoderViT.from_kwargs` (or, encoder ones, `VisionTransformer`) that compute what the checkpoint computed.

    Read from the keys, and from the format's code where weights cannot tell (decoder heads, target
    frames). `init_values`/`decoder_init_values` are `LAYER_SCALE_ON` (any value > 0 would do: the
    checkpoint's gammas are loaded over it) when the checkpoint has layer scale, else 0.
    """
    sd = {k: v for k, v in state_dict.items() if torch.is_tensor(v)}
    fmt = detect_format(sd)
    return release_options(to_canonical(sd, fmt), fmt)[0]


def _decoder_problems(model: nn.Module, canon: StateDict, opts: dict, why: dict[str, str],
                      notes: list[str]) -> list[str]:
    """Ways the model's decoder differs from the one that produced the checkpoint's decoder weights."""
    problems = []
    if "decoder_num_heads" in opts and getattr(model, "decoder_num_heads", None) != opts["decoder_num_heads"]:
        msg = f"decoder_num_heads: this model has {model.decoder_num_heads}, {why['decoder_num_heads']}"
        if "mae_st" in why["decoder_num_heads"]:
            notes.append(msg)  # a flag of mae_st: the caller may know better than the default
        else:
            problems.append(msg)
    if "decoder_cls" in opts and getattr(model, "decoder_cls", "learned") != opts["decoder_cls"]:
        problems.append(f"decoder_cls: this model's is {model.decoder_cls!r}, the checkpoint's is "
                        f"{opts['decoder_cls']!r} ('encoder': decoder_embed of the encoder's class-token output)")
    if opts.get("decoder_sep_pos_embed") is False and getattr(model, "decoder_sep_pos_embed", False):
        problems.append("decoder_sep_pos_embed: the checkpoint's decoder position table is joint; a separable "
                        "table can only approximate it")
    return problems


# ----------------------------------------------------------------------------- adapting and loading
def adapt_to_model(canon: StateDict, model: nn.Module, fmt: str = "ours",
                   load_decoder: bool = True) -> tuple[StateDict, LoadReport]:
    """Fit a canonical state dict to `model`: decoder, norms, positional tables and head; judge the decoder."""
    report = LoadReport(fmt)
    mine = model.state_dict()
    canon = dict(canon)
    opts, why = release_options(canon, fmt)
    has_decoder = any(k.startswith("decoder_") for k in mine)
    take_decoder = has_decoder and load_decoder and _has_decoder(canon)
    if take_decoder:
        report.decoder_problems = _decoder_problems(model, canon, opts, why, report.notes)
        if "decoder_num_heads" in why and not report.decoder_problems:
            report.notes.append(f"decoder heads {opts['decoder_num_heads']}: {why['decoder_num_heads']}")
        if "target_frames" in opts and getattr(model, "target_frames_rule", None) not in (None, opts["target_frames"]):
            report.notes.append(f"target frames: the checkpoint was trained with {opts['target_frames']!r} "
                                f"({why['target_frames']}), this model uses {model.target_frames_rule!r}")
    # Parts the model does not have, or a decoder the caller declined: not loaded, reported as dropped.
    absent = [] if take_decoder else list(DECODER_PREFIXES)
    absent += [p for p in PRETRAINING_ONLY_PREFIXES if not any(k.startswith(p) for k in mine)]
    if not any(k.startswith("head.") for k in mine):
        absent.append("head.")
    for k in [k for k in canon if k.startswith(tuple(absent))]:
        report.dropped.append(k)
        del canon[k]
    # Pretrained encoders end in `norm`. mae_st's (and PySlowFast's) classifier applies that norm to the
    # pooled features, so it becomes our `fc_norm`; VideoMAE's fine-tuning has no place for it (its `norm`
    # is an Identity under mean pooling) and starts `fc_norm` at identity, so it is dropped for that format.
    if "fc_norm.weight" in mine and "norm.weight" not in mine and "fc_norm.weight" not in canon:
        for p in ("weight", "bias"):
            if "norm." + p in canon:
                if fmt == "videomae":
                    report.dropped.append("norm." + p)
                    del canon["norm." + p]
                    identity = torch.ones_like if p == "weight" else torch.zeros_like
                    canon["fc_norm." + p] = identity(mine["fc_norm." + p])
                else:
                    canon["fc_norm." + p] = canon.pop("norm." + p)
        if fmt == "videomae" and "norm.weight" in report.dropped:
            report.notes.append("VideoMAE pretraining `norm` dropped and `fc_norm` kept at identity, as VideoMAE's "
                                "fine-tuning starts")
    grid = tuple(model.patch_embed.grid_size)
    _adapt_pos(canon, model, "", grid, model.patch_embed.proj.out_channels, fmt, report.notes)
    if take_decoder:
        decoder_notes: list[str] = []
        _adapt_pos(canon, model, "decoder_", grid, mine["decoder_embed.weight"].shape[0], fmt, decoder_notes)
        report.notes += decoder_notes
        if not any(p.startswith("decoder_sep_pos_embed") for p in report.decoder_problems):
            report.decoder_problems += [f"decoder position table: {n}" for n in decoder_notes
                                        if "least squares" in n or "approximated" in n]
    for k in [k for k in canon if k in mine and canon[k].shape != mine[k].shape]:
        report.skipped.append(f"{k} {tuple(canon[k].shape)} vs model {tuple(mine[k].shape)}")
        del canon[k]
    report.missing = [k for k in mine if k not in canon]
    report.unexpected = [k for k in canon if k not in mine]
    # An encoder without layer scale into blocks with it: the gammas start at init_values, the
    # recipe of VideoMAE fine-tuning, chosen by the caller. (A decoder's missing gammas make its
    # decoder inexact: judged below with the other decoder keys.)
    gammas = [k for k in report.missing if LAYER_SCALE_KEY.match(k) and not k.startswith("decoder_")]
    if gammas and not _layer_scale(canon, decoder=False):
        report.initialised = gammas
        report.missing = [k for k in report.missing if k not in gammas]
        report.notes.append(f"layer scale: not in the checkpoint; {len(gammas)} encoder gammas keep init_values")
    if has_decoder and not _has_decoder(canon):
        report.notes.append("the checkpoint has no decoder: this model's decoder is new")
    if take_decoder:
        lost = [k for k in report.missing + report.unexpected if k.startswith(DECODER_PREFIXES)]
        lost += [s for s in report.skipped if s.startswith(DECODER_PREFIXES)]
        if lost:
            report.decoder_problems.append(f"decoder weights missing, unexpected or of another shape: {lost}")
    report.suggested = opts
    return {k: v for k, v in canon.items() if k in mine}, report


def convert_state_dict(sd: StateDict, model: nn.Module, load_decoder: bool = True) -> tuple[StateDict, LoadReport]:
    """A flat state dict of any supported format -> (state dict for `model`, report); nothing is loaded yet."""
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    fmt = detect_format(sd)
    return adapt_to_model(to_canonical(sd, fmt), model, fmt, load_decoder)


def _unexpected_hints(keys: list[str], suggested: dict) -> str:
    """What model option would give these weights a place."""
    hints = []
    if any(LAYER_SCALE_KEY.match(k) for k in keys):
        hints.append("the checkpoint has layer scale (blocks.N.gamma_1/gamma_2): build the model with "
                     "init_values > 0 (--init_values; any value, the gammas are loaded)")
    if any(k in ("cls_token", "pos_embed_class") for k in keys):
        hints.append("the checkpoint has a class token: build the model with cls_embed=True (--cls_embed)")
    if any(k.endswith("attn.scale") for k in keys):
        hints.append("attn.scale is VideoMAE v2's cosine attention (--cos_attn), which this project does not "
                     "implement: no model here computes what that checkpoint computes")
    return ("; ".join(hints) + ". ") if hints else ""


def _options_text(opts: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in opts.items())


def load_pretrained(model: nn.Module, state_dict: StateDict, *, source: str = "state dict",
                    strict_encoder: bool = True, allow_unexpected: bool = False,
                    load_decoder: bool = True) -> LoadReport:
    """Load a flat state dict of any supported format into `model` (a ViT classifier or MAE); returns the report.

    Exact or refused, each with its own way out:
    - `strict_encoder`: an encoder weight missing or of the wrong shape raises (the head and decoder
      may be new);
    - `allow_unexpected=False`: a checkpoint weight (outside the decoder) with no place in the model
      raises, naming the keys: without it the model would compute something else;
    - `load_decoder=True`: an MAE takes the checkpoint's decoder only when its own decoder computes
      the same (class token, heads, position table, layer scale), else this raises with the model
      options that would; `load_decoder=False` imports the encoder only and keeps the model's decoder.
      A classifier never takes a decoder.
    The report is logged. Read files with `util.checkpoint.read_weights` (weights-only, our folders included).
    """
    name = source
    sd, report = convert_state_dict(state_dict, model, load_decoder)
    report.log()
    bad_shape = [s for s in report.skipped if not s.startswith(NON_ENCODER_PREFIXES)]
    if strict_encoder and (report.missing_encoder or bad_shape):
        ratio = report.suggested.get("mlp_ratio")
        hint = (f" The checkpoint's MLP ratio is {ratio:.6g} (fc1 width / embed dim; VideoMAE v2 ViT-g: 48/11): "
                f"build the model with mlp_ratio={ratio!r}." if any(".mlp.fc" in s for s in bad_shape) else "")
        raise ValueError(f"{name}: cannot fill the encoder ({report.summary()}); missing: "
                         f"{report.missing_encoder}; wrong shape: {bad_shape}; unexpected: {report.unexpected}.{hint}")
    if report.unexpected_encoder and not allow_unexpected:
        keys = report.unexpected_encoder
        raise ValueError(
            f"{name}: {len(keys)} {report.source_format} weights have no place in this model, so it would not compute "
            f"what the checkpoint computes: {keys}. {_unexpected_hints(keys, report.suggested)}"
            "To load without them anyway, pass allow_unexpected=True (--allow_unexpected_keys).")
    if report.decoder_problems:
        raise ValueError(
            f"{name}: this model's decoder would not compute what the {report.source_format} checkpoint's decoder "
            f"computed: {'; '.join(report.decoder_problems)}. To import the decoder exactly, build the model with "
            f"{_options_text({k: v for k, v in report.suggested.items() if k.startswith('decoder_')})}; or pass "
            "load_decoder=False to import the encoder only and keep this model's new decoder. "
            "Fine-tuning is unaffected: a classifier uses only the encoder.")
    model.load_state_dict(sd, strict=False)
    return report
