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

from datasets.amt_views import CanonicalViews
from datasets.captions import CaptionList
from datasets.image_folder import build_image_folder_dataset
from models import create_model
from models.amt import clip_attention_weights
from models.convert import load_pretrained
from models.masking import ADAPTIVE_TYPES, MASK_TYPES
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
from util.cross_rank import (
    all_gather_cat,
    convert_batchnorm,
    cosine_momentum,
    ema_update,
    refresh_amt_attention,
)
from util.gather import RankGather
from util.trainer import Task, Trainer
from util.visualize import save_reconstruction

DEMO_CONFIG = str(Path(__file__).resolve().parent / "configs" / "pretrain" / "demo.yaml")


@dataclass
class PretrainConfig:
    """What the encoder learns from, and what the masked autoencoder hides and predicts."""

    objective: str = flag("mae", "pretraining objective: mae (masked spacetime autoencoding, MAE-ST), rho_byol / "
                          "rho_moco (rho clips of a video as positives; flags under 'rho objectives'), videotext "
                          "(masked video-text contrastive: FLIP/MAC, + MAE loss: SMAUG)",
                          choices=("mae", "rho_byol", "rho_moco", "videotext"))
    mask_ratio: float = flag(0.9, "share of tokens hidden from the encoder", check=lambda r: 0 < r < 1, rule="in (0, 1)")
    mask_type: str = flag("random", "mask sampler; adaptive: AdaMAE's learned sampler as published "
                          "(adaptive_detached: the variant of docs/adamae.md)", choices=sorted(MASK_TYPES))
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
    allow_unexpected_keys: bool = flag(False, "load --init_from weights even if some have no place in the model "
                                       "(they are dropped, so the model computes something else)")


class PretrainTask(Task):
    """MAE-ST: reconstruct the hidden spacetime patches of each clip."""

    name = "MAE pretraining"
    architecture_flags = ("objective", "pred_t_dim", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mask_type",
                          "decoder_init_values", "decoder_cls", "decoder_sep_pos_embed")

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg

    def setup(self, trainer: Trainer) -> None:
        self.data_path = trainer.resolve_data_path(image_folder=self.cfg.data_format == "image_folder")
        if self.cfg.mask_type == "amt" and self.cfg.data_format != "video":
            raise ValueError("--mask_type amt places each clip in its video's attention map: it needs --data_format video")

    def build_model(self, trainer: Trainer) -> torch.nn.Module:
        m, c = trainer.cfg.model, self.cfg
        amt = c.mask_type == "amt"  # its attention table has a row per training video
        videos = len(trainer.video_dataset(self.data_path, "train", "pretrain")) if amt else 0
        self.model = create_model(
            m.model, img_size=m.input_size, num_frames=m.num_frames, t_patch_size=m.t_patch_size,
            cls_embed=m.cls_embed, sep_pos_embed=m.sep_pos_embed, pred_t_dim=c.pred_t_dim, mask_type=c.mask_type,
            sampler_loss_weight=c.sampler_loss_weight, decoder_mask_ratio=c.decoder_mask_ratio,
            decoder_mask_type=c.decoder_mask_type,
            norm_pix_loss=c.norm_pix_loss, trunc_init=c.trunc_init, decoder_embed_dim=c.decoder_embed_dim,
            decoder_depth=c.decoder_depth, decoder_num_heads=c.decoder_num_heads, init_values=m.init_values,
            decoder_init_values=c.decoder_init_values, decoder_cls=c.decoder_cls,
            decoder_sep_pos_embed=c.decoder_sep_pos_embed, target_frames=c.target_frames,
            throw_ratio=c.throw_ratio if amt else 0.0, amt_num_videos=videos,
        )
        return self.model

    def init_weights(self, model: torch.nn.Module, trainer: Trainer) -> None:
        if self.cfg.init_from:
            load_pretrained(model, read_weights(self.cfg.init_from), source=self.cfg.init_from,
                            allow_unexpected=self.cfg.allow_unexpected_keys)

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
        attention = None
        if self.cfg.mask_type == "amt":  # each clip's tokens read their video's map through the clip's geometry
            m = self.model
            attention = clip_attention_weights(m.amt_attention[batch["index"]].float() / 255, batch["geometry"],
                                               m.grid_size, m.patch_embed.t_patch_size,
                                               self.dataset.sampling_rate / self.dataset.target_fps, m.num_frames)
        loss, _, _, aux = module(batch["clips"], self.cfg.mask_ratio, batch["noise"], attention=attention,
                                 return_aux=True)
        # The adaptive sampler's loss and entropy come back with the loss, to log.
        return (loss, aux["metrics"]) if self.cfg.mask_type in ADAPTIVE_TYPES else loss

    def flops_per_clip(self, model: torch.nn.Module) -> float:
        return model.flops_per_clip(self.cfg.mask_ratio)["train_step"]

    def on_epoch_end(self, trainer: Trainer) -> None:
        """AMT's attention pass when due; a reconstruction grid of a fixed clip and mask: OUT/vis/epoch-N.png."""
        epoch, c = trainer.state.epoch, self.cfg
        done = epoch + 1
        if (c.mask_type == "amt" and done >= c.amt_warmup_epochs and (done - c.amt_warmup_epochs) % c.amt_refresh_epochs == 0
                and done < trainer.cfg.loop.epochs):
            views = CanonicalViews(self.dataset.samples, trainer.cfg.model.num_frames, trainer.cfg.model.input_size,
                                   normalize=self.dataset.normalize)
            refresh_amt_attention(trainer, views, self.model.amt_attention,
                                  trainer.cfg.loop.batch_size * trainer.cfg.data.repeat_aug)
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


