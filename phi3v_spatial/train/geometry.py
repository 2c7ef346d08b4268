"""Ground-truth geometry of synthetic records, for the trainer's auxiliary geometry loss.

Why: a yes/no relation answer is one bit about two objects. A small model trained from scratch on such answers
did not learn to fetch a named object's place from the image tokens: at the object's name in the question its
image position was not linearly decodable (R^2 0.17 after the adapter's first phase, 0.0 in the base), and every
relation got answered from one shared score (docs/EMBEDDED_MODEL.md). The synthetic scenes know every object's
place, so training can ask for it directly (deep supervision): a linear head reads each object name's last token
at one layer and regresses that object's image position, apparent size and depth, another reads the answer
position at a later layer and regresses the difference between the two named objects. A referring expression's
last token ("the biggest cube") regresses the place of the object it means, in refer plans as in refer questions,
so a plan resolves its expression where it reads it, the way the question does. The heads are a training aid
only; the adapter that comes out is a plain PEFT adapter, and inference never sees them.

Only synthetic records carry this (their folder holds ``scenes.jsonl``, written by ``data.synth``); VSR and other
records train without it.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from ..data.records import SpatialRecord
from ..data.scene import Camera

# What the heads regress, per object: image column and row (each scaled so the image spans -2..2), the log of
# the apparent size in pixels (centred and scaled for the synthetic scenes: 20 px -> 0, x1.65 per unit), and the
# depth along the camera axis (3.25 m -> 0, 1 m per unit: variance about 0.5 like the others). Without depth the
# in-front/behind/closer/farther questions sat at 87-91% yes/no against 95-99% for left/right/above/below; a depth
# scale of 0.7 m per unit weighed it so much that counting and open answers fell (docs/EMBEDDED_MODEL.md).
GEOMETRY_FEATURES = ("u", "v", "log_apparent_size", "depth")
LOG_SIZE_CENTRE = 3.0
LOG_SIZE_SCALE = 0.5
DEPTH_CENTRE_M = 3.25
DEPTH_SCALE_M = 1.0
_IMAGE_NAME = re.compile(r"(?:^|/)(?P<scene>[^/]+)_c(?P<camera>\d+)_f(?P<frame>\d+)\.png$")


class SceneGeometry:
    """Looks up ``GEOMETRY_FEATURES`` of named objects in synthetic records, from the ``scenes.jsonl`` beside them
    (read once per folder; folders without it give None for every record)."""

    def __init__(self):
        self._scenes: dict[str, dict | None] = {}

    def _scenes_of(self, root: str) -> dict | None:
        key = os.path.abspath(root)
        if key not in self._scenes:
            path = os.path.join(key, "scenes.jsonl")
            scenes = None
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    scenes = {d["id"]: d for d in (json.loads(line) for line in f if line.strip())}
            self._scenes[key] = scenes
        return self._scenes[key]

    def scene_of_image(self, path: str, root: str | None = None) -> dict | None:
        """The ground truth of the scene an image of ``data.synth`` shows (``<scene>_c<k>_f<n>.png``), from the
        ``scenes.jsonl`` in ``root`` (default: the folder above the image's ``images/`` folder); None when unknown."""
        return self._image_scene(path, root)[1]

    def _image_scene(self, path: str, root: str | None) -> tuple:
        """(the image name's match: scene, camera, frame; the scene's ground truth), None for what is unknown."""
        m = _IMAGE_NAME.search(path.replace(os.sep, "/"))
        if root is None:
            root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        scenes = self._scenes_of(root)
        return m, (None if m is None or scenes is None else scenes.get(m["scene"]))

    def object_features(self, record: SpatialRecord, root: str, name: str, image: int = 0) -> np.ndarray | None:
        """``GEOMETRY_FEATURES`` (u, v, log apparent size, depth), scaled, of object ``name`` in the record's
        ``image``-th image; None when unknown."""
        if not 0 <= image < len(record.images):
            return None
        m, scene = self._image_scene(record.images[image], root)
        if scene is None:
            return None
        obj = next((o for o in scene["objects"] if o["name"] == name), None)
        cam_index, frame = int(m["camera"]), int(m["frame"])
        if obj is None or cam_index >= len(scene["cameras"]) or frame >= len(obj["positions"]):
            return None
        c = scene["cameras"][cam_index][min(frame, len(scene["cameras"][cam_index]) - 1)]
        cam = Camera(fx=c["fx"], fy=c["fy"], cx=c["cx"], cy=c["cy"], width=c["width"], height=c["height"],
                     R=np.asarray(c["R"], dtype=np.float64), t=np.asarray(c["t"], dtype=np.float64))
        uv, z = cam.project(np.asarray(obj["positions"][frame], dtype=np.float64)[None])
        if not z[0] > 0:
            return None
        u, v = uv[0]
        apparent = cam.fx * float(obj["size"]) / float(z[0])
        return np.array([4.0 * (u / cam.width - 0.5), 4.0 * (v / cam.height - 0.5),
                         (np.log(apparent) - LOG_SIZE_CENTRE) / LOG_SIZE_SCALE,
                         (float(z[0]) - DEPTH_CENTRE_M) / DEPTH_SCALE_M], dtype=np.float32)

    def _about_image(self, record: SpatialRecord) -> int | None:
        """The image a single-image relation question is about: the only one, or a two-camera question's."""
        if len(record.images) == 1:
            return 0
        if record.family == "two cameras" and record.label is not None:
            return int(record.about_image)
        return None

    def question_objects(self, record: SpatialRecord, root: str) -> list[tuple[int, str, np.ndarray]] | None:
        """The two objects a two-object relation question names, in the order the question names them: (where the
        name starts in the question, name, features); None for other records (superlatives, counting, VSR,
        motion ...). Two-camera yes/no questions use the image they ask about."""
        image = self._about_image(record)
        if image is None or not record.subj or not record.obj:
            return None
        if record.type not in ("yesno", "choice") and not (record.type == "multiframe" and image is not None
                                                          and len(record.images) > 1):
            return None
        if record.type == "choice" and len(record.choices) != 2:
            return None
        found = [(record.question.find(n), n) for n in (record.subj, record.obj)]
        if any(k < 0 for k, _ in found) or found[0][0] == found[1][0]:
            return None
        out = []
        for start, name in sorted(found):
            f = self.object_features(record, root, name, image)
            if f is None:
                return None
            out.append((start, name, f))
        return out

    def motion_objects(self, record: SpatialRecord, root: str) -> list[tuple[int, str, np.ndarray]] | None:
        """Objects a two-frame motion question names (the subject and object, or every listed choice of "Which
        object moved?"): (where the name starts in the question, name, last-frame minus first-frame features)."""
        if record.type != "multiframe" or record.family not in ("motion", "relation change") or len(record.images) != 2:
            return None
        names = [n for n in (record.subj, record.obj) if n]
        names += [c for c in record.choices if c not in names and " " in c]
        out = []
        for name in names:
            start = record.question.find(name)
            a, b = (self.object_features(record, root, name, k) for k in (0, 1))
            if start >= 0 and a is not None and b is not None:
                out.append((start, name, b - a))
        return out or None

    def answer_object(self, record: SpatialRecord, root: str) -> np.ndarray | None:
        """Features of the object a one-object answer names (open questions, referring expressions, choices between
        objects, "Which object moved?" in its last frame); None for other records."""
        if not record.subj or record.answer != record.subj:
            return None
        if record.type in ("open", "refer") or (record.type == "choice" and len(record.images) == 1):
            return self.object_features(record, root, record.subj, 0)
        if record.type == "multiframe" and record.family == "motion" and len(record.images) == 2:
            return self.object_features(record, root, record.subj, 1)
        return None

    def expression_object(self, record: SpatialRecord, root: str) -> tuple[int, str, np.ndarray] | None:
        """The referring expression of a refer question or refer plan: (where it starts in the question, the
        expression, features of the object it means); None for other records. A refer plan's expression means its
        target (``subj``) unless the instruction names the target, then its reference (``obj``)."""
        if not record.expression or len(record.images) != 1 or not record.subj:
            return None
        if record.type == "refer":
            meant = record.subj
        elif record.type == "plan" and record.family == "refer":
            meant = record.subj if f"the {record.subj}" not in record.question else record.obj
        else:
            return None
        start = record.question.find(record.expression)
        feats = self.object_features(record, root, meant, 0) if start >= 0 and meant else None
        return None if feats is None else (start, record.expression, feats)

    def plan_pair(self, record: SpatialRecord, root: str) -> np.ndarray | None:
        """Subject minus object features of a one-relation plan instruction (move, refer, done); None otherwise."""
        if record.type != "plan" or record.family not in ("move", "refer", "done") or len(record.images) != 1:
            return None
        if not record.subj or not record.obj:
            return None
        a, b = (self.object_features(record, root, n, 0) for n in (record.subj, record.obj))
        return None if a is None or b is None else a - b

    def plan_objects(self, record: SpatialRecord, root: str) -> list[tuple[str, np.ndarray]] | None:
        """The objects a plan answer names (step targets and references, first mention order) with their features
        in the plan's image; None for other records."""
        if record.type != "plan" or not record.plan or len(record.images) != 1:
            return None
        out, seen = [], set()
        for step in record.plan:
            for name in (step.get("target", ""), step.get("reference", "")):
                if name and name not in seen:
                    seen.add(name)
                    f = self.object_features(record, root, name, 0)
                    if f is not None:
                        out.append((name, f))
        return out or None


HEADS_FILE = "geometry_heads.safetensors"


def make_geometry_heads(hidden_size: int, layers: tuple[int, int]):
    """The two linear heads (a ``torch.nn.Module``); built here so that importing this module needs no torch."""
    import torch

    class GeometryHeads(torch.nn.Module):
        """Read ``hidden_states[layers[0]]`` at object names (``name``: the object's features; ``motion``: their
        change between two frames) and ``hidden_states[layers[1]]`` at answer positions (``answer``: first-named minus
        second-named object; ``target``: the object the answer names next, and at a referring expression's last
        token the object it means); ``loss`` sums each head's mean squared error."""

        def __init__(self):
            super().__init__()
            self.layers = (int(layers[0]), int(layers[1]))
            n = len(GEOMETRY_FEATURES)
            self.name = torch.nn.Linear(hidden_size, n)
            self.answer = torch.nn.Linear(hidden_size, n)
            self.motion = torch.nn.Linear(hidden_size, n)
            self.target = torch.nn.Linear(hidden_size, n)

        def loss(self, hidden_states, batch: dict) -> tuple:
            """(summed loss tensor, {head: float}) for a batch from ``SpatialCollator``."""
            total = hidden_states[0].new_zeros(())
            parts = {}
            for key, head, layer in (("name", self.name, self.layers[0]), ("answer", self.answer, self.layers[1]),
                                     ("motion", self.motion, self.layers[0]), ("target", self.target, self.layers[1])):
                index = batch.get(f"geometry_{key}_index")
                if index is None or len(index) == 0:
                    continue
                h = hidden_states[layer][index[:, 0], index[:, 1]].float()
                mse = ((head(h) - batch[f"geometry_{key}_target"].to(h.device)) ** 2).mean()
                total = total + mse
                parts[key] = float(mse.detach())
            return total, parts

        def save(self, out_dir: str) -> str:
            from safetensors.torch import save_file

            path = os.path.join(out_dir, HEADS_FILE)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, path,
                      metadata={"layers": json.dumps(list(self.layers)), "features": json.dumps(GEOMETRY_FEATURES)})
            return path

        def load(self, in_dir: str) -> bool:
            """Continue the heads saved in ``in_dir`` (a previous phase); False when there are none that fit."""
            from safetensors import safe_open
            from safetensors.torch import load_file

            path = os.path.join(in_dir, HEADS_FILE)
            if not os.path.isfile(path):
                return False
            with safe_open(path, "pt") as f:
                saved_layers = tuple(json.loads((f.metadata() or {}).get("layers", "[]")))
            state = load_file(path)
            if saved_layers != self.layers or any(state[k].shape != v.shape for k, v in self.state_dict().items()
                                                  if k in state):
                return False
            own = self.state_dict()   # heads saved before the motion / target heads existed continue the rest
            self.load_state_dict({**own, **{k: v for k, v in state.items() if k in own}})
            return True

    return GeometryHeads()
