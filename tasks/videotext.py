"""Masked video-text pretraining: FLIP / MAC (masked contrastive), SMAUG (+ MAE loss, token sparsification).

`python main_pretrain.py --objective videotext` (demo: configs/pretrain/videotext_demo.yaml). A dual
encoder (the MAE-ST video tower on visible tokens, a text Transformer) trained with InfoNCE over the
global batch. Outputs of one run besides the checkpoints:
    OUT/tokenizer.json           the tokenizer (trained at the start of a fresh run; read on resume/eval)
    OUT/eval_retrieval.json      t2v / v2t R@1/5/10, median and mean rank on --eval_captions
    OUT/retrieval_examples.png   query captions and their top videos (right one framed green)
    OUT/eval_zeroshot.json       zero-shot top-1/top-5 on --eval_list from --class_prompts
    OUT/confusion_zeroshot.png   its confusion matrix
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from datasets.captions import CaptionList, CaptionVideoDataset, ensure_videotext_dataset
from datasets.shards import ShardCaptionDataset, read_shards, shard_captions, shard_spec
from datasets.text_tokenizer import CaptionTokenizer, load_tokenizer, train_tokenizer
from models.masking import ADAPTIVE_TYPES
from models.videotext import videotext_loss, videotext_model
from tasks.common import MaskingConfig, StartConfig, load_start_weights
from tasks.videotext_eval import caption_list, evaluate
from util.config import ConfigError, RunConfig, flag, non_negative, positive, section
from util.distributed import barrier
from util.gather import RankGather
from util.task import RunContext, Task
from util.weights import read_weights

log = logging.getLogger("mae_st.videotext")
DEMO_CONFIG = "videotext_demo.yaml"
TOKENIZER_FILE = "tokenizer.json"
# Flags whose names meant something else in main_finetune.py (a bool --eval, flips on by default).
RENAMED = {"eval": "videotext_eval", "hflip": "videotext_hflip"}


@dataclass
class VideoTextConfig:
    """Captions, text tower, contrastive head, SMAUG's MAE loss, evaluation."""

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
    videotext_hflip: bool = flag(False, "random horizontal flips (off: they swap left and right in the captions)")
    mae_loss_weight: float = flag(0.0, "SMAUG: weight of the MAE reconstruction loss on the same encoder pass "
                                  "(> 0 builds the decoder)", check=non_negative, rule=">= 0")
    sparsify_keep: float = flag(1.0, "SMAUG token sparsification: share of visible tokens kept after "
                                "--sparsify_layer, the rest fused into one (1: off)", check=lambda k: 0 < k <= 1,
                                rule="in (0, 1]")
    sparsify_layer: int = flag(0, "encoder block after which tokens are dropped (0: depth // 3)", check=non_negative,
                               rule=">= 0")
    unmasked_epochs: int = flag(0, "FLIP's unmasked tuning: the last N epochs see every token", check=non_negative,
                                rule=">= 0")
    videotext_eval: str = flag("", "only test the run's weights (--output_dir's latest or --resume): retrieval, "
                               "zeroshot or all", choices=("", "retrieval", "zeroshot", "all"))
    eval_captions: str = flag("test_captions.csv", "retrieval caption list in --data_path (or absolute)")
    eval_caption_path_format: str = flag("", "--caption_path_format of --eval_captions (default: the same)")
    eval_list: str = flag("test.csv", "zero-shot videos: `path label` list in --data_path (or absolute)")
    class_prompts: str = flag("class_prompts.json", "zero-shot prompts: JSON {class name: [prompt, ...]} in "
                              "--data_path; class order from classes.txt there, else the file's")
    eval_temporal_views: int = flag(2, "test clips per video along time (embeddings averaged)", check=positive,
                                    rule="> 0")
    eval_spatial_crops: int = flag(1, "test crops per clip (1: center, 3: l/c/r)", check=positive, rule="> 0")
    eval_examples: int = flag(6, "query captions shown in OUT/retrieval_examples.png", check=positive, rule="> 0")


SECTIONS = (("pretraining", StartConfig), ("masking and decoder", MaskingConfig),
            ("video-text (FLIP, MAC, SMAUG)", VideoTextConfig))


