"""Seeded synthetic spatial scenes with real 3D ground truth, and the datasets made from them.

Why: a fine-tuned spatial adapter needs labels that are *true*, so every answer here is computed from the
3D scene (in the camera frame of the image asked about), SpatialVLM/VQASynth-style, instead of being
annotated. Scenes are small (2-4 colour-distinct objects), so a tiny model can learn from them.

Public API
----------
``make_scene(seed, num_objects=(2, 4), frames=1, cameras=1, size=(160, 120), motion="none", scene_id=None,
start_ns=SYNTH_EPOCH_NS, period_ns=FRAME_PERIOD_NS) -> SynthScene``
    ``seed``: int or sequence of ints (numpy ``default_rng``); same seed -> bit-identical scene and images.
    ``motion``: "none", "camera" (the camera rig translates) or "object" (one object slides on the ground).
    Result: ``.images[camera][frame]`` (H x W x 3 RGB uint8), ``.masks[camera][frame]`` (object index + 1),
    ``.objects`` (``SynthObject``: ``name`` "<colour> <shape>", ``colour``, ``shape``, ``size`` (m, largest
    dimension), ``dims``, ``positions[frame]`` world centre), ``.cameras[camera][frame]`` (``Camera``: fx, fy,
    cx, cy, R, t with ``x_cam = R @ x_world + t``), ``.stamps_ns[frame]`` (5 Hz by default).
``scene_records(scene, image_paths, rng, kinds=None, counts=None, plan_templates="train") -> list[SpatialRecord]``
    Question records (see ``questions.py``); ``image_paths[camera][frame]`` (or a flat list for camera 0).
``generate_dataset(out_dir, num, seed, frames=1, cameras=1, size=(160, 120), kinds=None, num_objects=(2, 4),
motion="auto", on_scene=None, progress=False, counts=None) -> str``
    Writes ``out_dir/images/*.png``, ``out_dir/records.jsonl`` (returned) and ``out_dir/scenes.jsonl`` (ground truth).
``relation_holds(scene, subj, relation, obj, frame=0, camera=0) -> bool | None``; ``distance``, ``camera_distance``.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import cv2
import numpy as np

from .questions import DEFAULT_KINDS, KINDS, scene_records
from .records import write_jsonl
from .render import object_mesh, render, render_alone
from .scene import (
    PALETTE, RELATIONS, SHAPES, Camera, SynthObject, SynthScene, camera_distance, distance, look_at, moved,
    relation_holds, shape_dims,
)

__all__ = [
    "make_scene", "scene_records", "generate_dataset", "relation_holds", "distance", "camera_distance", "parse_size",
    "SynthScene", "SynthObject", "Camera", "PALETTE", "SHAPES", "RELATIONS", "KINDS", "DEFAULT_KINDS",
    "SYNTH_EPOCH_NS", "FRAME_PERIOD_NS", "SCENE_GAP_NS", "DEFAULT_SIZE",
]

SYNTH_EPOCH_NS = 1_700_000_000 * 10**9  # fixed start time: bags and stamps are reproducible
FRAME_PERIOD_NS = 200_000_000  # 5 Hz
SCENE_GAP_NS = 1_000_000_000  # silence between consecutive scenes in a dataset / bag
DEFAULT_SIZE = (160, 120)
MOTIONS = ("none", "camera", "object")

# Camera rig (world frame): camera 0 looks down the +Y axis; camera 1 watches the same area from the right.
CAM0_EYE, CAM1_EYE, RIG_TARGET = (0.0, 0.0, 1.3), (1.5, 0.9, 1.5), (0.0, 3.0, 0.1)
DIRECTIONS = {"left": (-1.0, 0.0, 0.0), "right": (1.0, 0.0, 0.0), "away": (0.0, 1.0, 0.0), "towards": (0.0, -1.0, 0.0)}
MIN_VISIBLE_FRAC = 0.6


def parse_size(text: str) -> tuple[int, int]:
    """``"160x120"`` -> (160, 120)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad image size {text!r}: expected WxH, e.g. 160x120") from None
    if w < 32 or h < 32:
        raise ValueError(f"image size {text!r} too small: at least 32x32")
    return w, h


def _in_view(obj: SynthObject, cam: Camera, frame: int) -> bool:
    verts, _ = object_mesh(obj, frame)
    uv, z = cam.project(verts)
    m = 0.02 * cam.width
    return bool(np.all(z > 0.3) and np.all(uv[:, 0] >= m) and np.all(uv[:, 0] <= cam.width - 1 - m)
                and np.all(uv[:, 1] >= m) and np.all(uv[:, 1] <= cam.height - 1 - m))


