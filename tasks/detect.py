"""AVA action detection: fine-tune a video ViT with PySlowFast's RoI head, test with frame-AP@0.5.

    python main_finetune.py --task detect                       # CPU demo on a generated AVA-format set
    torchrun --nproc_per_node 8 main_finetune.py --config configs/detect/vit_l_ava.yaml \
        --data_path AVA --finetune mae_pretrain_vit_large_k400.pth

The data (`--data_path`, PySlowFast's layout, docs/ava.md) is read by datasets/ava/clips.py; the model is
models/detect.py; the loss is BCE over the 80 classes per box (PySlowFast MODEL.LOSS_FUNC bce). Testing
scores every proposal box of the evaluation split on every rank's share of keyframes, gathers the boxes on
rank 0 and computes frame-AP@0.5 over the label map's (60) classes with the excluded keyframes left out
(datasets/ava/evaluate.py, as the official evaluator); rank 0 writes OUT/ava_results_<split>.json and the
official detection CSV OUT/ava_detections_<split>.csv (all classes, as PySlowFast writes them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from datasets import DistributedEvalSampler
from datasets.ava.clips import NUM_CLASSES, AvaClips
from datasets.ava.evaluate import MAX_DETECTIONS_PER_FRAME, frame_ap
from datasets.ava.files import (
    ANNOTATIONS,
    EXCLUDED,
    LABEL_MAP,
    Detection,
    read_annotations,
    read_excluded,
    read_label_map,
    write_detections,
)
from datasets.ava.fixture import ensure_ava_fixture
from datasets.loader import batches
from models.convert import load_pretrained
from models.detect import ROI_RESOLUTION, create_detector
from tasks.common import TestedTask
from util.config import flag, non_negative, positive, section
from util.task import RunContext
from util.weights import read_weights

log = logging.getLogger("mae_st.detect")
unit = {"check": lambda x: 0 <= x <= 1, "rule": "in [0, 1]"}


@dataclass
class DetectConfig:
    """The detector, where its weights come from, its data and how it is tested."""

    finetune: str = flag("", "weights to start from: file or checkpoint/output folder (as classification)")
    allow_unexpected_keys: bool = flag(False, "load --finetune weights even if some have no place in the model")
    num_classes: int = flag(NUM_CLASSES, "classes of the head (AVA: 80 action ids, 60 evaluated)", check=positive,
                            rule="> 0")
    drop_path_rate: float = flag(0.1, "stochastic depth of the last block", **unit)
    dropout: float = flag(0.5, "dropout before the head's linear layer (PySlowFast MODEL.DROPOUT_RATE)", **unit)
    roi_resolution: int = flag(ROI_RESOLUTION, "RoIAlign output size (PySlowFast DETECTION.ROI_XFORM_RESOLUTION)",
                               check=positive, rule="> 0")
    proposal_threshold: float = flag(0.8, "keep person proposals scoring at least this (PySlowFast "
                                     "AVA.DETECTION_SCORE_THRESH)", **unit)
    train_proposals: bool = flag(True, "train on proposals above the threshold too, not only ground truth "
                                 "(PySlowFast AVA.TRAIN_PREDICT_BOX_LISTS)")
    hflip: bool = flag(True, "random horizontal flips in training (PySlowFast DATA.RANDOM_FLIP)")
    train_split: str = flag("train", "split trained on (frame_lists/<split>.csv, annotations/ava_<split>_v2.2.csv)")
    eval_split: str = flag("val", "split tested on")
    max_detections_per_frame: int = flag(MAX_DETECTIONS_PER_FRAME, "detections a keyframe keeps when scored "
                                         "(the official evaluator: 50; 0: all, as PySlowFast's in-run test)",
                                         check=non_negative, rule=">= 0")
    freeze_encoder: bool = flag(False, "train only the RoI head on a frozen encoder (a baseline: e.g. the head on a "
                                "random encoder against the same head on a pretrained one)")
    eval: bool = flag(False, "only test the weights (--resume, latest or --finetune)")
    eval_every: int = flag(5, "epochs between tests during training (0: end only)", check=non_negative, rule=">= 0")


class DetectTask(TestedTask):
    """AVA spatio-temporal action detection with a ViT encoder and an RoI head."""

    name = "detection"
    architecture_flags = ("num_classes", "roi_resolution", "freeze_encoder")

    def __init__(self, cfg: DetectConfig) -> None:
        self.cfg = cfg
        self.eval_loader: torch.utils.data.DataLoader | None = None

    def evaluate_only(self) -> bool:
        return self.cfg.eval

    def setup(self, ctx: RunContext) -> None:
        data = ctx.cfg.data.data_path
        self.data_path = data or ctx.made_by_rank0(lambda: ensure_ava_fixture(videos={"train": 12, "val": 4}))
        # the generated set is 8 fps (datasets/ava/fixture.py); real AVA frames are 30 fps (--frame_fps)
        self.fps = ctx.cfg.data.frame_fps if data else 8.0

    def build_model(self, ctx: RunContext) -> nn.Module:
        m, c = ctx.cfg.model, self.cfg
        model = create_detector(m.model, num_classes=c.num_classes, img_size=m.input_size, num_frames=m.num_frames,
                                t_patch_size=m.t_patch_size, cls_embed=m.cls_embed, sep_pos_embed=m.sep_pos_embed,
                                drop_path_rate=0.0 if c.freeze_encoder else c.drop_path_rate, dropout=c.dropout,
                                roi_resolution=c.roi_resolution, init_values=m.init_values)
        if c.freeze_encoder:
            for name, p in model.named_parameters():
                p.requires_grad = name.startswith("head.")
        return model

    def init_weights(self, model: nn.Module, ctx: RunContext) -> None:
        if not self.has_start_weights(ctx):
            return
        load_pretrained(model, read_weights(self.cfg.finetune), source=self.cfg.finetune,
                        allow_unexpected=self.cfg.allow_unexpected_keys)

    def dataset(self, ctx: RunContext, split: str, train: bool) -> AvaClips:
        """The keyframe clips of `split` with the run's clip geometry and seed."""
        m, c = ctx.cfg.model, self.cfg
        return AvaClips(self.data_path, split, train, num_frames=m.num_frames, sampling_rate=ctx.cfg.data.sampling_rate,
                        crop_size=m.input_size, fps=self.fps, proposal_threshold=c.proposal_threshold,
                        train_proposals=c.train_proposals, hflip=c.hflip, seed=ctx.cfg.loop.seed,
                        normalize=not ctx.normalize_on_device, num_classes=c.num_classes)

    def build_train_dataset(self, ctx: RunContext) -> torch.utils.data.Dataset:
        return self.dataset(ctx, self.cfg.train_split, train=True)

    def loss(self, module: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = module(batch["clips"], batch["boxes"])
        return {"loss": F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].float())}

    def flops_per_clip(self, model: nn.Module) -> float:
        return model.flops_per_clip()["train_step"]

    @torch.no_grad()
    def predict(self, ctx: RunContext) -> tuple[list[Detection], int, int]:
        """(this run's detections gathered from every rank, keyframes scored, keyframes unreadable); collective."""
        if self.eval_loader is None:
            ds = self.dataset(ctx, self.cfg.eval_split, train=False)
            sampler = DistributedEvalSampler(len(ds), ctx.dist.world_size, ctx.dist.rank)
            self.eval_loader = ctx.make_loader(ds, sampler, ctx.cfg.loop.batch_size, train=False)
        ds, module = self.eval_loader.dataset, ctx.backend.module
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # every rank runs as many forwards as the longest shard: FSDP and ZeRO-3 gather inside forward
        extra = 0
        if distributed:
            most = torch.tensor([len(self.eval_loader)], device=ctx.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            extra = int(most) - len(self.eval_loader)
        was_training = module.training
        module.eval()
        rows, keyframes, failures, b = [], 0, 0, None
        try:
            for batch in batches(self.eval_loader):
                failures += int(batch["failures"])
                keyframes += len(set(batch["keyframe"].tolist()))
                b = ctx.prepare(batch, normalize=not ds.normalize)
                with ctx.backend.precision():  # also with no boxes: the forwards of all ranks stay matched
                    scores = torch.sigmoid(module(b["clips"], b["boxes"]).float()).cpu()
                rows += [(int(k), tuple(box.tolist()), s.tolist())
                         for k, box, s in zip(batch["keyframe"], batch["orig_boxes"], scores, strict=True)]
            for _ in range(extra):  # padding forwards, scores discarded
                if b is None:
                    b = ctx.prepare(ds.collate([ds[0]]), normalize=not ds.normalize)
                with ctx.backend.precision():
                    module(b["clips"][:1], torch.zeros((1, 5), device=ctx.device))
        finally:
            module.train(was_training)
        if distributed:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (rows, keyframes, failures))
            rows = [r for part in gathered for r in part[0]]
            keyframes, failures = sum(p[1] for p in gathered), sum(p[2] for p in gathered)
        detections = [Detection(*ds.keys[k], box, c + 1, score)
                      for k, box, scores in rows for c, score in enumerate(scores)]
        return detections, keyframes, failures

    def test(self, ctx: RunContext, tag: str) -> dict:
        """Frame-AP@0.5 of the current weights on --eval_split (collective); rank 0 writes and logs it."""
        c = self.cfg
        detections, keyframes, failures = self.predict(ctx)
        if not ctx.dist.is_main:
            return {}
        ann = os.path.join(self.data_path, "annotations")
        result = frame_ap(read_annotations(os.path.join(ann, ANNOTATIONS[c.eval_split])), detections,
                          read_label_map(os.path.join(ann, LABEL_MAP)),
                          read_excluded(os.path.join(ann, EXCLUDED[c.eval_split])),
                          max_detections_per_frame=c.max_detections_per_frame or None)
        csv_path = ctx.out / f"ava_detections_{c.eval_split}.csv"
        write_detections(str(csv_path), detections)
        summary = {"tag": tag, "split": c.eval_split, "keyframes": keyframes, "unreadable_keyframes": failures,
                   "boxes": len(detections) // max(c.num_classes, 1), "detections_csv": csv_path.name, "data_path": self.data_path,
                   **result.to_json()}
        (ctx.out / f"ava_results_{c.eval_split}.json").write_text(json.dumps(summary, indent=1))
        log.info("%s: %s frame-mAP@0.5 %.4f over %d keyframes (%d unreadable), %d boxes", tag, c.eval_split,
                 result.mean_ap, keyframes, failures, summary["boxes"])
        metrics = {"mAP": result.mean_ap}
        if ctx.logger is not None:
            ctx.logger.scalars(ctx.state.global_step, metrics, prefix=f"{c.eval_split}/")
        return metrics


SECTIONS = (("detection fine-tuning and evaluation", DetectConfig),)
# Shared flags: MAE-ST's fine-tuning recipe for the optimiser (configs/detect/*.yaml set the AVA schedule).
DEFAULTS = dict(model="vit_large_patch16", epochs=30, warmup_epochs=5, blr=1e-3, min_lr=1e-6, repeat_aug=1,
                clip_grad=5.0, save_every=0, opt_betas=[0.9, 0.999], layer_decay=0.75, wd_skip="tokens")
DEMO_CONFIG = "demo.yaml"


def make_task(args: argparse.Namespace) -> DetectTask:
    """The detection task of parsed flags."""
    if args.repeat_aug != 1:
        raise ValueError("--task detect reads each keyframe once per step: use --repeat_aug 1")
    return DetectTask(section(DetectConfig, args))
