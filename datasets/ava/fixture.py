"""A generated AVA-format set for tests: moving shapes ("persons") whose actions are what they do.

Each video holds 2-3 squares with a stripe (so turning shows). In the second around each keyframe a square
moves left, moves right or stands still, may turn, and may grow; its actions at that keyframe are exactly
those (multi-label): 1 "move left", 2 "move right", 3 "stand still", 4 "turn", 5 "grow". Action 6 "flicker"
(the square's colour alternates) is annotated but not in the label map, like AVA's 20 classes that are not
evaluated. Files, in PySlowFast's layout under OUT:

    frames/<video>/<video>_<k:06d>.jpg        frame k (from 1) at `fps`; second s is frame (s - 900) * fps
    frame_lists/{train,val}.csv                PySlowFast frame lists
    annotations/ava_{train,val}_v2.2.csv       ground truth, one row per (box, action), with person ids
    annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt
    annotations/ava_val_excluded_timestamps_v2.2.csv   one val keyframe
    annotations/ava_{train,val}_predicted_boxes.csv    ground truth + jitter (scores 0.7-1) + false
                                                       positives (scores 0.05-0.85), empty action column

The videos start at second 900 like AVA's 15-minute clips, so keyframes are 902, 903, ... and the files'
timestamps are the real ones; only the frame rate is lower (`fps`, default 8) to keep the set small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .files import (
    ANNOTATIONS,
    CLIP_START_SECOND,
    EXCLUDED,
    LABEL_MAP,
    PROPOSALS,
    Annotation,
    LabelMap,
    Proposal,
    write_annotations,
    write_excluded,
    write_frame_list,
    write_label_map,
    write_proposals,
)

ACTIONS = {1: "move left", 2: "move right", 3: "stand still", 4: "turn", 5: "grow"}
NOT_EVALUATED = {6: "flicker"}
FIRST_KEYFRAME = 902


@dataclass(frozen=True)
class AvaFixture:
    """Where a generated set lies and how it was made."""

    root: str
    fps: int
    size: int
    keyframes: tuple[int, ...]
    videos: dict[str, tuple[str, ...]]  # split -> video ids

    def path(self, split: str, kind: str) -> str:
        """The file of `kind` (annotations, proposals, excluded, frame_list) for `split`; label_map ignores it."""
        names = {"annotations": ANNOTATIONS, "proposals": PROPOSALS, "excluded": EXCLUDED}
        if kind == "label_map":
            return os.path.join(self.root, "annotations", LABEL_MAP)
        if kind == "frame_list":
            return os.path.join(self.root, "frame_lists", f"{split}.csv")
        return os.path.join(self.root, "annotations", names[kind][split])


@dataclass
class _Person:
    """One square: centre, half side, angle, colours and its behaviour in each second."""

    x: float
    y: float
    half: float
    angle: float
    colour: np.ndarray
    colour2: np.ndarray
    plans: list[dict]


def _plan(rng: np.random.Generator, x: float, half: float, size: int) -> dict:
    """One second's behaviour: horizontal speed (px/s), turn rate (rad/s), growth (px/s), flicker."""
    move = int(rng.integers(3))  # 0 left, 1 right, 2 still
    if x < 0.3 * size:
        move = 1 if move == 0 else move
    if x > 0.7 * size:
        move = 0 if move == 1 else move
    speed = (-1.0, 1.0, 0.0)[move] * size * rng.uniform(0.12, 0.2)
    grow = float(rng.choice([0.0, 0.04 * size]))
    return dict(vx=speed, omega=float(rng.choice([0.0, 2.0])), grow=grow if half < 0.15 * size else 0.0,
                flicker=bool(rng.random() < 0.2))


def _actions(plan: dict) -> list[int]:
    """The annotated actions of one second's behaviour."""
    out = [1 if plan["vx"] < 0 else 2 if plan["vx"] > 0 else 3]
    out += [4] if plan["omega"] else []
    out += [5] if plan["grow"] else []
    out += [6] if plan["flicker"] else []
    return out