def _apart(a: SynthObject, b: SynthObject, frames: int) -> bool:
    return all(np.hypot(*(a.positions[f][:2] - b.positions[f][:2])) >= a.radius + b.radius + 0.1 for f in range(frames))


def _sample_object(rng: np.random.Generator, colour: str, frames: int) -> SynthObject:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    size = float(rng.uniform(0.3, 0.7))
    dims = shape_dims(shape, size)
    yaw = float(rng.uniform(0.0, np.pi / 2)) if shape == "cube" else 0.0
    x, y = float(rng.uniform(-1.4, 1.4)), float(rng.uniform(1.8, 4.5))
    elevation = float(rng.uniform(0.3, 0.8)) if rng.random() < 0.3 else 0.0  # some float, so above/below occur
    centre = np.array([x, y, elevation + dims[2] / 2])
    return SynthObject(colour=colour, shape=shape, size=size, positions=[centre.copy() for _ in range(frames)],
                       yaw=yaw, dims=dims)


def make_scene(seed, num_objects: int | tuple[int, int] = (2, 4), frames: int = 1, cameras: int = 1,
               size: tuple[int, int] = DEFAULT_SIZE, motion: str = "none", scene_id: str | None = None,
               start_ns: int = SYNTH_EPOCH_NS, period_ns: int = FRAME_PERIOD_NS) -> SynthScene:
    """Sample and render one scene (see module docstring). Rejection-samples until every object is in view,
    non-overlapping and at least 60% unoccluded in every camera and frame."""
    lo, hi = (num_objects, num_objects) if isinstance(num_objects, int) else num_objects
    if not 1 <= lo <= hi <= len(PALETTE):
        raise ValueError(f"num_objects must be within 1..{len(PALETTE)} (distinct colours), got {num_objects}")
    if frames < 1 or cameras not in (1, 2):
        raise ValueError(f"need frames >= 1 and cameras in (1, 2), got frames={frames}, cameras={cameras}")
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    if frames == 1:
        motion = "none"
    rng = np.random.default_rng(seed)
    sid = scene_id if scene_id is not None else "s" + "-".join(str(s) for s in np.atleast_1d(seed))
    base = [look_at(CAM0_EYE, RIG_TARGET, size), look_at(CAM1_EYE, RIG_TARGET, size)][:cameras]
    min_px = (0.045 * size[0]) ** 2
    for _attempt in range(500):
        n = int(rng.integers(lo, hi + 1))
        colours = [str(c) for c in rng.choice(list(PALETTE), size=n, replace=False)]
        direction, moving = "", ""
        offsets = [np.zeros(3)] * frames
        if motion == "camera":
            direction = str(rng.choice(list(DIRECTIONS)))
            total = float(rng.uniform(0.6, 1.0))
            offsets = [np.asarray(DIRECTIONS[direction]) * total * f / (frames - 1) for f in range(frames)]
        cams = [[moved(c, offsets[f]) for f in range(frames)] for c in base]
        objects: list[SynthObject] = []
        for colour in colours:
            for _try in range(60):
                o = _sample_object(rng, colour, frames)
                if all(_apart(o, p, 1) for p in objects) and all(_in_view(o, cs[0], 0) for cs in cams):
                    objects.append(o)
                    break
            else:
                break
        if len(objects) < n:
            continue
        if motion == "object":
            k = int(rng.integers(n))
            direction = str(rng.choice(list(DIRECTIONS)))
            total = float(rng.uniform(0.6, 1.0))
            p0 = objects[k].positions[0]
            objects[k].positions = [p0 + np.asarray(DIRECTIONS[direction]) * total * f / (frames - 1) for f in range(frames)]
            moving = objects[k].name
            if not all(_apart(objects[k], p, frames) for p in objects if p is not objects[k]):
                continue
        if not all(_in_view(o, cs[f], f) for o in objects for cs in cams for f in range(frames)):
            continue
        images, masks, ok = [], [], True
        for cs in cams:
            imgs, msks = [], []
            for f, cam in enumerate(cs):
                img, mask = render(objects, cam, f)
                for i, o in enumerate(objects):
                    alone = render_alone(o, cam, f)
                    if alone < min_px or int((mask == i + 1).sum()) < MIN_VISIBLE_FRAC * alone:
                        ok = False
                imgs.append(img)
                msks.append(mask)
            images.append(imgs)
            masks.append(msks)
        if not ok:
            continue
        scene = SynthScene(id=sid, objects=objects, cameras=cams,
                           stamps_ns=[int(start_ns) + f * int(period_ns) for f in range(frames)],
                           motion=motion, moving=moving, direction=direction, images=images, masks=masks)
        return scene
    raise RuntimeError(f"could not sample a valid scene for seed {seed!r} (num_objects={num_objects}, size={size})")


