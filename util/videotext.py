"""The video-text task's run-level pieces: data folder, tokenizer, caption dataset and the two evaluations.

`main_pretrain.VideoTextTask` is its flags plus calls into here; `cfg` below is that task's
`VideoTextConfig` section (a typed dataclass, never the argparse Namespace). Outputs of one run:
    OUT/tokenizer.json           the tokenizer (trained at the start of a fresh run; read on resume/eval)
    OUT/eval_retrieval.json      t2v / v2t R@1/5/10, median and mean rank on --eval_captions
    OUT/retrieval_examples.png   query captions and their top videos (right one framed green)
    OUT/eval_zeroshot.json       zero-shot top-1/top-5 on --eval_list from --class_prompts
    OUT/confusion_zeroshot.png   its confusion matrix
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from datasets import DistributedEvalSampler, VideoDataset, read_list_file
from datasets.captions import CaptionList, CaptionVideoDataset, ensure_videotext_dataset, read_caption_list
from datasets.text_tokenizer import CaptionTokenizer, load_tokenizer, train_tokenizer
from util.checkpoint import find_latest
from util.distributed import barrier
from util.videotext_eval import (
    embed_texts,
    embed_videos,
    read_class_prompts,
    retrieval_metrics,
    save_retrieval_examples,
    save_zero_shot_confusion,
    write_json,
    zero_shot,
)

log = logging.getLogger("mae_st.videotext")
TOKENIZER_FILE = "tokenizer.json"
Encoders = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def data_path(trainer: Any) -> str:
    """--data_path, or the generated captioned set (made once by rank 0, cached); checks the clip layout first."""
    data = trainer.cfg.data
    if data.repeat_aug != 1:
        raise ValueError("--objective videotext pairs one clip with one caption: set --repeat_aug 1 (repeats of a "
                         "video in one batch would be each other's false negatives)")
    if data.data_path:
        return data.data_path

    def make() -> str:
        return ensure_videotext_dataset(num_videos=data.synthetic_videos, size=data.synthetic_size,
                                        object_texture=data.synthetic_object_texture)

    if trainer.dist.is_main:
        make()
    barrier()
    return make()


def caption_list(cfg: Any, root: str, file: str, path_format: str = "") -> CaptionList:
    """A caption list of the data folder (`file` relative to `root` unless absolute), with the run's column flags."""
    return read_caption_list(os.path.join(root, file), root, cfg.caption_video_column, cfg.caption_text_column,
                             path_format or cfg.caption_path_format)


def _run_of(checkpoint: Path) -> Path:
    """The output folder of OUT/checkpoints/step-N."""
    return checkpoint.resolve().parent.parent


def resume_source(trainer: Any) -> Path | None:
    """The checkpoint this run will resume from (as the Trainer decides), or None for a fresh run."""
    ck = trainer.cfg.ckpt
    if ck.resume:
        return Path(ck.resume)
    return find_latest(trainer.out) if ck.auto_resume else None


def run_tokenizer(trainer: Any, cfg: Any, init_from: str, corpus: Callable[[], list[str]]) -> CaptionTokenizer:
    """The run's tokenizer, at OUT/tokenizer.json on every rank.

    Resuming: the tokenizer of the run being resumed (it is part of the model). --init_from a video-text
    run: that run's tokenizer. Otherwise rank 0 trains one on `corpus()` (the training captions).
    """
    out = trainer.out / TOKENIZER_FILE
    resume = resume_source(trainer)
    source: Path | None = None
    if resume is not None:
        source = _run_of(resume) / TOKENIZER_FILE
        if not source.is_file():
            raise FileNotFoundError(f"resuming {resume}, but its run has no {TOKENIZER_FILE} (the tokenizer the text "
                                    f"tower was trained with); put it at {source}")
    elif init_from and (Path(init_from) / TOKENIZER_FILE).is_file():
        source = Path(init_from) / TOKENIZER_FILE
    elif getattr(cfg, "eval", ""):
        raise FileNotFoundError(f"--eval tests a trained run, but {trainer.out} has no checkpoint (and --init_from "
                                f"names no video-text run): point --output_dir at a finished run")
    if trainer.dist.is_main:
        if source is None:
            tok = train_tokenizer(corpus(), cfg.tokenizer, cfg.vocab_size)
            tok.save(out)
            log.info("trained a %s tokenizer (%d ids) on the training captions: %s", cfg.tokenizer, tok.vocab_size, out)
        elif source.resolve() != out.resolve():
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, out)
    barrier()
    return load_tokenizer(out)


