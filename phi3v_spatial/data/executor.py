"""Executes high-level plans (``PlanStep``s) on a synthetic 3D scene and checks the instruction's goal.

Why: a plan that parses is not a plan that works. The executor applies pick / place steps the way a robot's
placement module would (a place step names a reference object and a relation; the executor finds a free spot on
the ground on that side, or takes explicit camera-frame coordinates from ``detail``), rejects what a robot could
not do (unknown objects, placing without picking, into another object, off the ground plane), and then checks the
goal with the same ``relation_holds`` that labels the training data, in camera 0's view at frame 0 (the image a
plan is asked about). Training data, evaluation and the demo all judge plans here.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .scene import (
    DEPTH_MARGIN_M, LATERAL_MARGIN_M, Camera, SynthObject, SynthScene, relation_holds,
)

# Relations a place step can realise on the ground (the vertical and size relations cannot be placed).
PLACE_RELATIONS = ("left of", "right of", "in front of", "behind")
ACTIONS = ("pick", "place")
# The ground plane a robot may place on (world X right, Y forward from camera 0): a margin around the area
# where the synthetic scenes put their objects (x in [-1.4, 1.4], y in [1.8, 4.5]).
GROUND_X = (-2.2, 2.2)
GROUND_Y = (1.3, 6.0)
CLEARANCE_M = 0.05          # free space kept between footprints
PLACE_GAP_M = 0.15          # reference edge to placed object's edge, before the relation's own margin
_LATERAL_OFFSETS = (0.0, 0.4, -0.4, 0.8, -0.8)
_EXTRA_GAPS = (0.0, 0.3, 0.6)
_COORDS = re.compile(r"x\s*=\s*(-?\d+(?:\.\d+)?)\s*m?\b.*?z\s*=\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE | re.DOTALL)


def scene_from_json(d: dict) -> SynthScene:
    """A ``SynthScene`` (no images) from ``scenes.jsonl``'s ``SynthScene.to_json`` line."""
    objects = [SynthObject(colour=o["colour"], shape=o["shape"], size=float(o["size"]),
                           positions=[np.asarray(p, dtype=np.float64) for p in o["positions"]],
                           yaw=float(o.get("yaw", 0.0)), dims=tuple(float(x) for x in o["dims"]))
               for o in d["objects"]]
    cameras = [[Camera(fx=c["fx"], fy=c["fy"], cx=c["cx"], cy=c["cy"], width=int(c["width"]), height=int(c["height"]),
                       R=np.asarray(c["R"], dtype=np.float64), t=np.asarray(c["t"], dtype=np.float64)) for c in cams]
               for cams in d["cameras"]]
    return SynthScene(id=str(d["id"]), objects=objects, cameras=cameras, stamps_ns=[int(s) for s in d["stamps_ns"]],
                      motion=d.get("motion", "none"), moving=d.get("moving", ""), direction=d.get("direction", ""))


def object_name(text: str) -> str:
    """A step's object reference as a scene name: lower case, no article, single spaces."""
    words = str(text).strip().lower().rstrip(".").split()
    if words and words[0] in ("the", "a", "an"):
        words = words[1:]
    return " ".join(words)


@dataclass
class Execution:
    """What happened when a plan ran: the scene afterwards (frame 0 moved), the objects moved, and every
    rejected step's reason (execution stops at the first one)."""

    scene: SynthScene
    steps_total: int
    steps_valid: int = 0
    moved: set = field(default_factory=set)
    errors: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class PlanVerdict:
    """The executor's judgement of a plan reply against its instruction's goal."""

    success: bool
    reason: str
    steps_total: int = 0
    steps_valid: int = 0
    goal_holds: bool = False
    others_untouched: bool = True