class _SceneJob:
    """Renders scene ``i`` of a dataset, writes its images and returns (ground truth, records, scene or None);
    a picklable callable, so that a process pool can run it."""

    def __init__(self, out_dir, seed, frames, cameras, size, kinds, num_objects, motion, counts, plan_templates):
        self.out_dir, self.seed, self.frames, self.cameras, self.size = out_dir, seed, frames, cameras, size
        self.kinds, self.num_objects, self.motion, self.counts = kinds, num_objects, motion, counts
        self.plan_templates = plan_templates

    def __call__(self, i: int, keep_scene: bool = False):
        segment_ns = self.frames * FRAME_PERIOD_NS + SCENE_GAP_NS
        m = self.motion
        if m == "auto":
            m = "none" if self.frames == 1 else ("object" if i % 2 == 0 else "camera")
        scene = make_scene((self.seed, i), num_objects=self.num_objects, frames=self.frames, cameras=self.cameras,
                           size=self.size, motion=m, scene_id=f"{i:06d}", start_ns=SYNTH_EPOCH_NS + i * segment_ns)
        paths = []
        for c in range(scene.num_cameras):
            row = []
            for f in range(scene.num_frames):
                rel = f"images/{scene.id}_c{c}_f{f}.png"
                cv2.imwrite(os.path.join(self.out_dir, rel), cv2.cvtColor(scene.images[c][f], cv2.COLOR_RGB2BGR))
                row.append(rel)
            paths.append(row)
        recs = scene_records(scene, paths, np.random.default_rng((self.seed, i, 1)), kinds=self.kinds,
                             counts=self.counts, plan_templates=self.plan_templates)
        return scene.to_json(), recs, (scene if keep_scene else None)


def generate_dataset(out_dir: str, num: int, seed: int, frames: int = 1, cameras: int = 1,
                     size: tuple[int, int] = DEFAULT_SIZE, kinds: Sequence[str] | None = None,
                     num_objects: int | tuple[int, int] = (2, 4), motion: str = "auto",
                     on_scene: Callable[[SynthScene, int], None] | None = None, progress: bool = False,
                     counts: dict[str, int] | None = None, plan_templates: str = "train", workers: int = 1) -> str:
    """Write ``num`` scenes as PNGs + ``records.jsonl`` (+ ``scenes.jsonl`` ground truth); return the records path.

    Scene i uses seed ``(seed, i)`` so a dataset's first k scenes do not depend on ``num``; scene i's frames
    are stamped from ``SYNTH_EPOCH_NS + i * (frames * FRAME_PERIOD_NS + SCENE_GAP_NS)`` (one time segment each,
    as in the bag). ``motion="auto"`` alternates object and camera motion when ``frames > 1``. ``counts``
    overrides records per scene and kind (``questions.DEFAULT_COUNTS``); ``on_scene(scene, i)`` sees each scene;
    ``plan_templates="all"`` adds the instruction templates held out from training (evaluation data); ``workers``
    processes render scenes in parallel (same output; not with ``on_scene``, which needs the scenes here).
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    job = _SceneJob(out_dir, seed, frames, cameras, size, kinds, num_objects, motion, counts, plan_templates)
    records = []
    progress_bar = None
    if progress:
        from tqdm import tqdm

        progress_bar = tqdm(total=num, desc="synth", unit="scene")
    pool = None
    if workers > 1 and on_scene is None and num > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap(job, range(num), chunksize=16)
    else:
        results = (job(i, keep_scene=on_scene is not None) for i in range(num))
    try:
        with open(os.path.join(out_dir, "scenes.jsonl"), "w", encoding="utf-8") as gt:
            for i, (scene_json, recs, scene) in enumerate(results):
                records.extend(recs)
                gt.write(json.dumps(scene_json) + "\n")
                if on_scene is not None:
                    on_scene(scene, i)
                if progress_bar is not None:
                    progress_bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if progress_bar is not None:
            progress_bar.close()
    out = os.path.join(out_dir, "records.jsonl")
    write_jsonl(out, records)
    return out
