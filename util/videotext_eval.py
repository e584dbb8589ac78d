"""Video-text evaluation: retrieval (text->video, video->text) and zero-shot classification from prompts.

Embeddings come from callables the task hands over (`encode_video(clips) -> [B, E]`,
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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from datasets.loader import batches
from util.evaluate import confusion_matrix, save_confusion_matrix
from util.visualize import MEAN, STD

log = logging.getLogger("mae_st.videotext_eval")
Encoder = Callable[[torch.Tensor], torch.Tensor]


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
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a JSON object mapping each class name to a list of prompts")
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
