"""Video-text evaluation: retrieval (text->video, video->text) and zero-shot classification from prompts.

`evaluate(ctx, cfg, ...)` runs them on a run's model (collective; rank 0 writes the JSON and PNG files).
Below it, embeddings come from callables (`encoders`) (`encode_video(clips) -> [B, E]`,
`encode_text(ids) -> [B, E]`, unit vectors), so this module never sees a model class.

- Videos: K temporal x S spatial views per video; each view's unit embedding is summed into a dense
  [V, E] table by video index, the tables are summed over ranks (every view is seen once: the eval
  sampler never pads), and each video's mean is renormalised. Shorter shards run padding forwards
  whose output is discarded, because FSDP2 and ZeRO-3 gather parameters inside forward.
- Texts: few and short, so every rank encodes all of them (the same forwards on every rank).
- Retrieval (MSR-VTT protocol): the rank of the right video among all test videos for each caption
  (t2v), and for each video the best rank of any of its captions among all captions (v2t); R@1/5/10
  (%), median and mean rank. Ties count against the query (a video scoring the same as the right one
  ranks ahead of it), so a constant model scores chance, never better.
- Zero-shot: a class embedding is the renormalised mean of its prompts' embeddings (CLIP's prompt
  ensembling); each video takes the class of highest cosine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from datasets import DistributedEvalSampler, VideoDataset, read_list_file
from datasets.captions import CaptionList, read_caption_list
from datasets.loader import batches
from util.errors import ConfigError, read_json_object
from util.evaluate import confusion_matrix, save_confusion_matrix
from util.task import RunContext
from util.visualize import MEAN, STD

if TYPE_CHECKING:
    from datasets.text_tokenizer import CaptionTokenizer
    from tasks.videotext import VideoTextConfig

log = logging.getLogger("mae_st.videotext")
Encoder = Callable[[torch.Tensor], torch.Tensor]
Encoders = tuple[Encoder, Encoder]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def embed_videos(encode_video: Encoder, loader: Iterable[dict], num_videos: int, device: torch.device,
                 prepare: Callable[[dict], dict] | None = None,
                 precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """View-averaged unit embeddings [num_videos, E] of a test-mode loader's videos, summed over ranks (collective)."""
    sums: torch.Tensor | None = None
    counts = torch.zeros(num_videos, dtype=torch.float64)
    num_batches = len(loader)  # type: ignore[arg-type]
    extra = 0
    if _distributed():
        most = torch.tensor([num_batches], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        extra = int(most) - num_batches
    clips = None
    for batch in batches(loader):  # a worker stuck in a read stops the test naming its file (--data_timeout)
        clips = prepare(batch)["clips"] if prepare else batch["clips"].to(device)
        with precision():
            emb = encode_video(clips).float().cpu().double()
        valid = batch["valid"].double() if "valid" in batch else torch.ones(emb.shape[0], dtype=torch.float64)
        if sums is None:
            sums = torch.zeros(num_videos, emb.shape[1], dtype=torch.float64)
        index = batch["index"].long()
        sums.index_add_(0, index, emb * valid[:, None])
        counts.index_add_(0, index, valid)
    for _ in range(extra):  # keep the collectives inside forward matched; counts nothing
        if clips is None:
            first = loader.collate_fn([loader.dataset[0]])  # type: ignore[attr-defined]
            clips = prepare(first)["clips"] if prepare else first["clips"].to(device)
        with precision():
            emb = encode_video(clips[:1])
        if sums is None:
            sums = torch.zeros(num_videos, emb.shape[1], dtype=torch.float64)
    if sums is None:
        raise ValueError("no test videos to embed")
    table = torch.cat([sums, counts[:, None]], dim=1)
    if _distributed():
        moved = table.to(device)
        dist.all_reduce(moved)
        table = moved.cpu()
    sums, counts = table[:, :-1], table[:, -1]
    missing = int((counts == 0).sum())
    if missing:
        log.warning("%d test video(s) could not be decoded in any view: they score as zero vectors", missing)
    return F.normalize(sums.float(), dim=-1)


@torch.no_grad()
def embed_texts(encode_text: Encoder, ids: torch.Tensor, device: torch.device, batch_size: int = 256,
                precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """Unit embeddings [N, E] of id rows [N, L], in batches (every rank encodes all of them)."""
    out = []
    for start in range(0, ids.shape[0], batch_size):
        with precision():
            out.append(encode_text(ids[start:start + batch_size].to(device)).float().cpu())
    return F.normalize(torch.cat(out), dim=-1)


def _ranks(sim: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of column target[i] in row i of sim [Q, C], ties counted against the query."""
    right = sim.gather(1, target[:, None])
    return (sim >= right).sum(dim=1)  # the right one counts itself: rank 1 when nothing ties or beats it


def retrieval_metrics(sim: torch.Tensor, text_video: torch.Tensor) -> dict[str, float]:
    """Retrieval metrics of a caption x video similarity matrix [T, V]; text_video[t] is caption t's video.

    t2v: rank of the caption's video among all videos; v2t: for each video that has captions, the best
    rank of any of its captions among all captions. R@k in %, median (MdR) and mean (MnR) rank.
    """
    sim, text_video = sim.float(), text_video.long()
    t2v = _ranks(sim, text_video)
    # v2t: for each video, ranks of each of its captions among all captions, keep the best.
    per_text = _ranks(sim.T[text_video], torch.arange(sim.shape[0], device=sim.device))
    best = torch.full((sim.shape[1],), torch.iinfo(torch.long).max, dtype=torch.long)
    best = best.scatter_reduce(0, text_video, per_text, reduce="amin")
    v2t = best[best != torch.iinfo(torch.long).max]
    out: dict[str, float] = {}
    for name, ranks in (("t2v", t2v), ("v2t", v2t)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * float((ranks <= k).float().mean())
        out[f"{name}_MdR"] = float(ranks.float().median())
        out[f"{name}_MnR"] = float(ranks.float().mean())
    out["texts"], out["videos"] = int(sim.shape[0]), int(sim.shape[1])
    return out


def zero_shot(video_emb: torch.Tensor, prompt_emb: Sequence[torch.Tensor], labels: torch.Tensor
              ) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1/top-5 (%) of videos [V, E] against classes given as prompt embeddings [P_c, E]; also the predictions."""
    classes = F.normalize(torch.stack([F.normalize(p, dim=-1).mean(0) for p in prompt_emb]), dim=-1)
    scores = video_emb @ classes.T
    k = min(5, len(prompt_emb))
    top = scores.topk(k, dim=1).indices
    hit = top == labels[:, None]
    per_class = [100.0 * float(hit[labels == c, 0].float().mean()) for c in range(len(prompt_emb))
                 if (labels == c).any()]
    return {"top1": 100.0 * float(hit[:, 0].float().mean()), "top5": 100.0 * float(hit.any(1).float().mean()),
            "mean_class_top1": sum(per_class) / max(len(per_class), 1), "videos": int(labels.numel()),
            "classes": len(prompt_emb)}, top[:, 0]


def read_class_prompts(path: str | Path, class_names: Sequence[str] | None) -> tuple[list[str], list[list[str]]]:
    """(class names, prompts per class) from a JSON {class name: [prompt, ...]} in `class_names` order if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no class prompts at {path}: a JSON object {{class name: [prompt, ...]}} "
                                f"(the generated demo set writes class_prompts.json); set --class_prompts")
    data = read_json_object(path, "--class_prompts")
    if not data:
        raise ConfigError(f"{path}: expected a JSON object mapping each class name to a list of prompts")
    names = list(class_names) if class_names else list(data)
    missing = [n for n in names if n not in data]
    if missing:
        raise ValueError(f"{path}: no prompts for classes {missing[:10]} (the classes of the list, in label order: "
                         f"{names[:10]}...); add them")
    prompts = []
    for n in names:
        p = data[n]
        if isinstance(p, str):
            p = [p]
        if not p or not all(isinstance(x, str) and x.strip() for x in p):
            raise ValueError(f"{path}: class {n!r} needs a non-empty list of non-empty prompt strings")
        prompts.append(list(p))
    return names, prompts


def write_json(path: str | Path, data: dict) -> Path:
    """Write metrics as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def save_zero_shot_confusion(pred: torch.Tensor, labels: torch.Tensor, names: list[str], path: str | Path,
                             title: str) -> Path:
    """Row-normalised confusion matrix PNG of zero-shot predictions."""
    return save_confusion_matrix(confusion_matrix(pred, labels, len(names)), path, names, title)


def _as_image(clip: torch.Tensor) -> torch.Tensor:
    """A clip [C, T, H, W] (normalised float or uint8) -> frames side by side [H, T * W, C] in [0, 1]."""
    clip = clip.float() / 255 if clip.dtype == torch.uint8 else (clip.float() * STD + MEAN)
    c, t, h, w = clip.shape
    return clip.clamp(0, 1).permute(2, 1, 3, 0).reshape(h, t * w, c)


def save_retrieval_examples(path: str | Path, queries: Sequence[str], sim: torch.Tensor, truth: Sequence[int],
                            clip_of: Callable[[int], torch.Tensor], top_k: int = 5, title: str = "") -> Path:
    """PNG: per query caption (a row), its top-k videos' frames, the right video framed green, others red.

    `sim` [Q, V] are the queries' similarities to every video, `truth[q]` the right video's index and
    `clip_of(v)` a clip [C, T, H, W] of video v.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(top_k, sim.shape[1])
    fig, axes = plt.subplots(len(queries), k, figsize=(2.6 * k, 1.3 * len(queries) + 0.6), squeeze=False)
    for q, text in enumerate(queries):
        scores, order = sim[q].topk(k)
        for j in range(k):
            ax = axes[q, j]
            v = int(order[j])
            ax.imshow(_as_image(clip_of(v)).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "tab:green" if v == truth[q] else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_xlabel(f"#{j + 1}  video {v}  cos {float(scores[j]):.2f}", fontsize=7)
        axes[q, 0].set_title(f"\u201c{text}\u201d", fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- on a run's model
def caption_list(cfg: VideoTextConfig, root: str, file: str, path_format: str = "") -> CaptionList:
    """A caption list of the data folder (`file` relative to `root` unless absolute), with the run's column flags."""
    return read_caption_list(os.path.join(root, file), root, cfg.caption_video_column, cfg.caption_text_column,
                             path_format or cfg.caption_path_format)


def encoders(module: Callable, num_frames: int, size: int, context_length: int, device: torch.device) -> Encoders:
    """(encode_video, encode_text) through the wrapped model's forward, unmasked (what FSDP2/ZeRO-3 need)."""
    no_text = torch.zeros(0, context_length, dtype=torch.long, device=device)
    no_clips = torch.zeros(0, 3, num_frames, size, size, device=device)
    return (lambda clips: module(clips, no_text, 0.0)["video"], lambda ids: module(no_clips, ids, 0.0)["text"])


def _test_videos(ctx: RunContext, cfg: VideoTextConfig, samples: list[tuple[str, int]], list_file: str
                 ) -> tuple[VideoDataset, torch.utils.data.DataLoader]:
    """Test-mode dataset (K temporal x S spatial views per video) and its sharded loader."""
    m, d, dist = ctx.cfg.model, ctx.cfg.data, ctx.dist
    ds = VideoDataset(list_file, samples=samples, mode="test", num_frames=m.num_frames,
                      sampling_rate=d.sampling_rate, crop_size=m.input_size,
                      num_temporal_views=cfg.eval_temporal_views, num_spatial_crops=cfg.eval_spatial_crops,
                      seed=ctx.cfg.loop.seed, normalize=not ctx.normalize_on_device,
                      max_frame_pixels=d.max_frame_pixels, max_video_frames=d.max_video_frames)
    loader = ctx.make_loader(ds, DistributedEvalSampler(len(ds), dist.world_size, dist.rank),
                                 ctx.cfg.loop.batch_size, train=False)
    return ds, loader


def _in_eval(module: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """Run fn with the module in eval mode, restoring its mode after."""
    was = module.training
    module.eval()
    try:
        return fn()
    finally:
        module.train(was)


def retrieval(ctx: RunContext, cfg: VideoTextConfig, root: str, tokenizer: CaptionTokenizer, enc: Encoders, tag: str) -> dict:
    """Text<->video retrieval on --eval_captions (collective); rank 0 writes the JSON and the examples PNG."""
    captions = caption_list(cfg, root, cfg.eval_captions, cfg.eval_caption_path_format)
    ds, loader = _test_videos(ctx, cfg, [(v, -1) for v in captions.videos], captions.path)
    texts = captions.all_captions()
    text_video = torch.tensor([i for i, caps in enumerate(captions.captions) for _ in caps])
    ids = torch.from_numpy(tokenizer.encode(texts, cfg.context_length))
    module, dev = ctx.backend.module, ctx.dist.device

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        videos = embed_videos(enc[0], loader, len(captions.videos), dev, ctx.prepare, ctx.backend.precision)
        return embed_texts(enc[1], ids, dev, precision=ctx.backend.precision), videos

    text_emb, video_emb = _in_eval(module, run)
    sim = text_emb @ video_emb.T
    metrics = retrieval_metrics(sim, text_video)
    if ctx.dist.is_main:
        write_json(ctx.out / "eval_retrieval.json", {**metrics, "captions": captions.path, "tag": tag,
                                                         "views": cfg.eval_temporal_views * cfg.eval_spatial_crops})
        picks = torch.linspace(0, len(texts) - 1, min(cfg.eval_examples, len(texts))).long().tolist()
        save_retrieval_examples(ctx.out / "retrieval_examples.png", [texts[q] for q in picks], sim[picks],
                                [int(text_video[q]) for q in picks], lambda v: ds[(0, v * ds.views)]["clips"][0],
                                title=f"{tag}: t2v R@1 {metrics['t2v_R@1']:.1f}, R@5 {metrics['t2v_R@5']:.1f}")
        log.info("retrieval (%s, %d captions x %d videos): t2v R@1/5/10 %.1f/%.1f/%.1f MdR %.1f; v2t R@1/5/10 "
                 "%.1f/%.1f/%.1f MdR %.1f", tag, metrics["texts"], metrics["videos"], metrics["t2v_R@1"],
                 metrics["t2v_R@5"], metrics["t2v_R@10"], metrics["t2v_MdR"], metrics["v2t_R@1"], metrics["v2t_R@5"],
                 metrics["v2t_R@10"], metrics["v2t_MdR"])
    return metrics


def zeroshot(ctx: RunContext, cfg: VideoTextConfig, root: str, tokenizer: CaptionTokenizer, enc: Encoders, tag: str) -> dict:
    """Zero-shot classification of --eval_list from --class_prompts (collective); rank 0 writes JSON and PNG."""
    list_file = os.path.join(root, cfg.eval_list)
    samples = read_list_file(list_file, root)
    names_file = Path(root, "classes.txt")
    names = names_file.read_text().split() if names_file.is_file() else None
    names, prompts = read_class_prompts(os.path.join(root, cfg.class_prompts), names)
    labels = torch.tensor([label for _, label in samples])
    if labels.min() < 0 or labels.max() >= len(names):
        raise ValueError(f"{list_file}: labels must index the {len(names)} classes of {cfg.class_prompts}")
    ds, loader = _test_videos(ctx, cfg, samples, list_file)
    module, dev = ctx.backend.module, ctx.dist.device

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        videos = embed_videos(enc[0], loader, len(samples), dev, ctx.prepare, ctx.backend.precision)
        per_class = [embed_texts(enc[1], torch.from_numpy(tokenizer.encode(p, cfg.context_length)), dev,
                                 precision=ctx.backend.precision) for p in prompts]
        return videos, per_class

    video_emb, prompt_emb = _in_eval(module, run)
    metrics, pred = zero_shot(video_emb, prompt_emb, labels)
    if ctx.dist.is_main:
        write_json(ctx.out / "eval_zeroshot.json", {**metrics, "list": list_file, "tag": tag,
                                                        "prompts_per_class": [len(p) for p in prompts]})
        save_zero_shot_confusion(pred, labels, names, ctx.out / "confusion_zeroshot.png",
                                 f"{tag}: zero-shot top-1 {metrics['top1']:.1f}%")
        log.info("zero-shot (%s, %d videos, %d classes): top-1 %.1f%%, top-5 %.1f%%", tag, metrics["videos"],
                 metrics["classes"], metrics["top1"], metrics["top5"])
    return metrics


def evaluate(ctx: RunContext, cfg: VideoTextConfig, root: str, tokenizer: CaptionTokenizer, which: str, tag: str,
             required: bool) -> dict:
    """Run `which` (retrieval, zeroshot or all); a missing input file is an error if `required`, else skipped."""
    m = ctx.cfg.model
    enc = encoders(ctx.backend.module, m.num_frames, m.input_size, cfg.context_length, ctx.dist.device)
    results = {}
    for name, fn, needs in (("retrieval", retrieval, cfg.eval_captions), ("zeroshot", zeroshot, cfg.eval_list)):
        if which not in (name, "all"):
            continue
        if not required and not os.path.isfile(os.path.join(root, needs)):
            log.warning("no %s at the end of training: %s does not exist", name, os.path.join(root, needs))
            continue
        results[name] = fn(ctx, cfg, root, tokenizer, enc, tag)
        if ctx.logger is not None:
            ctx.logger.scalars(ctx.state.global_step, results[name], prefix=name)
    return results