@dataclass
class RhoConfig:
    """rho-BYOL / rho-MoCo (Feichtenhofer et al., 2021): rho clips of one video are each other's positives."""

    rho: int = flag(2, "rho objectives: clips per video (sets --repeat_aug); each clip's positives are the other rho - 1",
                    check=lambda r: r >= 2, rule=">= 2")
    rho_timespan: float = flag(0.0, "rho objectives: the clips of a video start at most this many seconds apart "
                               "(0: anywhere in the video)", check=non_negative, rule=">= 0")
    rho_rand_aug: str = flag("rand-m7-n2-mstd0.5-inc1", "clip-consistent RandAugment of each rho clip ('': off)")
    proj_dim: int = flag(256, "projection (and MoCo key) dimension", check=positive, rule="> 0")
    proj_hidden_dim: int = flag(4096, "hidden width of the projector MLP", check=positive, rule="> 0")
    proj_layers: int = flag(2, "linear layers of the projector (BatchNorm + ReLU between)", check=lambda n: n >= 2,
                            rule=">= 2")
    pred_hidden_dim: int = flag(4096, "hidden width of BYOL's predictor MLP", check=positive, rule="> 0")
    ema_momentum: float = flag(0.996, "momentum encoder's initial momentum, cosine-annealed to 1",
                               check=lambda m: 0 <= m < 1, rule="in [0, 1)")
    moco_temperature: float = flag(0.1, "MoCo's softmax temperature", check=positive, rule="> 0")
    moco_queue: int = flag(65536, "MoCo's queue of negative keys", check=positive, rule="> 0")


