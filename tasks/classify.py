"""Supervised video classification: fine-tuning, frozen-feature probes (`--probe linear|attentive`) and testing.

`python main_finetune.py` (demo) or with `--finetune WEIGHTS` from a pretraining run or an official
release (`models/convert.py`). Testing (`util/evaluate.py`) averages the softmax of K temporal x S
spatial views per video. The defaults of the shared flags are MAE-ST's fine-tuning recipe (`DEFAULTS`).
`--probe attentive` trains V-JEPA's attentive probe (models/probe.py), or a grid of them over one frozen
forward pass (`--probe_lrs`, `--probe_wds`), whose best on `--probe_val_split` is tested.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from datasets import DistributedEvalSampler, VideoMixup
from datasets.sampling import FRAME_SAMPLINGS
from models import create_model
from models.convert import load_pretrained
from models.probe import AttentiveProbe, ProbeGrid
from models.vit import to_linear_probe
from tasks.common import TestedTask
from util.config import ConfigError, RunConfig, flag, non_negative, positive, section
from util.errors import DataFileError
from util.evaluate import evaluate, test_and_report
from util.task import RunContext
from util.weights import read_weights

log = logging.getLogger("mae_st.classify")
unit = {"check": lambda x: 0 <= x <= 1, "rule": "in [0, 1]"}


def floats(text: str) -> list[float]:
    """The numbers of a comma-separated flag value ("1e-3,3e-4"; "" -> [])."""
    return [float(x) for x in text.split(",") if x.strip()]


def _float_list_ok(text: str) -> bool:
    """Range check of a comma-separated list: numbers, all >= 0."""
    try:
        return all(x >= 0 for x in floats(text))
    except ValueError:
        return False


@dataclass
class FinetuneConfig:
    """The classifier, where its weights come from, and how it is tested."""

    finetune: str = flag("", "weights to start from: file or checkpoint/output folder")
    allow_unexpected_keys: bool = flag(False, "load --finetune weights even if some have no place in the model "
                                       "(they are dropped, so the model computes something else)")
    num_classes: int = flag(400, "classes of the head", check=positive, rule="> 0")
    drop_path_rate: float = flag(0.1, "stochastic depth of the last block", **unit)
    dropout: float = flag(0.5, "dropout before the classifier", **unit)
    global_pool: bool = flag(True, "mean-pool patch tokens (else class token)")
    linprobe: bool = flag(False, "freeze the encoder; train BatchNorm1d(affine=False) + linear head (as MAE)")
    frame_sampling: str = flag("stride", "frames of a clip: stride (--num_frames frames --sampling_rate apart at 30 "
                               "fps, MAE-ST/Kinetics) or segment (one per equal segment of the whole video, random "
                               "in training, fixed offsets at test: SSv2, docs/downstream.md)",
                               choices=FRAME_SAMPLINGS)
    data_format: str = flag("video", "video list files, or folders of extracted frames (VideoMAE v2 or PySlowFast "
                            "frame lists: --frame_fps, --frame_template; docs/downstream.md)",
                            choices=("video", "frames"))
    eval: bool = flag(False, "only test the weights (--resume, latest or --finetune)")
    dist_eval: bool = flag(True, "shard test videos over ranks (else all on each)")
    eval_split: str = flag("val", "list file to test on (K400 reports on val)")
    eval_label_map: str = flag("", "JSON list of logit columns scored at test (class k of the test list = column "
                               "k), e.g. k710_to_k400.json from datasets.prepare k710: a K710 model scored on K400")
    eval_every: int = flag(5, "epochs between tests during training (0: end only)", check=non_negative, rule=">= 0")
    test_num_temporal_views: int = flag(10, "clips per video along time (mae_st main_test: 10 x 3 views; "
                                        "7: the released results' 7 x 3, docs/recipes.md)",
                                        check=positive, rule="> 0")
    test_num_spatial_crops: int = flag(3, "crops per clip (1: center, 3: l/c/r)", check=positive, rule="> 0")


@dataclass
class ProbeConfig:
    """Frozen-feature probes: the encoder frozen (eval mode, no grad), only a small head trained on its features."""

    probe: str = flag("none", "none: fine-tune; linear: the same as --linprobe; attentive: V-JEPA's attentive probe "
                      "(patch tokens pooled by cross-attention with learned queries, then linear)",
                      choices=("none", "linear", "attentive"))
    probe_queries: int = flag(1, "learned query tokens of the attentive pooler (V-JEPA: 1)", check=positive,
                              rule="> 0")
    probe_blocks: int = flag(0, "self-attention blocks over the tokens before the pooler", check=non_negative,
                             rule=">= 0")
    probe_heads: int = flag(0, "attention heads of the attentive probe (0: the encoder's, as V-JEPA)",
                            check=non_negative, rule=">= 0")
    probe_lrs: str = flag("", "peak lrs of a grid of attentive probes trained on one frozen forward pass, "
                          "comma-separated (sets --lr to the first; '': one probe at the run's lr)",
                          check=_float_list_ok, rule="comma-separated numbers >= 0")
    probe_wds: str = flag("", "weight decays of the grid, each with every lr ('': --weight_decay)",
                          check=_float_list_ok, rule="comma-separated numbers >= 0")
    probe_val_split: str = flag("", "list file on which the grid's best probe (top-1) is chosen before it is "
                                "tested on --eval_split (needed with more than one probe)")


@dataclass
class AugmentConfig:
    """Training augmentation and label mixing (MAE-ST's fine-tuning recipe)."""

    mixup: float = flag(0.8, "mixup alpha (0: off)", check=non_negative, rule=">= 0")
    cutmix: float = flag(1.0, "cutmix alpha (0: off)", check=non_negative, rule=">= 0")
    mixup_prob: float = flag(1.0, "probability of mixing a batch", **unit)
    mixup_switch_prob: float = flag(0.5, "probability of cutmix over mixup", **unit)
    smoothing: float = flag(0.1, "label smoothing", check=lambda x: 0 <= x < 1, rule="in [0, 1)")
    rand_aug: str = flag("rand-m7-n2-mstd0.5-inc1", "timm RandAugment config ('': off)")
    reprob: float = flag(0.25, "random-erasing probability", **unit)
    min_crop_scale: float = flag(0.08, "smallest random-resized-crop area share", check=lambda x: 0 < x <= 1,
                                 rule="in (0, 1]")
    hflip: bool = flag(True, "random horizontal flips (off for direction labels)")


def build_loss(cfg: FinetuneConfig, aug: AugmentConfig) -> tuple[VideoMixup | None, nn.Module]:
    """(mixup/cutmix or None, criterion): soft-target CE with mixing, else (smoothed) CE."""
    if aug.mixup > 0 or aug.cutmix > 0:
        mix = VideoMixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                         switch_prob=aug.mixup_switch_prob, label_smoothing=aug.smoothing, num_classes=cfg.num_classes)
        return mix, SoftTargetCrossEntropy()  # smoothing is already inside the mixed targets
    return None, LabelSmoothingCrossEntropy(aug.smoothing) if aug.smoothing > 0 else nn.CrossEntropyLoss()


