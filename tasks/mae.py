"""The MAE family: MAE-ST (random, tube, frame or cube masking), AdaMAE's learned sampler, AMT.

`python main_pretrain.py` (the default `--objective mae`). The task builds a `mae_*` model from the
masking and decoder sections, reads list-file videos (or image folders: the image MAE), and writes a
reconstruction grid of a fixed clip and mask after every `--vis_every` epochs. AMT's per-video
attention table is refreshed here every `--amt_refresh_epochs` after `--amt_warmup_epochs`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from torch import nn

from datasets.amt_views import CanonicalViews
from datasets.image_folder import build_image_folder_dataset
from datasets.mixture import Mixture, load_mixture, mixture_fingerprint
from models import create_model
from models.amt import clip_attention_weights
from tasks.common import MaskingConfig, StartConfig, load_start_weights
from util.config import ConfigError, RunConfig, flag, non_negative, positive, section
from util.cross_rank import all_gather_cat
from util.task import RunContext, Task
from util.visualize import save_reconstruction

DEMO_CONFIG = "demo.yaml"


@dataclass
class MAEConfig:
    """The masked autoencoder's own options: learned masking (AdaMAE, AMT), decoder masking, targets, images."""

    sampler_loss_weight: float = flag(1e-4, "weight of the adaptive sampler's loss", check=non_negative, rule=">= 0")
    throw_ratio: float = flag(0.4, "amt: share of all tokens thrown, out of the hidden ones (in neither encoder, "
                              "decoder nor loss); the rest of the hidden ones are reconstructed",
                              check=lambda r: 0 <= r < 1, rule="in [0, 1)")
    amt_warmup_epochs: int = flag(40, "amt: epochs before the first attention pass (until then uniform weights: "
                                  "random masking and throwing)", check=positive, rule=">= 1")
    amt_refresh_epochs: int = flag(40, "amt: epochs between attention passes over the training videos",
                                   check=positive, rule=">= 1")
    decoder_mask_ratio: float = flag(0.0, "share of the decoder's positions it skips (VideoMAE v2 running cell; "
                                     "0.5 recommended)", check=lambda r: 0 <= r < 1, rule="in [0, 1)")
    decoder_mask_type: str = flag("run_cell", "decoder masking: run_cell (VideoMAE v2: 2x2 cells alternating rows "
                                  "and diagonals, phase per sample, mask tokens at every kept position) or "
                                  "rotating_hidden (the earlier variant: a cell edge rotating over the hidden "
                                  "tokens only)", choices=("run_cell", "rotating_hidden"))
    data_format: str = flag("video", "video list files, folders of extracted frames (VideoMAE v2 or PySlowFast "
                            "frame lists, docs/downstream.md), or class folders of images (image MAE, num_frames 1)",
                            choices=("video", "frames", "image_folder"))
    trunc_init: bool = flag(False, "trunc-normal instead of xavier init")
    decoder_init_values: float | None = flag(None, "layer scale in the decoder blocks; default: --init_values",
                                             check=non_negative, rule=">= 0")
    decoder_cls: str = flag("learned", "decoder class token: learned (mae_st code) or decoder_embed of the encoder's "
                            "class output (PySlowFast, released MAE-ST weights)", choices=("learned", "encoder"))
    decoder_sep_pos_embed: bool | None = flag(None, "separable decoder position table; default: --sep_pos_embed; "
                                              "PySlowFast's is joint")
    target_frames: str = flag("stride", "frames the decoder regresses: every T/pred_t_dim-th (PySlowFast, released "
                              "weights) or linspace(0, T-1, pred_t_dim) (mae_st code)", choices=("stride", "linspace"))
    data_mixture: str = flag("", "YAML file of data sources mixed by weight, each with its own sampling "
                             "(docs/data.md); replaces --data_path")
    vis_every: int = flag(1, "epochs between reconstruction images (0: off)", check=non_negative, rule=">= 0")


SECTIONS = (("pretraining", StartConfig), ("masking and decoder", MaskingConfig),
            ("masked autoencoder (MAE-ST, AdaMAE, AMT)", MAEConfig))


