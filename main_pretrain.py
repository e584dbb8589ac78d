"""MAE-ST pretraining: masked spacetime autoencoding of video clips.

    python main_pretrain.py                                   # CPU demo on generated video
    torchrun --nproc_per_node 8 main_pretrain.py --config configs/pretrain/vit_l_k400.yaml --data_path DIR

With no `--config`, `configs/pretrain/demo.yaml` is used. This file is the pretraining flags and the
pretraining task; the run loop they plug into (resume, backends, logging, saving) is `util/trainer.py`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from datasets.image_folder import build_image_folder_dataset
from models import create_model
from models.convert import load_pretrained
from models.masking import MASK_TYPES
from util.checkpoint import read_weights
from util.config import (
    add_flags,
    add_run_flags,
    flag,
    flag_values,
    non_negative,
    parse_args,
    positive,
    run_config,
    section,
)
from util.trainer import Task, Trainer
from util.visualize import save_reconstruction

DEMO_CONFIG = str(Path(__file__).resolve().parent / "configs" / "pretrain" / "demo.yaml")


@dataclass
class PretrainConfig:
    """What the encoder learns from, and what the masked autoencoder hides and predicts."""

    objective: str = flag("mae", "pretraining objective: mae (masked spacetime autoencoding, MAE-ST)",
                          choices=("mae",))
    mask_ratio: float = flag(0.9, "share of tokens hidden from the encoder", check=lambda r: 0 < r < 1, rule="in (0, 1)")
    mask_type: str = flag("random", "mask sampler; adaptive: AdaMAE's learned sampler", choices=sorted(MASK_TYPES))
    sampler_loss_weight: float = flag(1e-4, "weight of the adaptive sampler's loss", check=non_negative, rule=">= 0")
    decoder_mask_ratio: float = flag(0.0, "share of hidden tokens the decoder skips (running cell; 0.5 recommended)",
                                     check=lambda r: 0 <= r < 1, rule="in [0, 1)")
    data_format: str = flag("video", "video list files, or class folders of images (image MAE, num_frames 1)",
                            choices=("video", "image_folder"))
    norm_pix_loss: bool = flag(True, "regress per-patch normalised pixels")
    pred_t_dim: int = flag(8, "frames the decoder predicts (every T/pred_t_dim-th)", check=positive, rule="> 0")
    trunc_init: bool = flag(False, "trunc-normal instead of xavier init")
    decoder_embed_dim: int = flag(512, "decoder width", check=positive, rule="> 0")
    decoder_depth: int = flag(4, "decoder blocks", check=positive, rule="> 0")
    decoder_num_heads: int = flag(16, "decoder attention heads", check=positive, rule="> 0")
    decoder_init_values: float | None = flag(None, "layer scale in the decoder blocks; default: --init_values",
                                             check=non_negative, rule=">= 0")
    decoder_cls: str = flag("learned", "decoder class token: learned (mae_st code) or decoder_embed of the encoder's "
                            "class output (PySlowFast, released MAE-ST weights)", choices=("learned", "encoder"))
    decoder_sep_pos_embed: bool | None = flag(None, "separable decoder position table; default: --sep_pos_embed; "
                                              "PySlowFast's is joint")
    target_frames: str = flag("stride", "frames the decoder regresses: every T/pred_t_dim-th (PySlowFast, released "
                              "weights) or linspace(0, T-1, pred_t_dim) (mae_st code)", choices=("stride", "linspace"))
    vis_every: int = flag(1, "epochs between reconstruction images (0: off)", check=non_negative, rule=">= 0")
    init_from: str = flag("", "start a fresh run from these weights (file or run folder; weights only)")


class PretrainTask(Task):
    """MAE-ST: reconstruct the hidden spacetime patches of each clip."""

    name = "MAE pretraining"
    architecture_flags = ("objective", "pred_t_dim", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mask_type",
                          "decoder_init_values", "decoder_cls", "decoder_sep_pos_embed")

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg

    def setup(self, trainer: Trainer) -> None:
        self.data_path = trainer.resolve_data_path(image_folder=self.cfg.data_format == "image_folder")

    def build_model(self, trainer: Trainer) -> torch.nn.Module:
        m, c = trainer.cfg.model, self.cfg
        self.model = create_model(
            m.model, img_size=m.input_size, num_frames=m.num_frames, t_patch_size=m.t_patch_size,
            cls_embed=m.cls_embed, sep_pos_embed=m.sep_pos_embed, pred_t_dim=c.pred_t_dim, mask_type=c.mask_type,
            sampler_loss_weight=c.sampler_loss_weight, decoder_mask_ratio=c.decoder_mask_ratio,
            norm_pix_loss=c.norm_pix_loss, trunc_init=c.trunc_init, decoder_embed_dim=c.decoder_embed_dim,
            decoder_depth=c.decoder_depth, decoder_num_heads=c.decoder_num_heads, init_values=m.init_values,
            decoder_init_values=c.decoder_init_values, decoder_cls=c.decoder_cls,
            decoder_sep_pos_embed=c.decoder_sep_pos_embed, target_frames=c.target_frames,
        )
        return self.model

    def init_weights(self, model: torch.nn.Module, trainer: Trainer) -> None:
        if self.cfg.init_from:
            load_pretrained(model, read_weights(self.cfg.init_from), source=self.cfg.init_from)

    def build_train_dataset(self, trainer: Trainer) -> torch.utils.data.Dataset:
        m, d, tokens = trainer.cfg.model, trainer.cfg.data, self.model.patch_embed.num_patches
        if self.cfg.data_format == "image_folder":
            self.dataset = build_image_folder_dataset(
                self.data_path, "train", crop_size=m.input_size, repeat_aug=d.repeat_aug, seed=trainer.cfg.loop.seed,
                mask_noise_tokens=tokens, normalize=not trainer.normalize_on_device)
        else:
            self.dataset = trainer.video_dataset(self.data_path, "train", "pretrain", mask_noise_tokens=tokens)
        return self.dataset

    def loss(self, module: torch.nn.Module, batch: dict) -> torch.Tensor | tuple[torch.Tensor, dict]:
        loss = module(batch["clips"], self.cfg.mask_ratio, batch["noise"])[0]
        # The adaptive sampler leaves its entropy and loss on the plain model (the same object when wrapped).
        return (loss, self.model.sampler_metrics) if self.cfg.mask_type == "adaptive" else loss

    def flops_per_clip(self, model: torch.nn.Module) -> float:
        return model.flops_per_clip(self.cfg.mask_ratio)["train_step"]

    def on_epoch_end(self, trainer: Trainer) -> None:
        """A reconstruction grid of a fixed clip and mask: OUT/vis/epoch-N.png and TensorBoard."""
        epoch = trainer.state.epoch
        if not self.cfg.vis_every or (epoch + 1) % self.cfg.vis_every:
            return
        if not hasattr(self, "vis"):  # the first training video, whole frames (no crop), a fixed mask
            ds = self.dataset if self.cfg.data_format == "image_folder" else trainer.video_dataset(
                self.data_path, "train", "test", num_temporal_views=1, num_spatial_crops=1)
            clips = ds[(0, 0)]["clips"][:1]
            noise = torch.rand(1, self.model.patch_embed.num_patches, generator=torch.Generator().manual_seed(0))
            self.vis = trainer.prepare({"clips": clips, "noise": noise}, normalize=not ds.normalize)
        path = trainer.out / "vis" / f"epoch-{epoch:04d}.png" if trainer.dist.is_main else None
        grid = save_reconstruction(trainer.backend.module, self.model, self.vis["clips"], self.vis["noise"],
                                   self.cfg.mask_ratio, path, trainer.backend.precision)
        trainer.logger.image("reconstruction", grid, trainer.state.global_step)


def get_args_parser() -> argparse.ArgumentParser:
    """Every pretraining flag: the shared run sections (util.config) and the MAE's own."""
    parser = argparse.ArgumentParser("MAE-ST pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_flags(parser)
    return add_flags(parser, PretrainConfig, "masked autoencoder")


def build_task(args: argparse.Namespace) -> Task:
    """The task of --objective, from its flags."""
    cfg = section(PretrainConfig, args)
    return PretrainTask(cfg)


def main(args: argparse.Namespace) -> dict:
    """Pretrain (or with --bench, measure); returns a summary (final step, outputs)."""
    return Trainer(run_config(args), build_task(args), flag_values(args, get_args_parser())).fit()


if __name__ == "__main__":
    main(parse_args(get_args_parser(), sys.argv[1:], default_config=DEMO_CONFIG))