class VideoTextTask(Task):
    """A dual encoder (MAE-ST video tower on visible tokens, text Transformer) trained with InfoNCE (+ MAE loss)."""

    name = "video-text pretraining"
    architecture_flags = ("objective", "vocab_size", "context_length", "text_width", "text_depth", "text_heads",
                          "text_causal", "text_pool", "video_pool", "embed_dim", "mae_loss_weight", "sparsify_keep",
                          "sparsify_layer", "tokenizer", "pred_t_dim", "decoder_embed_dim", "decoder_depth",
                          "decoder_num_heads")

    def __init__(self, start: StartConfig, masking: MaskingConfig, cfg: VideoTextConfig) -> None:
        if masking.mask_type in (*ADAPTIVE_TYPES, "amt"):
            raise ConfigError(f"--objective videotext masks with a fixed sampler: --mask_type random, tube, frame or "
                              f"cube (got {masking.mask_type}; adaptive and amt learn from the MAE's loss or attention)")
        self.start, self.masking, self.cfg, self.cross_rank = start, masking, cfg, RankGather()
        self.epochs = 1  # the run's --epochs, for FLIP's unmasked tail (read in check_run)

    def check_run(self, cfg: RunConfig) -> None:
        if cfg.data.repeat_aug != 1:
            raise ConfigError("--objective videotext pairs one clip with one caption: set --repeat_aug 1 (repeats "
                              "of a video in one batch would be each other's false negatives)")
        self.epochs = cfg.loop.epochs

    def evaluate_only(self) -> bool:
        return bool(self.cfg.videotext_eval)

    def setup(self, ctx: RunContext) -> None:
        data = ctx.cfg.data
        self.ctx = ctx  # the loss reads the epoch (FLIP's unmasked tuning)
        self.root = data.data_path or ctx.made_by_rank0(lambda: ensure_videotext_dataset(
            num_videos=ctx.cfg.synthetic.synthetic_videos, size=ctx.cfg.synthetic.synthetic_size,
            object_texture=ctx.cfg.synthetic.synthetic_object_texture))
        self.tokenizer = run_tokenizer(ctx, self.cfg, self.start.init_from, lambda: self.captions().all_captions())

    def captions(self) -> CaptionList:
        """The training caption list: --train_captions, or the `{key}.txt` members of shards (docs/shards.md)."""
        spec = shard_spec(self.root, "train")
        if spec is not None:
            shards, entries, _ = read_shards(spec)
            return shard_captions(shards, entries, spec)
        return caption_list(self.cfg, self.root, self.cfg.train_captions)

    def build_model(self, ctx: RunContext) -> torch.nn.Module:
        m, c, k = ctx.cfg.model, self.cfg, self.masking
        self.model = videotext_model(
            m.model, self.tokenizer.vocab_size, context_length=c.context_length, text_width=c.text_width,
            text_depth=c.text_depth, text_heads=c.text_heads, text_causal=c.text_causal, text_pool=c.text_pool,
            embed_dim=c.embed_dim, video_pool=c.video_pool, temperature=c.temperature, mae_decoder=c.mae_loss_weight > 0,
            sparsify_keep=c.sparsify_keep, sparsify_layer=c.sparsify_layer, img_size=m.input_size,
            num_frames=m.num_frames, t_patch_size=m.t_patch_size, cls_embed=m.cls_embed, sep_pos_embed=m.sep_pos_embed,
            init_values=m.init_values, mask_type=k.mask_type, norm_pix_loss=k.norm_pix_loss,
            pred_t_dim=k.pred_t_dim if c.mae_loss_weight > 0 else m.num_frames // m.t_patch_size,  # no decoder: any
            decoder_embed_dim=k.decoder_embed_dim, decoder_depth=k.decoder_depth, decoder_num_heads=k.decoder_num_heads)
        return self.model

    def init_weights(self, model: torch.nn.Module, ctx: RunContext) -> None:
        if not self.start.init_from:
            return
        sd = read_weights(self.start.init_from)  # a video-text run (every weight), else MAE-ST weights for the video
        if any(k.startswith("text.") for k in sd):
            model.load_state_dict(sd)
        else:
            load_start_weights(model.video, self.start, load_decoder=self.cfg.mae_loss_weight > 0)

    def build_train_dataset(self, ctx: RunContext) -> torch.utils.data.Dataset:
        m, d = ctx.cfg.model, ctx.cfg.data
        spec = shard_spec(self.root, "train")
        source = ({"spec": spec, "retries": d.shard_retries, "cache_bytes": d.shard_cache_mb << 20} if spec
                  else {"captions": self.captions()})
        return (ShardCaptionDataset if spec else CaptionVideoDataset)(
            tokenizer=self.tokenizer, context_length=self.cfg.context_length,
            text_mask_ratio=self.cfg.text_mask_ratio, mode="pretrain", **source,
            num_frames=m.num_frames, sampling_rate=d.sampling_rate, crop_size=m.input_size, repeat_aug=d.repeat_aug,
            seed=ctx.cfg.loop.seed, mask_noise_tokens=self.model.video.patch_embed.num_patches,
            normalize=not ctx.normalize_on_device, hflip=self.cfg.videotext_hflip,
            short_side_range=None if m.input_size < 160 else (256, 320), max_frame_pixels=d.max_frame_pixels,
            max_video_frames=d.max_video_frames, max_decode_short_side=d.max_decode_short_side)

    def mask_ratio(self, epoch: int) -> float:
        """0 in FLIP's unmasked tuning epochs (the last --unmasked_epochs), else --mask_ratio."""
        return 0.0 if epoch >= self.epochs - self.cfg.unmasked_epochs else self.masking.mask_ratio

    def loss(self, module: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return batch_loss(module, batch, self.mask_ratio(self.ctx.state.epoch), self.cross_rank,
                          self.cfg.mae_loss_weight)

    def flops_per_clip(self, model: torch.nn.Module) -> float:
        return model.flops_per_clip(self.mask_ratio(0))["train_step"]  # of the first epoch's masking

    def on_train_end(self, ctx: RunContext) -> dict:
        return evaluate(ctx, self.cfg, self.root, self.tokenizer, "all", f"step {ctx.state.global_step}",
                        required=False)

    def evaluate(self, ctx: RunContext) -> dict:
        return evaluate(ctx, self.cfg, self.root, self.tokenizer, self.cfg.videotext_eval, "eval", required=True)


def batch_loss(module: torch.nn.Module, batch: dict, mask_ratio: float, cross_rank: RankGather | None = None,
               mae_loss_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """The task's loss of one batch: InfoNCE over the global batch (+ mae_loss_weight x the MAE loss), and metrics."""
    out = module(batch["clips"], batch["tokens"], mask_ratio, batch["noise"])
    loss, metrics = videotext_loss(out, cross_rank, mae_loss_weight)
    return {"loss": loss, **metrics}


def run_tokenizer(ctx: RunContext, cfg: VideoTextConfig, init_from: str, corpus: Callable[[], list[str]]
                  ) -> CaptionTokenizer:
    """The run's tokenizer, at OUT/tokenizer.json on every rank.

    Resuming: the tokenizer of the run being resumed (it is part of the model). --init_from a video-text
    run: that run's tokenizer. Otherwise rank 0 trains one on `corpus()` (the training captions).
    """
    out = ctx.out / TOKENIZER_FILE
    resume = ctx.resume_from
    source: Path | None = None
    if resume is not None:
        source = resume.resolve().parent.parent / TOKENIZER_FILE  # OUT/checkpoints/step-N -> OUT
        if not source.is_file():
            raise FileNotFoundError(f"resuming {resume}, but its run has no {TOKENIZER_FILE} (the tokenizer the text "
                                    f"tower was trained with); put it at {source}")
    elif init_from and (Path(init_from) / TOKENIZER_FILE).is_file():
        source = Path(init_from) / TOKENIZER_FILE
    elif cfg.videotext_eval:
        raise FileNotFoundError(f"--videotext_eval tests a trained run, but {ctx.out} has no checkpoint (and "
                                f"--init_from names no video-text run): point --output_dir at a finished run")

    if ctx.dist.is_main:
        if source is None:
            tok = train_tokenizer(corpus(), cfg.tokenizer, cfg.vocab_size)
            tok.save(out)
            log.info("trained a %s tokenizer (%d ids) on the training captions: %s", cfg.tokenizer, tok.vocab_size, out)
        elif source.resolve() != out.resolve():
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, out)
    barrier()  # every rank reads the file rank 0 wrote
    return load_tokenizer(out)


def make_task(args: argparse.Namespace) -> VideoTextTask:
    """The video-text task of parsed flags."""
    return VideoTextTask(*(section(cls, args) for _, cls in SECTIONS))