def train_dataset(trainer: Any, cfg: Any, captions: CaptionList, tokenizer: CaptionTokenizer,
                  mask_noise_tokens: int) -> CaptionVideoDataset:
    """Training items: a clip of a video, its mask noise and one of its captions as ids."""
    m, d = trainer.cfg.model, trainer.cfg.data
    return CaptionVideoDataset(
        captions, tokenizer, cfg.context_length, cfg.text_mask_ratio, mode="pretrain", num_frames=m.num_frames,
        sampling_rate=d.sampling_rate, crop_size=m.input_size, repeat_aug=d.repeat_aug, seed=trainer.cfg.loop.seed,
        mask_noise_tokens=mask_noise_tokens, normalize=not trainer.normalize_on_device, hflip=cfg.hflip,
        short_side_range=None if m.input_size < 160 else (256, 320), max_frame_pixels=d.max_frame_pixels,
        max_video_frames=d.max_video_frames, max_decode_short_side=d.max_decode_short_side)


def encoders(module: Callable, num_frames: int, size: int, context_length: int, device: torch.device) -> Encoders:
    """(encode_video, encode_text) through the wrapped model's forward, unmasked (what FSDP2/ZeRO-3 need)."""
    no_text = torch.zeros(0, context_length, dtype=torch.long, device=device)
    no_clips = torch.zeros(0, 3, num_frames, size, size, device=device)
    return (lambda clips: module(clips, no_text, 0.0)["video"], lambda ids: module(no_clips, ids, 0.0)["text"])


def _test_videos(trainer: Any, cfg: Any, samples: list[tuple[str, int]], list_file: str
                 ) -> tuple[VideoDataset, torch.utils.data.DataLoader]:
    """Test-mode dataset (K temporal x S spatial views per video) and its sharded loader."""
    m, d, dist = trainer.cfg.model, trainer.cfg.data, trainer.dist
    ds = VideoDataset(list_file, samples=samples, mode="test", num_frames=m.num_frames,
                      sampling_rate=d.sampling_rate, crop_size=m.input_size,
                      num_temporal_views=cfg.eval_temporal_views, num_spatial_crops=cfg.eval_spatial_crops,
                      seed=trainer.cfg.loop.seed, normalize=not trainer.normalize_on_device,
                      max_frame_pixels=d.max_frame_pixels, max_video_frames=d.max_video_frames)
    loader = trainer.make_loader(ds, DistributedEvalSampler(len(ds), dist.world_size, dist.rank),
                                 trainer.cfg.loop.batch_size, train=False)
    return ds, loader