class PlanExecutor:
    """Applies steps to a copy of ``scene`` as seen by ``camera`` (frame 0): ``pick`` lifts an object, ``place``
    puts the held object down ``relation`` the reference, at the explicit camera-frame ``x=.. m, z=.. m`` of the
    step's ``detail`` if it has one, else at the first free spot on that side."""

    def __init__(self, scene: SynthScene, camera: int = 0):
        self.scene = copy.copy(scene)
        self.scene.objects = [copy.copy(o) for o in scene.objects]
        for o in self.scene.objects:
            o.positions = [np.array(p, dtype=np.float64) for p in o.positions]
        self.camera = camera
        self.cam = scene.cameras[camera][0]
        right = np.asarray(self.cam.R[0], dtype=np.float64)
        fwd = np.array([self.cam.R[2][0], self.cam.R[2][1], 0.0])
        self.axes = {"right of": right, "left of": -right, "behind": fwd / np.linalg.norm(fwd),
                     "in front of": -fwd / np.linalg.norm(fwd)}
        self.held: str | None = None

    def _object(self, name: str) -> SynthObject | None:
        return next((o for o in self.scene.objects if o.name == name), None)

    def _clear(self, obj: SynthObject, pos: np.ndarray) -> str:
        """"" when ``obj`` fits at ``pos`` on the ground, else what is in the way."""
        if not (GROUND_X[0] <= pos[0] <= GROUND_X[1] and GROUND_Y[0] <= pos[1] <= GROUND_Y[1]):
            return f"off the ground plane (x={pos[0]:.2f} m, y={pos[1]:.2f} m is outside the workspace)"
        if self.cam.to_camera(pos[None])[0][2] < 0.5:
            return "off the ground plane (behind or under the camera)"
        for o in self.scene.objects:
            if o is obj:
                continue
            if np.hypot(*(pos[:2] - o.positions[0][:2])) < obj.radius + o.radius + CLEARANCE_M:
                return f"into the {o.name}"
        return ""

    def _spot(self, obj: SynthObject, ref: SynthObject, relation: str) -> tuple[np.ndarray | None, str]:
        axis = self.axes[relation]
        perp = np.array([-axis[1], axis[0], 0.0])
        margin = LATERAL_MARGIN_M if relation in ("left of", "right of") else DEPTH_MARGIN_M
        gap0 = max(obj.radius + ref.radius + PLACE_GAP_M, margin + 0.1)
        first_problem = ""
        for extra in _EXTRA_GAPS:
            for lateral in _LATERAL_OFFSETS:
                pos = ref.positions[0] + axis * (gap0 + extra) + perp * lateral
                pos[2] = obj.dims[2] / 2
                problem = self._clear(obj, pos)
                if not problem and self._holds_at(obj, pos, relation, ref.name):
                    return pos, ""
                first_problem = first_problem or problem
        return None, f"no free spot {relation} the {ref.name} on the ground" + (
            f" (first try: {first_problem})" if first_problem else "")

    def _holds_at(self, obj: SynthObject, pos: np.ndarray, relation: str, ref: str) -> bool:
        old = obj.positions[0]
        obj.positions[0] = pos
        try:
            return relation_holds(self.scene, obj.name, relation, ref, 0, self.camera) is True
        finally:
            obj.positions[0] = old

    def _explicit(self, obj: SynthObject, detail: str) -> np.ndarray | None:
        """The ground point at camera-frame x, z (metres) named in ``detail``, or None."""
        m = _COORDS.search(detail or "")
        if not m:
            return None
        x, z = float(m.group(1)), float(m.group(2))
        R, t = np.asarray(self.cam.R), np.asarray(self.cam.t)
        # world = R^T (c - t), c = (x, y, z); choose the camera-frame y that puts the centre at height h/2.
        base = R.T @ (np.array([x, 0.0, z]) - t)
        slope = R.T[2, 1]
        if abs(slope) < 1e-6:
            return None
        y = (obj.dims[2] / 2 - base[2]) / slope
        return R.T @ (np.array([x, y, z]) - t)

    def step(self, step: dict) -> str:
        """Apply one step; returns "" or why it is rejected (the scene is then unchanged)."""
        action = str(step.get("action", "")).strip().lower()
        target = object_name(step.get("target", ""))
        obj = self._object(target)
        if action not in ACTIONS:
            return f"unknown action {action!r} (the executor knows {', '.join(ACTIONS)})"
        if obj is None:
            return f"{action} {target!r}: no such object in the scene"
        if action == "pick":
            if self.held is not None:
                return f"pick the {target} while holding the {self.held}"
            self.held = target
            return ""
        if self.held != target:
            return f"place the {target} without picking it first" if self.held is None else \
                f"place the {target} while holding the {self.held}"
        relation = str(step.get("relation", "")).strip().lower()
        ref = self._object(object_name(step.get("reference", "")))
        if relation not in PLACE_RELATIONS:
            return f"place the {target} {relation!r}: a place step needs one of {', '.join(PLACE_RELATIONS)}"
        if ref is None:
            return f"place the {target} {relation} {object_name(step.get('reference', ''))!r}: no such object"
        if ref is obj:
            return f"place the {target} {relation} itself"
        pos = self._explicit(obj, str(step.get("detail", "")))
        if pos is not None:
            problem = self._clear(obj, pos)
            if problem:
                return f"place the {target} {problem}"
        else:
            pos, problem = self._spot(obj, ref, relation)
            if pos is None:
                return f"place the {target}: {problem}"
        obj.positions[0] = pos
        self.held = None
        return ""

    def run(self, steps: Sequence[dict]) -> Execution:
        ex = Execution(scene=self.scene, steps_total=len(steps))
        before = {o.name: o.positions[0].copy() for o in self.scene.objects}
        for k, s in enumerate(steps):
            problem = self.step(s)
            if problem:
                ex.errors.append(f"step {k + 1}: {problem}")
                break
            ex.steps_valid += 1
        if ex.ok and self.held is not None:
            ex.errors.append(f"the plan ends holding the {self.held}")
        ex.moved = {n for n, p in before.items() if not np.allclose(p, self._object(n).positions[0], atol=1e-9)}
        return ex