def _render(people: list[_Person], background: np.ndarray, seconds: int, fps: int
            ) -> tuple[np.ndarray, list[list[tuple[float, float, float, float]]]]:
    """Frames uint8 [T, H, W, 3] and each frame's person boxes (pixels, x1 y1 x2 y2)."""
    size = background.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    frames = np.empty((seconds * fps, size, size, 3), np.uint8)
    boxes: list[list[tuple[float, float, float, float]]] = []
    state = [[p.x, p.half, p.angle] for p in people]
    for t in range(seconds * fps):
        # the plan of second s covers [s - 0.5, s + 0.5): keyframe s sits in its middle
        plan_index = min((t + fps // 2) // fps, seconds - 1)
        img = background.astype(np.float32) / 255
        frame_boxes = []
        for p, st in zip(people, state, strict=True):
            plan = p.plans[plan_index]
            x, half, angle = st
            u = np.cos(angle) * (xx - x) + np.sin(angle) * (yy - p.y)
            v = -np.sin(angle) * (xx - x) + np.cos(angle) * (yy - p.y)
            mask = (np.abs(u) < half) & (np.abs(v) < half)
            colour = p.colour2 if plan["flicker"] and (t // 2) % 2 else p.colour
            stripe = np.abs(v) < half * 0.25
            img = np.where(mask[..., None], np.where(stripe[..., None], p.colour2 * 0.5, colour), img)
            extent = half * (abs(np.cos(angle)) + abs(np.sin(angle)))
            frame_boxes.append((x - extent, p.y - extent, x + extent, p.y + extent))
            st[0] = x + plan["vx"] / fps
            st[1] = half + plan["grow"] / fps
            st[2] = angle + plan["omega"] / fps
        frames[t] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        boxes.append(frame_boxes)
    return frames, boxes


def _norm(box: tuple[float, float, float, float], size: int) -> tuple[float, float, float, float]:
    """Pixel box -> normalised, clipped to [0, 1], rounded to 3 decimals as AVA's files."""
    return tuple(round(float(np.clip(v / size, 0.0, 1.0)), 3) for v in box)  # type: ignore[return-value]


def write_ava_fixture(out: str, videos: dict[str, int] | None = None, keyframes: int = 6, fps: int = 8,
                      size: int = 64, seed: int = 0) -> AvaFixture:
    """Write a generated AVA-format set into `out` (`videos`: split -> number of videos) and describe it."""
    videos = videos or {"train": 2, "val": 1}
    rng = np.random.default_rng(seed)
    seconds = FIRST_KEYFRAME - CLIP_START_SECOND + keyframes + 2  # two seconds before and after the keyframes
    keyframe_seconds = tuple(range(FIRST_KEYFRAME, FIRST_KEYFRAME + keyframes))
    label_map = LabelMap(dict(ACTIONS))
    ids: dict[str, tuple[str, ...]] = {}
    for split, count in videos.items():
        ids[split] = tuple(f"{split}{i:02d}_gen{seed}" for i in range(count))
        rows: list[Annotation] = []
        proposals: list[Proposal] = []
        frame_paths: dict[str, list[str]] = {}
        for video in ids[split]:
            background = (rng.uniform(0.2, 0.5, (1, 1, 3)) * 255 * np.ones((size, size, 1))).astype(np.uint8)
            people = []
            for _ in range(int(rng.integers(2, 4))):
                x0 = x = float(rng.uniform(0.3, 0.7) * size)
                half0 = half = float(size * rng.uniform(0.08, 0.12))
                plans = []
                for _ in range(seconds):  # each second's plan keeps the square inside the frame and small
                    plans.append(_plan(rng, x, half, size))
                    x, half = x + plans[-1]["vx"], half + plans[-1]["grow"]
                people.append(_Person(x0, float(rng.uniform(0.3, 0.7) * size), half0,
                                      float(rng.uniform(0, np.pi)), rng.uniform(0.5, 1.0, 3),
                                      rng.uniform(0.0, 0.4, 3), plans))
            frames, boxes = _render(people, background, seconds, fps)
            folder = os.path.join(out, "frames", video)
            os.makedirs(folder, exist_ok=True)
            frame_paths[video] = []
            for k, img in enumerate(frames, 1):
                rel = f"{video}/{video}_{k:06d}.jpg"
                Image.fromarray(img).save(os.path.join(out, "frames", rel), quality=95)
                frame_paths[video].append(rel)
            for sec in keyframe_seconds:
                t = (sec - CLIP_START_SECOND) * fps
                for pid, (person, box) in enumerate(zip(people, boxes[t], strict=True)):
                    norm = _norm(box, size)
                    plan = person.plans[sec - CLIP_START_SECOND]
                    rows += [Annotation(video, sec, norm, a, pid) for a in _actions(plan)]
                    jitter = np.clip(np.add(norm, rng.normal(0, 0.02, 4)), 0, 1)
                    jittered = _norm(tuple(jitter * size), size)
                    if jittered[0] < jittered[2] and jittered[1] < jittered[3]:
                        proposals.append(Proposal(video, sec, jittered, round(float(rng.uniform(0.7, 1.0)), 3)))
                for _ in range(int(rng.integers(0, 3))):  # false positives
                    x1, y1 = rng.uniform(0, 0.7, 2)
                    w, h = rng.uniform(0.1, 0.3, 2)
                    fp = _norm((x1 * size, y1 * size, (x1 + w) * size, (y1 + h) * size), size)
                    proposals.append(Proposal(video, sec, fp, round(float(rng.uniform(0.05, 0.85)), 3)))
        ann = os.path.join(out, "annotations")
        write_annotations(os.path.join(ann, ANNOTATIONS[split]), rows)
        write_proposals(os.path.join(ann, PROPOSALS[split]), proposals)
        write_frame_list(os.path.join(out, "frame_lists", f"{split}.csv"), frame_paths)
        excluded = [(ids[split][0], keyframe_seconds[-1])] if split == "val" else []
        write_excluded(os.path.join(ann, EXCLUDED[split]), excluded)
    write_label_map(os.path.join(out, "annotations", LABEL_MAP), label_map)
    return AvaFixture(out, fps, size, keyframe_seconds, ids)


def ensure_ava_fixture(cache_dir: str | None = None, videos: dict[str, int] | None = None, keyframes: int = 6,
                       fps: int = 8, size: int = 64, seed: int = 0) -> str:
    """A generated AVA-format set made once (atomically) in the synthetic-data cache; returns its folder."""
    from datasets.synthetic import cached_build

    videos = videos or {"train": 2, "val": 1}
    params = dict(videos=videos, keyframes=keyframes, fps=fps, size=size, seed=seed, version=1)
    marker = os.path.join("annotations", LABEL_MAP)  # written last
    return cached_build("ava", params, marker,
                        lambda tmp: write_ava_fixture(tmp, videos, keyframes, fps, size, seed), cache_dir)