class MAETask(Task):
    """MAE-ST: reconstruct the hidden spacetime patches of each clip."""

    name = "MAE pretraining"
    architecture_flags = ("objective", "pred_t_dim", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mask_type",
                          "decoder_init_values", "decoder_cls", "decoder_sep_pos_embed")

    def __init__(self, start: StartConfig, masking: MaskingConfig, cfg: MAEConfig) -> None:
        self.start, self.masking, self.cfg = start, masking, cfg
        self.amt = masking.mask_type == "amt"
        if self.amt and cfg.data_format != "video":
            raise ConfigError("--mask_type amt places each clip in its video's attention map: it needs "
                              "--data_format video")
        self.vis: dict | None = None  # the fixed clip and mask of the reconstruction images (made once)
        self.mixture: Mixture | None = None
        if cfg.data_mixture:  # read and checked now: a bad file stops the run before any work
            if self.amt or cfg.data_format != "video":
                raise ConfigError("--data_mixture mixes list files whose format each source names (data_format: "
                                  "video or frames, in the mixture file): leave --data_format at video, and use a "
                                  "mask type other than amt")
            self.mixture = load_mixture(cfg.data_mixture)

    def check_run(self, cfg: RunConfig) -> None:
        """A mixture replaces --data_path, and its blocks must hold whole batches."""
        if self.mixture is None:
            return
        if cfg.data.data_path:
            raise ConfigError(f"--data_mixture {self.mixture.path} names the data: leave out --data_path "
                              f"({cfg.data.data_path})")
        if self.mixture.block_size % cfg.loop.batch_size:
            raise ConfigError(f"{self.mixture.path}: block_size {self.mixture.block_size} is not a multiple of "
                              f"--batch_size {cfg.loop.batch_size}, so a batch could mix sources; make block_size a "
                              f"multiple of it")

    def data_fingerprint(self) -> dict | None:
        """The mixture's fingerprint (datasets/mixture.py), recorded in checkpoints; None without a mixture."""
        return None if self.mixture is None else mixture_fingerprint(self.mixture)

    def setup(self, ctx: RunContext) -> None:
        if self.mixture is not None:  # the sources name their data: nothing to find or generate
            self.data_path = ""
            return
        self.data_path = ctx.resolve_data_path(image_folder=self.cfg.data_format == "image_folder")

    def build_model(self, ctx: RunContext) -> nn.Module:
        m, k, c = ctx.cfg.model, self.masking, self.cfg
        videos = len(ctx.video_dataset(self.data_path, "train", "pretrain")) if self.amt else 0  # a table row each
        self.model = create_model(
            m.model, img_size=m.input_size, num_frames=m.num_frames, t_patch_size=m.t_patch_size,
            cls_embed=m.cls_embed, sep_pos_embed=m.sep_pos_embed, pred_t_dim=k.pred_t_dim, mask_type=k.mask_type,
            sampler_loss_weight=c.sampler_loss_weight, decoder_mask_ratio=c.decoder_mask_ratio,
            decoder_mask_type=c.decoder_mask_type, norm_pix_loss=k.norm_pix_loss, trunc_init=c.trunc_init,
            decoder_embed_dim=k.decoder_embed_dim, decoder_depth=k.decoder_depth, decoder_num_heads=k.decoder_num_heads,
            init_values=m.init_values, decoder_init_values=c.decoder_init_values, decoder_cls=c.decoder_cls,
            decoder_sep_pos_embed=c.decoder_sep_pos_embed, target_frames=c.target_frames,
            throw_ratio=c.throw_ratio if self.amt else 0.0, amt_num_videos=videos,
        )
        return self.model

    def init_weights(self, model: nn.Module, ctx: RunContext) -> None:
        if self.start.init_from:
            load_start_weights(model, self.start)

    def optimizer_source(self) -> str:
        return self.start.init_from

    def build_train_dataset(self, ctx: RunContext) -> torch.utils.data.Dataset:
        m, d, tokens = ctx.cfg.model, ctx.cfg.data, self.model.patch_embed.num_patches
        if self.cfg.data_format == "image_folder":
            self.dataset = build_image_folder_dataset(
                self.data_path, "train", crop_size=m.input_size, repeat_aug=d.repeat_aug, seed=ctx.cfg.loop.seed,
                mask_noise_tokens=tokens, normalize=not ctx.normalize_on_device)
        elif self.mixture is not None:
            self.dataset = ctx.mixture_dataset(self.mixture, mask_noise_tokens=tokens)
        else:
            self.dataset = ctx.video_dataset(self.data_path, "train", "pretrain", mask_noise_tokens=tokens,
                                             data_format=self.cfg.data_format)
        return self.dataset

    def loss(self, module: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        attention = None
        if self.amt:  # each clip's tokens read their video's map through the clip's geometry
            m = self.model
            attention = clip_attention_weights(m.amt_attention[batch["index"]].float() / 255, batch["geometry"],
                                               m.grid_size, m.patch_embed.t_patch_size,
                                               self.dataset.sampling_rate / self.dataset.target_fps, m.num_frames)
        loss, _, _, aux = module(batch["clips"], self.masking.mask_ratio, batch["noise"], attention=attention,
                                 return_aux=True)
        return {"loss": loss, **aux["metrics"]}  # the adaptive sampler's loss and entropy, to log

    def flops_per_clip(self, model: nn.Module) -> float:
        return model.flops_per_clip(self.masking.mask_ratio)["train_step"]

    def on_epoch_end(self, ctx: RunContext) -> None:
        """AMT's attention pass when due; a reconstruction grid of a fixed clip and mask: OUT/vis/epoch-N.png."""
        epoch, c = ctx.state.epoch, self.cfg
        done = epoch + 1
        if (self.amt and done >= c.amt_warmup_epochs and (done - c.amt_warmup_epochs) % c.amt_refresh_epochs == 0
                and done < ctx.cfg.loop.epochs):
            views = CanonicalViews(self.dataset.samples, ctx.cfg.model.num_frames, ctx.cfg.model.input_size,
                                   normalize=self.dataset.normalize)
            refresh_amt_attention(ctx, views, self.model.amt_attention,
                                  ctx.cfg.loop.batch_size * ctx.cfg.data.repeat_aug)
        if not c.vis_every or done % c.vis_every:
            return
        if self.vis is None:  # the first training video (of the first source), whole frames, a fixed mask
            if self.mixture is not None:
                first = self.mixture.sources[0]
                ds = ctx.list_dataset(first.list_file, first.root, "test", num_temporal_views=1, num_spatial_crops=1,
                                      **{k: v for k, v in first.sampling.items() if k != "repeat_aug"})
            elif c.data_format == "image_folder":
                ds = self.dataset
            else:
                ds = ctx.video_dataset(self.data_path, "train", "test", num_temporal_views=1, num_spatial_crops=1,
                                       data_format=c.data_format)
            clips = ds[(0, 0)]["clips"][:1]
            noise = torch.rand(1, self.model.patch_embed.num_patches, generator=torch.Generator().manual_seed(0))
            self.vis = ctx.prepare({"clips": clips, "noise": noise}, normalize=not ds.normalize)
        path = ctx.out / "vis" / f"epoch-{epoch:04d}.png" if ctx.dist.is_main else None
        grid = save_reconstruction(ctx.backend.module, self.model, self.vis["clips"], self.vis["noise"],
                                   self.masking.mask_ratio, path, ctx.backend.precision)
        ctx.logger.image("reconstruction", grid, ctx.state.global_step)


@torch.no_grad()
def refresh_amt_attention(ctx: RunContext, dataset: torch.utils.data.Dataset, table: torch.Tensor,
                          batch_size: int) -> None:
    """Fill `table` [N, t, h, w] (uint8, 255 = 1) with every video's [CLS] attention over its canonical view.

    Rank r takes the r-th contiguous share of the videos, padded with its last one so that every rank
    runs the same number of forwards (FSDP2 and ZeRO-3 gather parameters collectively); the shares
    are all-gathered in rank order, so every rank holds the same table. Unreadable videos keep 255.
    """
    n, world, rank = len(dataset), ctx.dist.world_size, ctx.dist.rank
    share = math.ceil(n / world)
    mine = list(range(rank * share, min((rank + 1) * share, n)))
    indices = mine + [mine[-1] if mine else 0] * (share - len(mine))
    loader = ctx.make_loader(dataset, indices, batch_size, train=False)
    module = ctx.backend.module
    was_training = module.training
    module.eval()
    rows = []
    for batch in loader:
        batch = ctx.prepare(batch, normalize=not getattr(dataset, "normalize", True))
        with ctx.backend.precision():
            weights = module(batch["clips"], return_cls_attention=True)
        weights = (weights.float().clamp(0, 1) * 255).round().to(torch.uint8)
        rows.append(torch.where(batch["valid"][:, None], weights, torch.full_like(weights, 255)))
    module.train(was_training)
    full = all_gather_cat(torch.cat(rows))[:n] if rows else table.new_full((0, table[0].numel()), 255)
    table.copy_(full.view_as(table).to(table.device))


def make_task(args: argparse.Namespace) -> MAETask:
    """The MAE task of parsed flags."""
    return MAETask(*(section(cls, args) for _, cls in SECTIONS))
