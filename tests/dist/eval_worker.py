"""2-rank multi-view evaluation: every (video, view) item once, videos split across ranks counted once.

    torchrun --nproc_per_node 2 tests/dist/eval_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import make_backend  # noqa: E402  (puts the repo root on sys.path)

from datasets import DistributedEvalSampler, collate_clips  # noqa: E402
from models import create_model  # noqa: E402
from util.distributed import cleanup, init_distributed  # noqa: E402
from util.evaluate import evaluate  # noqa: E402

NUM_VIDEOS, VIEWS, CLASSES = 7, 3, 5  # 21 items: not divisible by 2, and video 3 straddles the ranks


class ViewDataset(torch.utils.data.Dataset):
    """Item i = view i % VIEWS of video i // VIEWS, as VideoDataset's test mode lays them out."""

    def __len__(self) -> int:
        return NUM_VIDEOS * VIEWS

    def __getitem__(self, i: int) -> dict:
        video = i // VIEWS
        g = torch.Generator().manual_seed(i)
        return {"clips": torch.randn(1, 3, 4, 32, 32, generator=g), "label": torch.tensor([video % CLASSES]),
                "index": torch.tensor([video]), "view": torch.tensor([i % VIEWS]), "failures": 0, "attempts": 1,
                "failed_paths": []}


def loader(sampler) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ViewDataset(), batch_size=2, sampler=sampler, collate_fn=collate_clips)


def main(out: str) -> None:
    info = init_distributed(need_group=True)
    results = {}
    for backend_name in ("plain", "ddp", "fsdp"):
        torch.manual_seed(0)
        model = create_model("vit_micro_patch8", img_size=32, num_frames=4, depth=2, num_classes=CLASSES, dropout=0.0)
        if backend_name != "plain":
            model = make_backend(model, info, dist=backend_name, lr=1e-3).module
        shard = DistributedEvalSampler(NUM_VIDEOS * VIEWS, info.world_size, info.rank)
        res = evaluate(model, loader(shard), NUM_VIDEOS, CLASSES, info.device, expected_views=VIEWS)
        # Reference: every rank scores the whole set alone (sharded=False: nothing summed across ranks).
        full = evaluate(model, loader(range(NUM_VIDEOS * VIEWS)), NUM_VIDEOS, CLASSES, info.device, sharded=False)
        results[backend_name] = {
            "local_items": len(shard), "videos": res["videos"], "views": res["views"],
            "views_per_video": res["views_per_video"].tolist(), "labels": res["labels"].tolist(),
            "top1": res["top1"], "top5": res["top5"], "ref_top1": full["top1"],
            "max_score_diff": float((res["scores"] - full["scores"]).abs().max()),
        }
    gathered = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, results)
    if info.is_main:
        Path(out).write_text(json.dumps(gathered))
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
