"""AVA detection: clip sampling, box scaling/jitter, collate, the RoI detector, and end-to-end runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from datasets.ava.clips import AvaClips, clip_frame_indices, draw_geometry, scaled_size, transform_boxes
from datasets.ava.evaluate import frame_ap
from datasets.ava.files import (
    group_person_boxes,
    read_annotations,
    read_detections,
    read_excluded,
    read_label_map,
    read_proposals,
)
from datasets.ava.fixture import write_ava_fixture
from datasets.transforms import normalize_clips
from models import create_model
from models.convert import load_pretrained
from models.detect import create_detector
from tests.test_pretrain import ROOT, env, free_port, kill_at_checkpoint


def test_clip_frames_are_centred_on_the_keyframe_and_clamped() -> None:
    # PySlowFast get_sequence: range(center - T*rate//2, center + T*rate//2, rate), clamped to the video
    assert clip_frame_indices(5, 4, 2, 8) == [1, 3, 5, 7]
    assert clip_frame_indices(1, 4, 2, 8) == [0, 0, 1, 3]
    assert clip_frame_indices(7, 4, 2, 8) == [3, 5, 7, 7]


def test_boxes_follow_the_scale_crop_and_flip_by_hand() -> None:
    # 80x40 frame (w x h); box (0.1, 0.25, 0.5, 0.75) -> pixels (8, 10, 40, 30)
    assert scaled_size(40, 80, 48) == (48, 96, 1.2)  # short side 40 -> 48: width floor(80 / 40 * 48) = 96
    box = np.array([[0.1, 0.25, 0.5, 0.75]])
    # x 1.2 -> (9.6, 12, 48, 36); crop at top 5, left 20 -> (-10.4, 7, 28, 31); clip to [0, 31]
    np.testing.assert_allclose(transform_boxes(box, 40, 80, 48, 32, 5, 20, False), [[0, 7, 28, 31]])
    # flip in the 32 crop: x1' = 32 - 28 - 1 = 3, x2' = 32 + 10.4 - 1 = 41.4 -> clipped to 31
    np.testing.assert_allclose(transform_boxes(box, 40, 80, 48, 32, 5, 20, True), [[3, 7, 31, 31]])
    # (40, 0, 80, 40) is clipped to (40, 0, 79, 39) first (clip_boxes_to_image), cropped at left 30 to
    # (10, 0, 49, 39), then clipped to the 40 crop
    np.testing.assert_allclose(transform_boxes(np.array([[0.5, 0.0, 1.0, 1.0]]), 40, 80, 40, 40, 0, 30, False),
                               [[10, 0, 39, 39]])


def test_geometry_draws_are_pyslowfasts() -> None:
    # evaluation: short side to the crop, centre crop (ceil((W - S) / 2)), no flip
    assert draw_geometry(40, 80, 32, None, True, np.random.default_rng(0)) == (32, 0, 16, False)
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    short, top, left, flip = draw_geometry(40, 80, 32, (37, 46), True, rng)
    assert short == int(round(1.0 / ref.uniform(1 / 46, 1 / 37)))  # 1 / U(1/max, 1/min)
    h, w, _ = scaled_size(40, 80, short)
    assert (top, left) == (int(ref.integers(0, h - 32)), int(ref.integers(0, w - 32)))
    assert flip == bool(ref.uniform() < 0.5)
    assert not draw_geometry(40, 80, 32, (37, 46), False, np.random.default_rng(3))[3]


@pytest.fixture(scope="module")
def ava(tmp_path_factory: pytest.TempPathFactory):
    return write_ava_fixture(str(tmp_path_factory.mktemp("ava")), {"train": 2, "val": 1}, keyframes=3)


def clips(fx, split: str, train: bool, **kw) -> AvaClips:
    return AvaClips(fx.root, split, train, num_frames=4, sampling_rate=2, crop_size=32, fps=fx.fps,
                    proposal_threshold=0.8, normalize=False, **kw)


def test_training_boxes_are_ground_truth_plus_proposals_and_eval_boxes_proposals(ava) -> None:
    gt = group_person_boxes(read_annotations(ava.path("train", "annotations")))
    only_gt = clips(ava, "train", True, train_proposals=False)
    assert only_gt.keys == sorted(gt)
    for k, key in enumerate(only_gt.keys):
        want = {p.box: p.actions for p in gt[key]}
        got = {tuple(b): tuple(int(c) + 1 for c in np.flatnonzero(lab))
               for b, lab in zip(only_gt.boxes[k].tolist(), only_gt.labels[k], strict=True)}
        assert got == want
    props = [p for p in read_proposals(ava.path("train", "proposals")) if p.score >= 0.8]
    with_props = clips(ava, "train", True)
    extra = sum(len(b) for b in with_props.boxes) - sum(len(b) for b in only_gt.boxes)
    assert extra == len({(p.video_id, p.timestamp, p.box) for p in props} - {
        (*key, b.box) for key, persons in gt.items() for b in persons})
    val = clips(ava, "val", False)
    want = sorted({(p.video_id, p.timestamp, p.box) for p in read_proposals(ava.path("val", "proposals"), 0.8)})
    assert sorted((*key, tuple(b)) for key, bs in zip(val.keys, val.boxes, strict=True) for b in bs.tolist()) == want
    assert all(not lab.any() for lab in val.labels)  # proposal files carry no actions


def test_items_are_exact_per_epoch_and_index_and_boxes_match_the_pixels(ava) -> None:
    ds = clips(ava, "train", True, hflip=True)
    a, b, c = ds[(1, 2)], ds[(1, 2)], ds[(2, 2)]
    assert torch.equal(a["clips"], b["clips"]) and torch.equal(a["boxes"], b["boxes"])
    assert a["clips"].shape == (1, 3, 4, 32, 32) and a["clips"].dtype == torch.uint8
    assert a["boxes"].shape[1] == 4 and a["labels"].shape == (len(a["boxes"]), 80)
    assert not torch.equal(a["boxes"], c["boxes"]) or not torch.equal(a["clips"], c["clips"])
    # evaluation: the boxes are the proposals through the deterministic scale + centre crop
    ev = clips(ava, "val", False)
    item = ev[0]
    h = w = ava.size
    np.testing.assert_allclose(item["boxes"].numpy(), transform_boxes(ev.boxes[0], h, w, 32, 32, 0, 0, False),
                               rtol=1e-6)
    assert torch.equal(item["orig_boxes"], torch.from_numpy(ev.boxes[0]))
    normed = clips(ava, "val", False)
    normed.normalize = True
    torch.testing.assert_close(normed[0]["clips"], normalize_clips(item["clips"]))


def test_collate_batches_a_variable_number_of_boxes(ava) -> None:
    ds = clips(ava, "train", True)
    items = [ds[(0, i)] for i in range(3)]
    batch = AvaClips.collate(items)
    counts = [len(i["boxes"]) for i in items]
    assert batch["clips"].shape == (3, 3, 4, 32, 32)
    assert batch["boxes"].shape == (sum(counts), 5) and batch["labels"].shape == (sum(counts), 80)
    assert batch["boxes"][:, 0].tolist() == [float(i) for i, n in enumerate(counts) for _ in range(n)]
    assert torch.equal(batch["boxes"][:, 1:], torch.cat([i["boxes"] for i in items]))
    assert batch["keyframe"].tolist() == [i for i, n in enumerate(counts) for _ in range(n)]
    empty = ds._empty(0, 1, ["x"])
    mixed = AvaClips.collate([items[0], empty])
    assert mixed["boxes"].shape == (counts[0], 5) and mixed["failures"] == 1 and mixed["failed_paths"] == ["x"]


def test_an_unreadable_frame_is_skipped_and_counted(tmp_path: Path) -> None:
    fx = write_ava_fixture(str(tmp_path), {"train": 1, "val": 1}, keyframes=2)
    train, val = clips(fx, "train", True), clips(fx, "val", False)
    for ds in (train, val):
        Path(ds.frame_paths(0)[2]).write_bytes(b"not a jpeg")
    item = train[(0, 0)]
    assert item["failures"] >= 1 and item["attempts"] == item["failures"] + 1 and len(item["boxes"]) > 0
    assert train[(0, 0)]["failures"] == item["failures"]  # the replacement draw is part of the item's RNG
    bad = val[0]
    assert bad["failures"] == 1 and len(bad["boxes"]) == 0  # an evaluation keyframe is never replaced


def test_detector_pools_time_and_roi_aligns_boxes_on_the_keyframe_map() -> None:
    torch.manual_seed(0)
    model = create_detector("vit_micro_patch8", img_size=32, num_frames=4, t_patch_size=2, dropout=0.0).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    boxes = torch.tensor([[0, 0.0, 0.0, 15.0, 15.0], [1, 4.0, 8.0, 31.0, 20.0], [1, 0.0, 0.0, 31.0, 31.0]])
    logits = model(x, boxes)
    assert logits.shape == (3, 80)
    tokens = model.norm(model.forward_tokens(x))  # [B, T'H'W', D], time outermost
    fmap = tokens.reshape(2, 2, 4, 4, 128).mean(1).permute(0, 3, 1, 2)
    torch.testing.assert_close(model.feature_map(x), fmap)
    pooled = roi_align(fmap, boxes, 7, spatial_scale=1 / 8, sampling_ratio=0, aligned=True).amax(dim=(2, 3))
    torch.testing.assert_close(logits, model.head.projection(pooled))
    # one clip's boxes do not see the other clip
    alone = model(x[1:], torch.cat([torch.zeros(2, 1), boxes[1:, 1:]], 1))
    torch.testing.assert_close(alone, logits[1:])


def test_pretrained_encoder_loads_into_the_detector() -> None:
    mae = create_model("mae_vit_micro_patch8", img_size=32, num_frames=4, t_patch_size=2)
    det = create_detector("vit_micro_patch8", img_size=32, num_frames=4, t_patch_size=2, cls_embed=True)
    report = load_pretrained(det, mae.state_dict())
    assert not report.missing_encoder
    torch.testing.assert_close(det.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(det.norm.weight, mae.norm.weight)
    assert det.layer_id("head.projection.weight") == len(det.blocks) + 1


# ------------------------------------------------------------------ end-to-end runs (slow)

TINY = ["--task", "detect", "--epochs", "1", "--num_workers", "0", "--batch_size", "4", "--log_every", "1"]


def command(out: Path, nproc: int, *extra: str) -> list[str]:
    base = [sys.executable]
    if nproc > 1:
        base += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return [*base, str(ROOT / "main_finetune.py"), "--output_dir", str(out), *TINY, *extra]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def logged(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def scored(out: Path) -> dict:
    return json.loads((out / "ava_results_val.json").read_text())


@pytest.mark.slow  # end-to-end subprocess runs (tens of seconds on 2 cores): .ci/run's slow step runs it
def test_detection_run_resumes_exactly_after_sigkill_and_its_csv_scores_the_same(tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run(command(ref, 1, "--save_every", "4", "--max_steps", "8"))
    expected = logged(ref)
    kill_at_checkpoint(command(out, 1, "--save_every", "4", "--max_steps", "8"), out, 4)
    run(command(out, 1, "--save_every", "4", "--max_steps", "8"))
    got = logged(out)
    assert sorted(got) == sorted(expected) and len(got) > 4
    assert all(abs(got[s] - v) <= 1e-6 * max(1.0, abs(v)) for s, v in expected.items())
    result = scored(ref)
    assert scored(out)["mAP"] == pytest.approx(result["mAP"], abs=1e-9)
    assert result["keyframes"] > 0 and {c["name"] for c in result["classes"]} == {
        "move left", "move right", "stand still", "turn", "grow"}
    # the official CSV reads back to the same APs
    ann = Path(result["data_path"]) / "annotations"
    again = frame_ap(read_annotations(str(ann / "ava_val_v2.2.csv")), read_detections(str(ref / result["detections_csv"])),
                     read_label_map(str(ann / "ava_action_list_v2.2_for_activitynet_2019.pbtxt")),
                     read_excluded(str(ann / "ava_val_excluded_timestamps_v2.2.csv")))
    assert again.mean_ap == pytest.approx(result["mAP"], abs=1e-12)


@pytest.mark.slow
def test_two_rank_ddp_gathers_every_ranks_boxes_for_evaluation(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    run(command(out, 2, "--max_steps", "3"))
    two = scored(out)
    # a one-process test of the same weights scores the same boxes: nothing was lost in the gather
    run(command(out, 1, "--max_steps", "3", "--eval"))
    one = scored(out)
    assert two["keyframes"] == one["keyframes"] > 1 and two["boxes"] == one["boxes"]
    assert two["mAP"] == pytest.approx(one["mAP"], abs=1e-6)


@pytest.mark.parametrize("name", ["demo.yaml", "vit_b_ava.yaml", "vit_l_ava.yaml"])
def test_detection_recipes_parse_to_the_detection_task(name: str) -> None:
    import tasks

    args = tasks.parse("finetune", ["--config", str(ROOT / "configs" / "detect" / name)])
    assert args.task == "detect" and args.num_classes == 80 and args.repeat_aug == 1
    assert tasks.finetune_task(args).name == "detection"
    if name != "demo.yaml":
        assert (args.input_size, args.num_frames, args.sampling_rate, args.roi_resolution) == (224, 16, 4, 7)
        assert (args.proposal_threshold, args.dropout, args.frame_fps) == (0.8, 0.5, 30.0)


def test_freeze_encoder_trains_only_the_head() -> None:
    from types import SimpleNamespace

    import tasks
    from util.config import run_config

    args = tasks.parse("finetune", ["--task", "detect", "--freeze_encoder"])
    model = tasks.finetune_task(args).build_model(SimpleNamespace(cfg=run_config(args)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.projection.weight", "head.projection.bias"}


@pytest.mark.parametrize("task", ["detect", "classify"])
def test_eval_without_weights_names_the_three_ways_to_give_them(tmp_path: Path, task: str) -> None:
    """Both fine-tuning tasks (tasks.common.TestedTask) refuse --eval with nothing to evaluate, naming the flags."""
    cmd = [sys.executable, "main_finetune.py", "--task", task, "--eval", "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--eval needs weights" in proc.stderr and "--finetune FILE" in proc.stderr, proc.stderr[-2000:]