def execute_plan(scene: SynthScene, steps: Sequence[dict], camera: int = 0) -> Execution:
    """Run ``steps`` on a copy of ``scene`` (the original is never changed)."""
    return PlanExecutor(scene, camera).run(steps)


def goal_holds(scene: SynthScene, goal: Iterable[Sequence[str]], camera: int = 0) -> bool:
    """Every (subject, relation, object) of ``goal`` clearly holds in ``camera``'s view at frame 0."""
    return all(relation_holds(scene, s, r, o, 0, camera) is True for s, r, o in goal)


def judge_plan(scene: SynthScene, steps: Sequence[dict], goal: Sequence[Sequence[str]], movable: Iterable[str],
               missing: Sequence[str] = (), said_missing: Sequence[str] = (), camera: int = 0) -> PlanVerdict:
    """Success of a plan reply (``steps`` + the objects it says are not in view) for an instruction with ``goal``
    and ``movable`` objects; ``missing`` are the instruction's objects that are not in the scene.

    An instruction about a missing object succeeds only with no steps and that object named as missing; any
    other succeeds when every step executes, the goal holds afterwards and no object outside ``movable`` moved."""
    said = {object_name(m) for m in said_missing}
    if missing:
        want = {object_name(m) for m in missing}
        if steps:
            return PlanVerdict(False, f"planned {len(steps)} steps although the {', '.join(sorted(want))} is not in view",
                               steps_total=len(steps))
        if not want <= said:
            return PlanVerdict(False, f"did not say that the {', '.join(sorted(want - said))} is not in view")
        return PlanVerdict(True, "refused: " + ", ".join(sorted(want)) + " not in view", goal_holds=False)
    if said:
        return PlanVerdict(False, f"said {', '.join(sorted(said))} is not in view, but it is", steps_total=len(steps))
    ex = execute_plan(scene, steps, camera)
    if not ex.ok:
        return PlanVerdict(False, "; ".join(ex.errors), ex.steps_total, ex.steps_valid)
    holds = goal_holds(ex.scene, goal, camera)
    stray = sorted(ex.moved - {object_name(m) for m in movable})
    if not holds:
        reason = "the goal does not hold after execution: " + "; ".join(
            f"{s} {r} {o}: {relation_holds(ex.scene, s, r, o, 0, camera)}" for s, r, o in goal)
    elif stray:
        reason = f"moved the {', '.join(stray)}, which the instruction did not name"
    else:
        reason = "goal holds" + (" (nothing to do)" if not steps else "")
    return PlanVerdict(holds and not stray, reason, ex.steps_total, ex.steps_valid, holds, not stray)
