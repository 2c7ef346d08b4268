"""3D ground truth of a synthetic scene: pinhole cameras, shaped objects on a ground plane, and relations.

World frame: X right, Y forward (away from camera 0), Z up; the ground is Z = 0. Camera frame: OpenCV
(x right, y down, z forward). Every spatial label is computed from these 3D positions in the camera frame
of the image it is asked about, so a label is true of what that camera sees, not of the world.
Pairs whose difference is under a margin are *ambiguous* (``relation_holds`` returns ``None``) and never
become questions: a tiny model should only ever be taught clear cases.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Named palette: hues far apart so "the red cube" is unambiguous even under shading.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 225),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 190),
    "orange": (255, 130, 0),
}
SHAPES = ("cube", "sphere", "cylinder", "cone")

# relation -> its converse; the yes/no generator asks one of a pair so that exactly one of them holds.
CONVERSE = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
    "in front of": "behind",
    "behind": "in front of",
    "closer to the camera than": "farther from the camera than",
    "farther from the camera than": "closer to the camera than",
    "bigger than": "smaller than",
    "smaller than": "bigger than",
}
RELATIONS = tuple(CONVERSE)

# Margins under which a relation is ambiguous (metres / ratio / fraction of the image width).
LATERAL_MARGIN_M = 0.2
VERTICAL_MARGIN_M = 0.15
DEPTH_MARGIN_M = 0.35
SIZE_RATIO_MARGIN = 1.3
IMAGE_MARGIN_FRAC = 0.03


@dataclass
class Camera:
    """Pinhole camera: ``x_cam = R @ x_world + t``; pixel ``u = fx * x/z + cx`` (pixel centres at integers)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    R: np.ndarray
    t: np.ndarray

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def position(self) -> np.ndarray:
        """Camera centre in the world frame."""
        return -self.R.T @ self.t

    def to_camera(self, pts_world: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts_world, dtype=np.float64)
        return pts @ self.R.T + self.t

    def project(self, pts_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (N, 3) -> pixel coordinates (N, 2) and camera-frame depth z (N,)."""
        pc = self.to_camera(np.atleast_2d(pts_world))
        z = pc[:, 2]
        uv = np.stack([self.fx * pc[:, 0] / z + self.cx, self.fy * pc[:, 1] / z + self.cy], axis=1)
        return uv, z

    def to_json(self) -> dict:
        return {"fx": self.fx, "fy": self.fy, "cx": self.cx, "cy": self.cy, "width": self.width,
                "height": self.height, "R": self.R.tolist(), "t": self.t.tolist()}


def look_at(eye, target, size: tuple[int, int], focal_frac: float = 0.9) -> Camera:
    """A level (no roll) camera at ``eye`` looking at ``target``; focal length = focal_frac * width."""
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])
    w, h = size
    f = focal_frac * w
    return Camera(fx=f, fy=f, cx=(w - 1) / 2.0, cy=(h - 1) / 2.0, width=w, height=h, R=R, t=-R @ eye)


def moved(cam: Camera, offset) -> Camera:
    """The same camera translated by a world offset (orientation unchanged)."""
    eye = cam.position + np.asarray(offset, dtype=np.float64)
    return Camera(cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height, cam.R.copy(), -cam.R @ eye)


@dataclass
class SynthObject:
    """One object. ``size`` is its largest dimension (m); ``positions[f]`` its bounding-box centre at frame f."""

    colour: str
    shape: str
    size: float
    positions: list[np.ndarray]
    yaw: float = 0.0
    dims: tuple[float, float, float] = (0.0, 0.0, 0.0)  # width, depth, height (m)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def height(self) -> float:
        return self.dims[2]

    @property
    def radius(self) -> float:
        """Radius of the ground footprint's bounding circle (used for non-overlap)."""
        w, d, _ = self.dims
        return 0.5 * float(np.hypot(w, d)) if self.shape == "cube" else 0.5 * w

    def bottom(self, frame: int = 0) -> float:
        return float(self.positions[frame][2] - self.dims[2] / 2)

    def top(self, frame: int = 0) -> float:
        return float(self.positions[frame][2] + self.dims[2] / 2)

    def to_json(self) -> dict:
        return {"name": self.name, "colour": self.colour, "shape": self.shape, "size": self.size,
                "dims": list(self.dims), "yaw": self.yaw, "positions": [p.tolist() for p in self.positions]}


def shape_dims(shape: str, size: float) -> tuple[float, float, float]:
    """Width, depth, height of a shape whose largest dimension is ``size``."""
    if shape == "cube" or shape == "sphere":
        return (size, size, size)
    if shape == "cylinder":
        return (0.75 * size, 0.75 * size, size)
    if shape == "cone":
        return (0.8 * size, 0.8 * size, size)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


@dataclass
class SynthScene:
    """A rendered scene: ``images[camera][frame]`` RGB uint8, ``masks[camera][frame]`` object index + 1 (0 = ground/sky)."""

    id: str
    objects: list[SynthObject]
    cameras: list[list[Camera]]  # cameras[camera][frame] (cameras move in "camera" motion)
    stamps_ns: list[int]
    motion: str = "none"
    moving: str = ""  # name of the moving object for motion == "object"
    direction: str = ""  # world direction of the motion: left, right, away, towards (from camera 0's view)
    images: list[list[np.ndarray]] = field(default_factory=list)
    masks: list[list[np.ndarray]] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.stamps_ns)

    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    def object(self, name: str) -> SynthObject:
        for o in self.objects:
            if o.name == name:
                return o
        raise KeyError(f"no object named {name!r} in scene {self.id} (objects: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]

    def camera_position(self, name: str, frame: int = 0, camera: int = 0) -> np.ndarray:
        """Object centre in the camera frame (x right, y down, z forward)."""
        return self.cameras[camera][frame].to_camera(self.object(name).positions[frame][None])[0]

    def pixel(self, name: str, frame: int = 0, camera: int = 0) -> np.ndarray:
        uv, _ = self.cameras[camera][frame].project(self.object(name).positions[frame][None])
        return uv[0]

    def to_json(self) -> dict:
        return {"id": self.id, "motion": self.motion, "moving": self.moving, "direction": self.direction, "stamps_ns": list(self.stamps_ns),
                "objects": [o.to_json() for o in self.objects],
                "cameras": [[c.to_json() for c in cams] for cams in self.cameras]}


def _signed(diff: float, margin: float) -> bool | None:
    if diff >= margin:
        return True
    if diff <= -margin:
        return False
    return None


def _agree(*votes: bool | None) -> bool | None:
    """All criteria must give the same clear answer, else the relation is ambiguous."""
    if any(v is None for v in votes) or len(set(votes)) != 1:
        return None
    return votes[0]


def relation_holds(scene: SynthScene, subj: str, relation: str, obj: str, frame: int = 0, camera: int = 0) -> bool | None:
    """Whether ``subj relation obj`` holds as seen by ``camera`` at ``frame``; ``None`` if too close to call.

    left/right: camera-frame x and image u agree by a margin. above/below: the subject lies wholly above
    (world vertical) and camera-frame up and image v agree. in front of/behind: camera-frame depth z.
    closer/farther: Euclidean distance to the camera centre. bigger/smaller: largest dimension ratio.
    """
    if relation not in CONVERSE:
        raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
    if subj == obj:
        return None
    if relation in ("right of", "below", "behind", "farther from the camera than", "smaller than"):
        return relation_holds(scene, obj, CONVERSE[relation], subj, frame, camera)
    cam = scene.cameras[camera][frame]
    a, b = scene.object(subj), scene.object(obj)
    pa, pb = scene.camera_position(subj, frame, camera), scene.camera_position(obj, frame, camera)
    px_margin = IMAGE_MARGIN_FRAC * cam.width
    if relation == "left of":
        ua, ub = scene.pixel(subj, frame, camera)[0], scene.pixel(obj, frame, camera)[0]
        return _agree(_signed(pb[0] - pa[0], LATERAL_MARGIN_M), _signed(ub - ua, px_margin))
    if relation == "above":
        wholly = True if a.bottom(frame) >= b.top(frame) else (False if b.bottom(frame) >= a.top(frame) else None)
        va, vb = scene.pixel(subj, frame, camera)[1], scene.pixel(obj, frame, camera)[1]
        return _agree(wholly, _signed(pb[1] - pa[1], VERTICAL_MARGIN_M), _signed(vb - va, px_margin))
    if relation == "in front of":
        return _signed(pb[2] - pa[2], DEPTH_MARGIN_M)
    if relation == "closer to the camera than":
        return _signed(float(np.linalg.norm(pb) - np.linalg.norm(pa)), DEPTH_MARGIN_M)
    if relation == "bigger than":
        if a.size >= SIZE_RATIO_MARGIN * b.size:
            return True
        if b.size >= SIZE_RATIO_MARGIN * a.size:
            return False
        return None
    raise AssertionError(relation)


def distance(scene: SynthScene, a: str, b: str, frame: int = 0) -> float:
    """Centre-to-centre distance (m), the same in every rigid frame."""
    return float(np.linalg.norm(scene.object(a).positions[frame] - scene.object(b).positions[frame]))


def camera_distance(scene: SynthScene, name: str, frame: int = 0, camera: int = 0) -> float:
    return float(np.linalg.norm(scene.camera_position(name, frame, camera)))