def _in_eval(module: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """Run fn with the module in eval mode, restoring its mode after."""
    was = module.training
    module.eval()
    try:
        return fn()
    finally:
        module.train(was)


def retrieval(trainer: Any, cfg: Any, root: str, tokenizer: CaptionTokenizer, enc: Encoders, tag: str) -> dict:
    """Text<->video retrieval on --eval_captions (collective); rank 0 writes the JSON and the examples PNG."""
    captions = caption_list(cfg, root, cfg.eval_captions, cfg.eval_caption_path_format)
    ds, loader = _test_videos(trainer, cfg, [(v, -1) for v in captions.videos], captions.path)
    texts = captions.all_captions()
    text_video = torch.tensor([i for i, caps in enumerate(captions.captions) for _ in caps])
    ids = torch.from_numpy(tokenizer.encode(texts, cfg.context_length))
    module, dev = trainer.backend.module, trainer.dist.device

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        videos = embed_videos(enc[0], loader, len(captions.videos), dev, trainer.prepare, trainer.backend.precision)
        return embed_texts(enc[1], ids, dev, precision=trainer.backend.precision), videos

    text_emb, video_emb = _in_eval(module, run)
    sim = text_emb @ video_emb.T
    metrics = retrieval_metrics(sim, text_video)
    if trainer.dist.is_main:
        write_json(trainer.out / "eval_retrieval.json", {**metrics, "captions": captions.path, "tag": tag,
                                                         "views": cfg.eval_temporal_views * cfg.eval_spatial_crops})
        picks = torch.linspace(0, len(texts) - 1, min(cfg.eval_examples, len(texts))).long().tolist()
        save_retrieval_examples(trainer.out / "retrieval_examples.png", [texts[q] for q in picks], sim[picks],
                                [int(text_video[q]) for q in picks], lambda v: ds[(0, v * ds.views)]["clips"][0],
                                title=f"{tag}: t2v R@1 {metrics['t2v_R@1']:.1f}, R@5 {metrics['t2v_R@5']:.1f}")
        log.info("retrieval (%s, %d captions x %d videos): t2v R@1/5/10 %.1f/%.1f/%.1f MdR %.1f; v2t R@1/5/10 "
                 "%.1f/%.1f/%.1f MdR %.1f", tag, metrics["texts"], metrics["videos"], metrics["t2v_R@1"],
                 metrics["t2v_R@5"], metrics["t2v_R@10"], metrics["t2v_MdR"], metrics["v2t_R@1"], metrics["v2t_R@5"],
                 metrics["v2t_R@10"], metrics["v2t_MdR"])
    return metrics


def zeroshot(trainer: Any, cfg: Any, root: str, tokenizer: CaptionTokenizer, enc: Encoders, tag: str) -> dict:
    """Zero-shot classification of --eval_list from --class_prompts (collective); rank 0 writes JSON and PNG."""
    list_file = os.path.join(root, cfg.eval_list)
    samples = read_list_file(list_file, root)
    names_file = Path(root, "classes.txt")
    names = names_file.read_text().split() if names_file.is_file() else None
    names, prompts = read_class_prompts(os.path.join(root, cfg.class_prompts), names)
    labels = torch.tensor([label for _, label in samples])
    if labels.min() < 0 or labels.max() >= len(names):
        raise ValueError(f"{list_file}: labels must index the {len(names)} classes of {cfg.class_prompts}")
    ds, loader = _test_videos(trainer, cfg, samples, list_file)
    module, dev = trainer.backend.module, trainer.dist.device

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        videos = embed_videos(enc[0], loader, len(samples), dev, trainer.prepare, trainer.backend.precision)
        per_class = [embed_texts(enc[1], torch.from_numpy(tokenizer.encode(p, cfg.context_length)), dev,
                                 precision=trainer.backend.precision) for p in prompts]
        return videos, per_class

    video_emb, prompt_emb = _in_eval(module, run)
    metrics, pred = zero_shot(video_emb, prompt_emb, labels)
    if trainer.dist.is_main:
        write_json(trainer.out / "eval_zeroshot.json", {**metrics, "list": list_file, "tag": tag,
                                                        "prompts_per_class": [len(p) for p in prompts]})
        save_zero_shot_confusion(pred, labels, names, trainer.out / "confusion_zeroshot.png",
                                 f"{tag}: zero-shot top-1 {metrics['top1']:.1f}%")
        log.info("zero-shot (%s, %d videos, %d classes): top-1 %.1f%%, top-5 %.1f%%", tag, metrics["videos"],
                 metrics["classes"], metrics["top1"], metrics["top5"])
    return metrics


def evaluate(trainer: Any, cfg: Any, root: str, tokenizer: CaptionTokenizer, which: str, tag: str,
             required: bool) -> dict:
    """Run `which` (retrieval, zeroshot or all); a missing input file is an error if `required`, else skipped."""
    m = trainer.cfg.model
    enc = encoders(trainer.backend.module, m.num_frames, m.input_size, cfg.context_length, trainer.dist.device)
    results = {}
    for name, fn, needs in (("retrieval", retrieval, cfg.eval_captions), ("zeroshot", zeroshot, cfg.eval_list)):
        if which not in (name, "all"):
            continue
        if not required and not os.path.isfile(os.path.join(root, needs)):
            log.warning("no %s at the end of training: %s does not exist", name, os.path.join(root, needs))
            continue
        results[name] = fn(trainer, cfg, root, tokenizer, enc, tag)
        if hasattr(trainer, "logger"):
            trainer.logger.scalars(trainer.state.global_step, results[name], prefix=name)
    return results