class RhoTask(Task):
    """rho-BYOL / rho-MoCo pretraining; the momentum update and MoCo's enqueue follow each optimiser step."""

    name = "rho pretraining"
    architecture_flags = ("objective", "proj_dim", "proj_hidden_dim", "proj_layers", "pred_hidden_dim", "moco_queue")

    def __init__(self, cfg: RhoConfig, pre: PretrainConfig) -> None:
        self.cfg, self.pre, self.objective, self.keys = cfg, pre, pre.objective.removeprefix("rho_"), []

    def setup(self, trainer: Trainer) -> None:
        self.data_path = trainer.resolve_data_path()
        p = trainer.cfg.parallel
        if p.dist == "deepspeed" and p.precision != "fp32":  # its bf16 module would hold the momentum copy in bf16
            raise ValueError("rho objectives under --dist deepspeed need --precision fp32: DeepSpeed casts the momentum "
                             "encoder to 16 bits, where updates of (1 - momentum) x the difference round away; "
                             "use --dist fsdp (fp32 shards, bf16 compute) or ddp")
        trainer.cfg.data.repeat_aug = trainer.config_values["repeat_aug"] = self.cfg.rho  # rho clips per decode

    def build_model(self, trainer: Trainer) -> torch.nn.Module:
        m, c = trainer.cfg.model, self.cfg
        name = "rho_vit_" + m.model.removeprefix("mae_vit_").removeprefix("vit_").removeprefix("rho_vit_")
        self.model = convert_batchnorm(create_model(  # BatchNorm of the MLP heads over the global batch
            name, objective=self.objective, rho=c.rho, img_size=m.input_size, num_frames=m.num_frames,
            t_patch_size=m.t_patch_size, cls_embed=m.cls_embed, sep_pos_embed=m.sep_pos_embed,
            init_values=m.init_values, proj_dim=c.proj_dim, proj_hidden_dim=c.proj_hidden_dim,
            proj_layers=c.proj_layers, pred_hidden_dim=c.pred_hidden_dim, temperature=c.moco_temperature,
            queue_size=c.moco_queue))
        return self.model

    def init_weights(self, model: torch.nn.Module, trainer: Trainer) -> None:
        if self.pre.init_from:
            load_pretrained(model, read_weights(self.pre.init_from), source=self.pre.init_from,
                            allow_unexpected=self.pre.allow_unexpected_keys)
            model.copy_to_momentum()

    def build_train_dataset(self, trainer: Trainer) -> torch.utils.data.Dataset:
        return trainer.video_dataset(self.data_path, "train", "pretrain", repeat_aug=self.cfg.rho,
                                     rand_aug=self.cfg.rho_rand_aug or None, clip_timespan=self.cfg.rho_timespan or None)

    def loss(self, module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, metrics, keys = module(batch["clips"])
        if keys is not None:
            self.keys.append(keys.detach())  # enqueued after the step, as MoCo does after each batch
        return loss, metrics

    def after_step(self, trainer: Trainer) -> None:
        st = trainer.state
        progress = (st.epoch + st.consumed / trainer.samples_per_epoch) / trainer.cfg.loop.epochs
        ema_update(self.model.momentum_pairs(), cosine_momentum(self.cfg.ema_momentum, progress))
        if self.keys:  # every rank's keys, in rank order: the queue stays the same on every rank
            self.model.enqueue(all_gather_cat(torch.cat(self.keys)))
            self.keys.clear()

    def flops_per_clip(self, model: torch.nn.Module) -> float:
        return model.flops_per_clip()["train_step"]


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
                load_pretrained(model.video, sd, source=self.pre.init_from, load_decoder=self.cfg.mae_loss_weight > 0,
                                allow_unexpected=self.pre.allow_unexpected_keys)

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
    add_flags(parser, PretrainConfig, "masked autoencoder")
    return add_flags(parser, RhoConfig, "rho objectives")


def build_task(args: argparse.Namespace) -> Task:
    """The task of --objective, from its flags."""
    cfg = section(PretrainConfig, args)
    if cfg.objective in ("rho_byol", "rho_moco"):
        return RhoTask(section(RhoConfig, args), cfg)
    if cfg.objective == "videotext":
        if args.config == DEMO_CONFIG:
            raise ConfigError("--objective videotext with the MAE demo config: use --config "
                              "configs/pretrain/videotext_demo.yaml (or your own)")
        # Checked here, before any data or model work (the task checks again for callers that skip this).
        if args.repeat_aug != 1:
            raise ConfigError("--objective videotext pairs one clip with one caption: set --repeat_aug 1 (repeats "
                              "of a video in one batch would be each other's false negatives)")
        if cfg.mask_type in (*ADAPTIVE_TYPES, "amt"):
            raise ConfigError(f"--objective videotext masks with a fixed sampler: --mask_type random, tube, frame or "
                              f"cube (got {cfg.mask_type}; adaptive and amt learn from the MAE's loss or attention)")
        return VideoTextTask(section(VideoTextConfig, args), cfg)
    return PretrainTask(cfg)


def main(args: argparse.Namespace) -> dict:
    """Pretrain (or with --bench, measure); returns a summary (final step, outputs)."""
    task = build_task(args)
    trainer = Trainer(run_config(args), task, flag_values(args, get_args_parser()))
    return trainer.evaluate() if getattr(task.cfg, "eval", "") else trainer.fit()


if __name__ == "__main__":
    main(parse_args(get_args_parser(), sys.argv[1:], default_config=DEMO_CONFIG))