class SelectColumns(nn.Module):
    """The model's logits at the given columns only: a K710 model's K400 classes (`--eval_label_map`)."""

    def __init__(self, model: nn.Module, columns: list[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, len(columns)]."""
        return self.model(x)[:, self.columns.to(x.device)]


def read_label_map(path: str, num_classes: int) -> list[int]:
    """The column list of --eval_label_map: distinct integers in [0, num_classes)."""
    try:
        columns = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFileError(f"--eval_label_map {path}: {type(exc).__name__}: {exc}") from None
    if (not isinstance(columns, list) or not columns or len(set(map(str, columns))) != len(columns)
            or not all(isinstance(c, int) and 0 <= c < num_classes for c in columns)):
        raise DataFileError(f"--eval_label_map {path}: expected a JSON list of distinct column indices in "
                            f"[0, {num_classes}) (--num_classes), e.g. [341, 158, ...]")
    return columns


class FinetuneTask(TestedTask):
    """Supervised video classification with multi-view testing."""

    name = "fine-tuning"
    architecture_flags = ("num_classes", "global_pool", "linprobe", "probe", "probe_queries", "probe_blocks",
                          "probe_heads", "probe_lrs", "probe_wds")

    def __init__(self, cfg: FinetuneConfig, aug: AugmentConfig, clips_per_batch: int,
                 probe: ProbeConfig | None = None) -> None:
        self.cfg, self.aug, self.probe = cfg, aug, probe or ProbeConfig()
        self.mixup, self.criterion = build_loss(cfg, aug)
        if self.mixup is not None and clips_per_batch % 2:  # checked before any work
            raise ValueError("mixup/cutmix pair clips within a batch: batch_size x repeat_aug must be even")
        p = self.probe
        if cfg.linprobe and p.probe == "attentive":
            raise ConfigError("--linprobe is the linear probe: use either it or --probe attentive")
        self.kind = "linear" if cfg.linprobe else p.probe  # none, linear or attentive
        self.lrs, self.wds = floats(p.probe_lrs), floats(p.probe_wds)
        if self.kind != "attentive" and (self.lrs or self.wds):
            raise ConfigError("--probe_lrs/--probe_wds make a grid of attentive probes: add --probe attentive")
        self.grid_size = max(len(self.lrs), 1) * max(len(self.wds), 1) if self.kind == "attentive" else 1
        if self.grid_size > 1 and not p.probe_val_split:
            raise ConfigError(f"a grid of {self.grid_size} probes picks its best on a validation split: "
                              "name its list file with --probe_val_split (e.g. val)")
        self.loaders: dict[str, tuple[torch.utils.data.DataLoader, int]] = {}

    def run_overrides(self) -> dict:
        """An attentive probe is not clipped (V-JEPA; one global norm would also couple a grid's probes);
        with --probe_lrs the run's --lr is the first of them (the others are scales of it)."""
        if self.kind != "attentive":
            return {}
        return {"clip_grad": 0.0, **({"lr": self.lrs[0]} if self.lrs else {})}

    def check_run(self, cfg: RunConfig) -> None:
        if self.grid_size > 1 and self.probe.probe_val_split == self.cfg.eval_split:
            log.warning("--probe_val_split is --eval_split (%s): the reported accuracy is that of the best probe "
                        "on the very videos it was chosen on", self.cfg.eval_split)

    def grid(self, weight_decay: float) -> list[tuple[float, float]]:
        """(lr scale against --lr, weight decay) of each probe: every lr with every weight decay."""
        lrs, wds = self.lrs or [None], self.wds or [weight_decay]
        return [(1.0 if lr is None else lr / self.lrs[0], wd) for lr in lrs for wd in wds]

    def evaluate_only(self) -> bool:
        return self.cfg.eval

    def setup(self, ctx: RunContext) -> None:
        if self.cfg.data_format == "frames" and not ctx.cfg.data.data_path:
            raise ValueError("--data_format frames reads frame lists from --data_path (the generated demo is videos)")
        self.data_path = ctx.resolve_data_path()

    def build_model(self, ctx: RunContext) -> nn.Module:
        m, c = ctx.cfg.model, self.cfg
        model = create_model(m.model, num_classes=c.num_classes, img_size=m.input_size, num_frames=m.num_frames,
                             t_patch_size=m.t_patch_size, cls_embed=m.cls_embed, sep_pos_embed=m.sep_pos_embed,
                             drop_path_rate=0.0 if c.linprobe else c.drop_path_rate,
                             dropout=0.0 if c.linprobe else c.dropout, global_pool=c.global_pool,
                             init_values=m.init_values)
        if self.kind == "linear":
            return to_linear_probe(model)
        if self.kind == "attentive":
            p = self.probe
            heads = p.probe_heads or model.blocks[0].attn.num_heads
            head = AttentiveProbe(model.embed_dim, heads, c.num_classes, p.probe_queries, p.probe_blocks)
            return ProbeGrid(model, head, self.grid(ctx.cfg.optim.weight_decay))
        return model

    def init_weights(self, model: nn.Module, ctx: RunContext) -> None:
        if not self.has_start_weights(ctx):
            return
        if isinstance(model, ProbeGrid):
            if self.cfg.eval:
                raise ValueError("--eval of an attentive probe tests a probe run: --resume its checkpoint "
                                 f"(--finetune {self.cfg.finetune} holds no probe)")
            model = model.encoder  # the frozen encoder takes the weights; the probes start fresh
        report = load_pretrained(model, read_weights(self.cfg.finetune), source=self.cfg.finetune,
                                 allow_unexpected=self.cfg.allow_unexpected_keys)
        if self.cfg.eval and any(k.startswith("head") for k in report.missing + report.skipped):
            raise ValueError(f"--eval with --finetune {self.cfg.finetune}: the file has no {self.cfg.num_classes}-way head")

    def build_train_dataset(self, ctx: RunContext) -> torch.utils.data.Dataset:
        a = self.aug  # random erasing draws normal noise in normalised space: the workers normalise
        return ctx.video_dataset(self.data_path, "train", "finetune", rand_aug=a.rand_aug or None,
                                     reprob=a.reprob, hflip=a.hflip, scale=(a.min_crop_scale, 1.0), normalize=True,
                                     num_classes=self.cfg.num_classes, frame_sampling=self.cfg.frame_sampling,
                                     data_format=self.cfg.data_format)

    def loss(self, module: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        clips, target = batch["clips"], batch["label"]
        if self.mixup is not None:
            # timm's Mixup draws from numpy's global RNG: seed it from the per-step torch seed so a
            # resumed run mixes exactly as the uninterrupted one would have.
            np.random.seed(int(torch.randint(0, 2**31 - 1, (1,))))
            clips, target = self.mixup(clips, target)
        if self.kind != "attentive":
            return {"loss": self.criterion(module(clips), target)}
        # Probes share no parameter: the sum's gradient for each is exactly that of its own loss.
        logits = module(clips)  # [B, P, C]
        losses = [self.criterion(logits[:, i], target) for i in range(logits.shape[1])]
        each = {f"loss_probe{i}": loss.detach() for i, loss in enumerate(losses)} if len(losses) > 1 else {}
        return {"loss": torch.stack(losses).sum(), **each}

    def flops_per_clip(self, model: nn.Module) -> float:
        return model.flops_per_clip()["train_step"]

    def test_classes(self) -> int:
        """Classes of the test lists: --num_classes, or the columns --eval_label_map keeps."""
        c = self.cfg
        return len(read_label_map(c.eval_label_map, c.num_classes)) if c.eval_label_map else c.num_classes

    def loader(self, ctx: RunContext, split: str) -> tuple[torch.utils.data.DataLoader, int, bool]:
        """(multi-view loader, videos, whether its clips arrive normalised) of a list file; built once."""
        c = self.cfg
        if split not in self.loaders:
            # With --eval_label_map the test lists are in the mapped label space (a K710 model scored on K400).
            ds = ctx.video_dataset(self.data_path, split, "test", num_temporal_views=c.test_num_temporal_views,
                                   num_spatial_crops=c.test_num_spatial_crops, num_classes=self.test_classes(),
                                   frame_sampling=c.frame_sampling, data_format=c.data_format)
            # With --no-dist_eval every rank tests everything and only rank 0's scores count.
            world, rank = (ctx.dist.world_size, ctx.dist.rank) if c.dist_eval else (1, 0)
            batch = ctx.cfg.loop.batch_size * ctx.cfg.data.repeat_aug
            loader = ctx.make_loader(ds, DistributedEvalSampler(len(ds), world, rank), batch, train=False)
            self.loaders[split] = (loader, len(ds.samples), ds.normalize)
        return self.loaders[split]

    def choose_probe(self, ctx: RunContext, tag: str) -> int:
        """The grid's best probe by top-1 on --probe_val_split (the first on ties); one frozen pass for all
        (collective); rank 0 logs every probe and writes OUT/probe_grid.json."""
        c, split = self.cfg, self.probe.probe_val_split
        loader, videos, normalized = self.loader(ctx, split)
        res = evaluate(ctx.backend.module, loader, videos, c.num_classes, ctx.dist.device, ctx.backend.precision,
                       expected_views=c.test_num_temporal_views * c.test_num_spatial_crops, sharded=c.dist_eval,
                       prepare=lambda b: ctx.prepare(b, normalize=not normalized), heads=self.grid_size)
        top1 = [h["top1"] for h in res["heads"]]
        best = max(range(len(top1)), key=lambda i: (top1[i], -i))
        rows = [{"probe": i, "lr": ctx.cfg.optim.lr * s if ctx.cfg.optim.lr else None, "lr_scale": s,
                 "weight_decay": wd, "top1": h["top1"], "top5": h["top5"]}
                for i, ((s, wd), h) in enumerate(zip(self.grid(ctx.cfg.optim.weight_decay), res["heads"],
                                                     strict=True))]
        if ctx.dist.is_main:
            for r in rows:
                log.info("probe %d (lr scale %g, wd %g): %s top-1 %.3f top-5 %.3f", r["probe"], r["lr_scale"],
                         r["weight_decay"], split, r["top1"], r["top5"])
            log.info("best probe on %s: %d (top-1 %.3f); testing it on %s", split, best, top1[best], c.eval_split)
            (ctx.out / "probe_grid.json").write_text(json.dumps({"tag": tag, "split": split, "videos": res["videos"],
                                                                 "chosen": best, "probes": rows}, indent=1))
        if ctx.logger is not None:
            ctx.logger.scalars(ctx.state.global_step, {f"probe{i}_top1": t for i, t in enumerate(top1)},
                               prefix=f"{split}/")
        return best

    def test(self, ctx: RunContext, tag: str) -> dict:
        """Multi-view test of the current weights on --eval_split (collective); logged and written by rank 0.

        A grid of probes first picks its best on --probe_val_split, and only that one is tested.
        """
        c = self.cfg
        best = self.choose_probe(ctx, tag) if self.grid_size > 1 else None
        loader, videos, normalized = self.loader(ctx, c.eval_split)
        names = Path(self.data_path, "classes.txt")
        # one name per line: SSv2's class names are sentences ("Pushing something from left to right")
        names = [n.strip() for n in names.read_text().splitlines() if n.strip()] if names.is_file() else None
        columns = read_label_map(c.eval_label_map, c.num_classes) if c.eval_label_map else None
        classes = self.test_classes()
        module = SelectColumns(ctx.backend.module, columns) if columns else ctx.backend.module
        with selected_probe(ctx.backend.unwrapped, 0 if self.kind == "attentive" and best is None else best):
            metrics = test_and_report(
                module, loader, videos, classes, ctx.dist.device, ctx.dist.is_main, ctx.out,
                c.eval_split, tag, c.test_num_temporal_views * c.test_num_spatial_crops, c.dist_eval,
                ctx.backend.precision, lambda b: ctx.prepare(b, normalize=not normalized),
                names if names and len(names) == classes else None)
        if best is not None:
            metrics["probe"] = best
        if ctx.logger is not None:
            ctx.logger.scalars(ctx.state.global_step, metrics, prefix=f"{c.eval_split}/")
        return metrics


@contextlib.contextmanager
def selected_probe(model: nn.Module, index: int | None) -> Iterator[None]:
    """Within the block a `ProbeGrid` returns only probe `index`'s logits [B, C] (nothing for other models)."""
    if index is None or not isinstance(model, ProbeGrid):
        yield
        return
    model.selected = index
    try:
        yield
    finally:
        model.selected = None


SECTIONS = (("fine-tuning and evaluation", FinetuneConfig), ("frozen-feature probes", ProbeConfig),
            ("augmentation", AugmentConfig))
# The ViT-L recipe of the official FINETUNE.md for the shared flags.
DEFAULTS = dict(model="vit_large_patch16", epochs=50, warmup_epochs=5, blr=1e-3, min_lr=1e-6, repeat_aug=2,
                clip_grad=5.0, save_every=0, opt_betas=[0.9, 0.999], layer_decay=0.75, wd_skip="tokens")


def make_task(args: argparse.Namespace) -> FinetuneTask:
    """The fine-tuning task of parsed flags."""
    return FinetuneTask(section(FinetuneConfig, args), section(AugmentConfig, args), args.batch_size * args.repeat_aug,
                        section(ProbeConfig, args))
