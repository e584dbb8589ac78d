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

from datasets import build_video_dataset
from datasets.captions import CaptionList
from datasets.image_folder import build_image_folder_dataset
from models import create_model
from models.convert import load_pretrained
from models.masking import MASK_TYPES
from models.videotext import videotext_loss, videotext_model
from util import videotext as vt
from util.checkpoint import read_weights
from util.config import (
    ConfigError,
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
from util.gather import RankGather
from util.trainer import Task, Trainer
from util.visualize import save_reconstruction

DEMO_CONFIG = str(Path(__file__).resolve().parent / "configs" / "pretrain" / "demo.yaml")


@dataclass
class PretrainConfig:
    """What the encoder learns from, and what the masked autoencoder hides and predicts."""

    objective: str = flag("mae", "pretraining objective: mae (masked spacetime autoencoding, MAE-ST); videotext "
                          "(masked video-text contrastive: FLIP/MAC, + MAE loss: SMAUG)", choices=("mae", "videotext"))
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
            self.dataset = build_video_dataset(
                self.data_path, "train", data_root=d.data_root or self.data_path, mode="pretrain",
                num_frames=m.num_frames, sampling_rate=d.sampling_rate, crop_size=m.input_size,
                repeat_aug=d.repeat_aug, seed=trainer.cfg.loop.seed, mask_noise_tokens=tokens,
                normalize=not trainer.normalize_on_device,
                short_side_range=None if m.input_size < 160 else (256, 320))
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
        item = trainer.prepare({k: v[:1] for k, v in self.dataset[(0, 0)].items() if k in ("clips", "noise")})
        path = trainer.out / "vis" / f"epoch-{epoch:04d}.png" if trainer.dist.is_main else None
        grid = save_reconstruction(trainer.backend.module, self.model, item["clips"], item["noise"],
                                   self.cfg.mask_ratio, path, trainer.backend.precision)
        trainer.logger.image("reconstruction", grid, trainer.state.global_step)


@dataclass
class VideoTextConfig:
    """--objective videotext: captions, text tower, contrastive head, SMAUG's MAE loss, evaluation."""

    train_captions: str = flag("train_captions.csv", "caption list (CSV with a header) of the training videos, in "
                               "--data_path")
    caption_video_column: str = flag("video", "video column of the caption lists (comma list: the first present)")
    caption_text_column: str = flag("caption", "caption column of the caption lists (comma list: the first present)")
    caption_path_format: str = flag("{}", "video path of a row, relative to --data_path: {} is the video column, "
                                    "{name} any column (WebVid: {page_dir}/{}.mp4)")
    tokenizer: str = flag("bpe", "bpe: learned from the training captions (Hugging Face tokenizers); byte: UTF-8",
                          choices=("bpe", "byte"))
    vocab_size: int = flag(1000, "largest BPE vocabulary", check=lambda v: v > 4, rule="> 4")
    context_length: int = flag(32, "caption ids incl. [SOT] and [EOT] (FLIP: 32)", check=lambda n: n >= 3, rule=">= 3")
    text_width: int = flag(512, "text Transformer width", check=positive, rule="> 0")
    text_depth: int = flag(12, "text Transformer blocks", check=positive, rule="> 0")
    text_heads: int = flag(8, "text Transformer heads", check=positive, rule="> 0")
    text_causal: bool = flag(True, "causal text attention (CLIP); FLIP's text encoder is bidirectional")
    text_pool: str = flag("eot", "caption feature: [EOT] output (CLIP), first output (FLIP, with --no-text_causal) "
                          "or mean", choices=("eot", "first", "mean"))
    text_mask_ratio: float = flag(0.0, "share of each caption's ids dropped in training (FLIP's and MAC's text "
                                  "masking)", check=lambda r: 0 <= r < 1, rule="in [0, 1)")
    video_pool: str = flag("mean", "video feature: mean of the encoder outputs (FLIP) or class token",
                           choices=("mean", "cls"))
    embed_dim: int = flag(512, "joint embedding width", check=positive, rule="> 0")
    temperature: float = flag(0.07, "initial softmax temperature (learned; at least 0.01)",
                              check=lambda t: 0.01 <= t <= 1, rule="in [0.01, 1]")
    hflip: bool = flag(False, "random horizontal flips (off: they swap left and right in the captions)")
    mae_loss_weight: float = flag(0.0, "SMAUG: weight of the MAE reconstruction loss on the same encoder pass "
                                  "(> 0 builds the decoder)", check=non_negative, rule=">= 0")
    sparsify_keep: float = flag(1.0, "SMAUG token sparsification: share of visible tokens kept after "
                                "--sparsify_layer, the rest fused into one (1: off)", check=lambda k: 0 < k <= 1,
                                rule="in (0, 1]")
    sparsify_layer: int = flag(0, "encoder block after which tokens are dropped (0: depth // 3)", check=non_negative,
                               rule=">= 0")
    unmasked_epochs: int = flag(0, "FLIP's unmasked tuning: the last N epochs see every token", check=non_negative,
                                rule=">= 0")
    eval: str = flag("", "only test the run's weights (--output_dir's latest or --resume): retrieval, zeroshot or all",
                     choices=("", "retrieval", "zeroshot", "all"))
    eval_captions: str = flag("test_captions.csv", "retrieval caption list in --data_path (or absolute)")
    eval_caption_path_format: str = flag("", "--caption_path_format of --eval_captions (default: the same)")
    eval_list: str = flag("test.csv", "zero-shot videos: `path label` list in --data_path (or absolute)")
    class_prompts: str = flag("class_prompts.json", "zero-shot prompts: JSON {class name: [prompt, ...]} in "
                              "--data_path; class order from classes.txt there, else the file's")
    eval_temporal_views: int = flag(2, "test clips per video along time (embeddings averaged)", check=positive,
                                    rule="> 0")
    eval_spatial_crops: int = flag(1, "test crops per clip (1: center, 3: l/c/r)", check=positive, rule="> 0")
    eval_examples: int = flag(6, "query captions shown in OUT/retrieval_examples.png", check=positive, rule="> 0")


class VideoTextTask(Task):
    """A dual encoder (MAE-ST video tower on visible tokens, text Transformer) trained with InfoNCE (+ MAE loss)."""

    name = "video-text pretraining"
    architecture_flags = ("objective", "vocab_size", "context_length", "text_width", "text_depth", "text_heads",
                          "text_causal", "text_pool", "video_pool", "embed_dim", "mae_loss_weight", "sparsify_keep",
                          "sparsify_layer", "tokenizer", "pred_t_dim", "decoder_embed_dim", "decoder_depth",
                          "decoder_num_heads")

    def __init__(self, cfg: VideoTextConfig, pre: PretrainConfig) -> None:
        self.cfg, self.pre, self.cross_rank = cfg, pre, RankGather()

    def setup(self, trainer: Trainer) -> None:
        self.trainer, self.root = trainer, vt.data_path(trainer)  # checks --repeat_aug 1, generates demo data
        self.tokenizer = vt.run_tokenizer(trainer, self.cfg, self.pre.init_from, lambda: self.captions().all_captions())

    def captions(self) -> CaptionList:
        """The training caption list."""
        return vt.caption_list(self.cfg, self.root, self.cfg.train_captions)

    def build_model(self, trainer: Trainer) -> torch.nn.Module:
        m, c, p = trainer.cfg.model, self.cfg, self.pre
        self.model = videotext_model(
            m.model, self.tokenizer.vocab_size, context_length=c.context_length, text_width=c.text_width,
            text_depth=c.text_depth, text_heads=c.text_heads, text_causal=c.text_causal, text_pool=c.text_pool,
            embed_dim=c.embed_dim, video_pool=c.video_pool, temperature=c.temperature, mae_decoder=c.mae_loss_weight > 0,
            sparsify_keep=c.sparsify_keep, sparsify_layer=c.sparsify_layer, img_size=m.input_size,
            num_frames=m.num_frames, t_patch_size=m.t_patch_size, cls_embed=m.cls_embed, sep_pos_embed=m.sep_pos_embed,
            init_values=m.init_values, mask_type=p.mask_type, norm_pix_loss=p.norm_pix_loss,
            pred_t_dim=p.pred_t_dim if c.mae_loss_weight > 0 else m.num_frames // m.t_patch_size,  # no decoder: any
            decoder_embed_dim=p.decoder_embed_dim, decoder_depth=p.decoder_depth, decoder_num_heads=p.decoder_num_heads)
        return self.model

    def init_weights(self, model: torch.nn.Module, trainer: Trainer) -> None:
        if self.pre.init_from:  # a video-text run (every weight), else MAE-ST weights for the video tower
            sd = read_weights(self.pre.init_from)
            if any(k.startswith("text.") for k in sd):
                model.load_state_dict(sd)
            else:
                load_pretrained(model.video, sd, source=self.pre.init_from, load_decoder=self.cfg.mae_loss_weight > 0)

    def build_train_dataset(self, trainer: Trainer) -> torch.utils.data.Dataset:
        return vt.train_dataset(trainer, self.cfg, self.captions(), self.tokenizer, self.model.video.patch_embed.num_patches)

    def mask_ratio(self, epoch: int) -> float:
        """0 in FLIP's unmasked tuning epochs (the last --unmasked_epochs), else --mask_ratio."""
        return 0.0 if epoch >= self.trainer.cfg.loop.epochs - self.cfg.unmasked_epochs else self.pre.mask_ratio

    def loss(self, module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        out = module(batch["clips"], batch["tokens"], self.mask_ratio(self.trainer.state.epoch), batch["noise"])
        return videotext_loss(out, self.cross_rank, self.cfg.mae_loss_weight)

    def flops_per_clip(self, model: torch.nn.Module) -> float:
        return model.flops_per_clip(self.mask_ratio(0))["train_step"]  # of the first epoch's masking

    def on_train_end(self, trainer: Trainer) -> dict:
        return vt.evaluate(trainer, self.cfg, self.root, self.tokenizer, "all", f"step {trainer.state.global_step}",
                           required=False)

    def evaluate(self, trainer: Trainer) -> dict:
        return vt.evaluate(trainer, self.cfg, self.root, self.tokenizer, self.cfg.eval, "eval", required=True)


def get_args_parser() -> argparse.ArgumentParser:
    """Every pretraining flag: the shared run sections (util.config) and the MAE's own."""
    parser = argparse.ArgumentParser("MAE-ST pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_flags(parser)
    add_flags(parser, VideoTextConfig, "video-text (--objective videotext)")
    return add_flags(parser, PretrainConfig, "masked autoencoder")


def build_task(args: argparse.Namespace) -> Task:
    """The task of --objective, from its flags."""
    cfg = section(PretrainConfig, args)
    if cfg.objective == "videotext":
        if args.config == DEMO_CONFIG:
            raise ConfigError("--objective videotext with the MAE demo config: use --config "
                              "configs/pretrain/videotext_demo.yaml (or your own)")
        return VideoTextTask(section(VideoTextConfig, args), cfg)
    return PretrainTask(cfg)


def main(args: argparse.Namespace) -> dict:
    """Pretrain (or with --bench, measure); returns a summary (final step, outputs)."""
    task = build_task(args)
    trainer = Trainer(run_config(args), task, flag_values(args, get_args_parser()))
    return trainer.evaluate() if getattr(task.cfg, "eval", "") else trainer.fit()


if __name__ == "__main__":
    main(parse_args(get_args_parser(), sys.argv[1:], default_config=DEMO_CONFIG))
