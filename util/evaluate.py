"""Multi-view video classification testing: per-video averaged softmax, top-1/top-5, confusion matrix.

A test item is one (video, view) pair: K temporal windows x S spatial crops per video (K400 recipes: 10 x 3 as
mae_st's main_test.py; the released MAE-ST results are 7 x 3, docs/recipes.md).
Each rank sums the softmax scores of the views it saw into a dense [num_videos, num_classes] table
indexed by the video's index, and the tables are summed across ranks. A video whose views were
split between ranks is therefore still one video, counted once, and the sampler never pads
(`DistributedEvalSampler`), so no view is seen twice. A view that could not be decoded arrives with
`valid` False: it counts as seen but not scored, and a video with no scored view is left out of the
accuracy and reported (`videos` scored of `videos_total`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from datasets.loader import batches

log = logging.getLogger("mae_st.evaluate")


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a tensor over ranks (moved to the device NCCL needs); identity when running alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    moved = t.to(device)
    dist.all_reduce(moved)
    return moved.to(t.device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    num_videos: int,
    num_classes: int,
    device: torch.device,
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    expected_views: int | None = None,
    sharded: bool = True,
    prepare: Callable[[dict], dict] | None = None,
    heads: int = 1,
) -> dict:
    """Top-1/top-5 (%) over videos from view-averaged softmax scores, summed over all ranks.

    Returns the metrics plus `scores` [V, C] (averaged), `labels` [V] and `views` [V] (views seen
    per video) for the videos that were evaluated. `expected_views` checks every video got exactly
    that many views (each view exactly once over all ranks). `sharded=False`: every rank saw the
    whole set, so nothing is summed across ranks. `prepare` puts a batch on the device (the
    trainer's: it also normalises uint8 clips there); `precision` is the backend's forward context.

    Collective when distributed: every rank must call it. Ranks run the same number of forwards
    (the shorter shards repeat a batch whose scores are discarded) because FSDP and ZeRO-3 gather
    parameters inside forward.

    `heads > 1`: the model returns logits [B, heads, C] (a grid of probes on one forward pass); the
    result then also has `heads`, one dict of top1/top5/scores per head, each scored as above.
    """
    was_training = model.training
    model.eval()
    width = heads * num_classes  # the heads' class scores side by side
    sums = torch.zeros(num_videos, width, dtype=torch.float64)
    views = torch.zeros(num_videos, dtype=torch.float64)  # views seen (decoded or not)
    scored = torch.zeros(num_videos, dtype=torch.float64)  # views decoded and scored
    labels = torch.zeros(num_videos, dtype=torch.float64)  # summed like the rest: label * views
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    num_batches = len(loader)  # type: ignore[arg-type]
    if distributed:
        most = torch.tensor([num_batches], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        num_batches, extra = int(most), int(most) - num_batches
    else:
        extra = 0
    clips = None
    for batch in batches(loader):  # a worker stuck in a read stops the test naming its file (--data_timeout)
        clips = prepare(batch)["clips"] if prepare else batch["clips"].to(device, non_blocking=True)
        with precision():
            logits = model(clips)
        valid = batch["valid"].double() if "valid" in batch else torch.ones(len(batch["index"]), dtype=torch.float64)
        probs = logits.float().softmax(dim=-1).cpu().double().reshape(len(valid), width) * valid[:, None]
        index = batch["index"].long()
        sums.index_add_(0, index, probs)
        views.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        scored.index_add_(0, index, valid)
        labels.index_add_(0, index, batch["label"].double())
    for _ in range(extra):  # padding forwards: keep collectives inside forward matched, count nothing
        if clips is None:
            first = loader.collate_fn([loader.dataset[0]])  # type: ignore[attr-defined]
            clips = prepare(first)["clips"] if prepare else first["clips"].to(device)
        with precision():
            model(clips[:1])
    if was_training:
        model.train()
    table = torch.cat([sums, views[:, None], labels[:, None], scored[:, None]], dim=1)
    if sharded:
        table = _all_reduce_sum(table, device)
    sums, views, labels = table[:, :width], table[:, width], table[:, width + 1]
    scored = table[:, width + 2]
    if expected_views is not None and not torch.all(views == expected_views):
        bad = torch.nonzero(views != expected_views).flatten()[:10].tolist()
        raise RuntimeError(f"videos {bad} got {views[bad].tolist()} views, expected {expected_views} each")
    unscored = int(((views > 0) & (scored == 0)).sum())
    seen = scored > 0
    all_scores = (sums[seen] / scored[seen, None]).view(-1, heads, num_classes)
    labels = (labels[seen] / views[seen]).round().long()
    n = int(seen.sum())
    per_head = [_accuracy(all_scores[:, h], labels) for h in range(heads)]
    extra = {"heads": per_head} if heads > 1 else {}
    return {
        **per_head[0],
        **extra,
        "videos": n,
        "videos_total": int((views > 0).sum()),
        "videos_unscored": unscored,
        "views": int(views.sum()),
        "views_scored": int(scored.sum()),
        "labels": labels,
        "views_per_video": scored[seen].long(),
    }


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1/top-5 (%) of per-video scores [V, C] against labels [V], and the scores as float."""
    topk = scores.topk(min(5, scores.shape[1]), dim=1).indices
    correct = topk == labels[:, None]
    n = max(len(labels), 1)
    return {"top1": 100.0 * float(correct[:, 0].sum()) / n, "top5": 100.0 * float(correct.any(dim=1).sum()) / n,
            "scores": scores.float()}


def test_and_report(model: nn.Module, loader: Iterable[dict], num_videos: int, num_classes: int,
                    device: torch.device, is_main: bool, out: Path, split: str, tag: str, expected_views: int,
                    sharded: bool, precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    prepare: Callable[[dict], dict] | None = None, class_names: list[str] | None = None) -> dict:
    """Multi-view test (collective); rank 0 logs top-1/top-5, writes OUT/eval_<split>.json and a confusion matrix."""
    res = evaluate(model, loader, num_videos, num_classes, device, precision, expected_views=expected_views,
                   sharded=sharded, prepare=prepare)
    keys = ("top1", "top5", "videos", "videos_total", "videos_unscored", "views", "views_scored")
    metrics = {k: res[k] for k in keys}
    if is_main:
        log.info("* Acc@1 %.3f Acc@5 %.3f (%s: %d of %d videos scored, %d views each)", res["top1"], res["top5"],
                 split, res["videos"], res["videos_total"], expected_views)
        if res["videos_unscored"]:
            log.warning("%d test video(s) could not be decoded and are not in the accuracy", res["videos_unscored"])
        matrix = confusion_matrix(res["scores"].argmax(1), res["labels"], num_classes)
        png = save_confusion_matrix(matrix, out / f"confusion_{split}.png", class_names,
                                    title=f"{tag}: top-1 {res['top1']:.1f}%")
        (out / f"eval_{split}.json").write_text(json.dumps({**metrics, "tag": tag, "confusion": str(png)}))
    return metrics


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [true, predicted] of class ids."""
    flat = labels.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def save_confusion_matrix(matrix: torch.Tensor, path: str | Path, class_names: list[str] | None = None,
                          title: str = "") -> Path:
    """Write a row-normalised confusion matrix PNG (names on the axes when there are few classes)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    norm = matrix.float() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(4 + n * 0.35, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if n <= 40:
        names = class_names or [str(i) for i in range(n)]
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        if n <= 16:
            for i in range(n):
                for j in range(n):
                    if matrix[i, j]:
                        ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
