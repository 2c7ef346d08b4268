"""Rendering of a synthetic scene with numpy + OpenCV: flat-shaded low-poly meshes through a pinhole camera.

Deliberately simple and deterministic: a ray-cast ground plane (checkerboard, fading to the horizon) under a
sky gradient, blob shadows, then objects drawn with the painter's algorithm (far to near by distance to the
camera, back faces culled) and Lambert shading. The same draw order fills an object-id mask, which is how
scene sampling checks that every object is clearly visible.
"""
from __future__ import annotations

import cv2
import numpy as np

from .scene import PALETTE, Camera, SynthObject

LIGHT_DIR = np.array([-0.45, -0.55, 0.70]) / np.linalg.norm([-0.45, -0.55, 0.70])  # from upper left, behind camera
AMBIENT = 0.35
SKY_TOP = np.array([120, 165, 225], dtype=np.float64)
SKY_HORIZON = np.array([205, 220, 235], dtype=np.float64)
GROUND_A = np.array([150, 145, 135], dtype=np.float64)
GROUND_B = np.array([120, 116, 108], dtype=np.float64)
CHECKER_M = 0.5
FOG_M = 14.0
_SHIFT = 4  # fixed-point bits for sub-pixel polygon vertices


def _unit_circle(n: int) -> np.ndarray:
    a = 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def object_mesh(obj: SynthObject, frame: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """World-frame vertices (V, 3) and faces (lists of vertex indices, convex polygons, any winding)."""
    w, d, h = obj.dims
    if obj.shape == "cube":
        xs, ys, zs = np.meshgrid([-w / 2, w / 2], [-d / 2, d / 2], [-h / 2, h / 2], indexing="ij")
        v = np.stack([xs.ravel(), ys.ravel(), zs.ravel()], axis=1)  # index = 4*ix + 2*iy + iz
        faces = [[0, 1, 3, 2], [4, 5, 7, 6], [0, 1, 5, 4], [2, 3, 7, 6], [0, 2, 6, 4], [1, 3, 7, 5]]
    elif obj.shape == "sphere":
        n_lat, n_lon = 8, 14
        r = w / 2
        lat = np.pi * (np.arange(n_lat + 1) / n_lat) - np.pi / 2
        lon = 2 * np.pi * np.arange(n_lon) / n_lon
        v = np.array([[r * np.cos(la) * np.cos(lo), r * np.cos(la) * np.sin(lo), r * np.sin(la)] for la in lat for lo in lon])
        faces = []
        for i in range(n_lat):
            for j in range(n_lon):
                a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
                faces.append([a, b, b + n_lon, a + n_lon])
    elif obj.shape in ("cylinder", "cone"):
        n = 16
        ring = _unit_circle(n) * (w / 2)
        bottom = np.column_stack([ring, np.full(n, -h / 2)])
        if obj.shape == "cylinder":
            top = np.column_stack([ring, np.full(n, h / 2)])
            v = np.vstack([bottom, top])
            faces = [[i, (i + 1) % n, n + (i + 1) % n, n + i] for i in range(n)]
            faces += [list(range(n)), list(range(n, 2 * n))]
        else:
            v = np.vstack([bottom, [[0.0, 0.0, h / 2]]])
            faces = [[i, (i + 1) % n, n] for i in range(n)] + [list(range(n))]
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    c, s = np.cos(obj.yaw), np.sin(obj.yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return v @ rot.T + obj.positions[frame], [np.asarray(f) for f in faces]


def _poly(uv: np.ndarray) -> np.ndarray:
    return np.round(uv * (1 << _SHIFT)).astype(np.int32)


def background(cam: Camera) -> np.ndarray:
    """Sky gradient above the horizon, fogged checkerboard ground below (float RGB, H x W x 3)."""
    H, W = cam.height, cam.width
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    rays_c = np.stack([(u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy, np.ones_like(u)], axis=-1)
    rays_w = rays_c @ cam.R  # R^T applied to row vectors
    rays_w /= np.linalg.norm(rays_w, axis=-1, keepdims=True)
    dz = rays_w[..., 2]
    eye = cam.position
    ground = dz < -1e-6
    t = np.where(ground, -eye[2] / np.where(ground, dz, -1.0), np.inf)
    t_hit = np.where(ground, t, 0.0)
    hit_x = eye[0] + t_hit * rays_w[..., 0]
    hit_y = eye[1] + t_hit * rays_w[..., 1]
    parity = (np.floor(hit_x / CHECKER_M) + np.floor(hit_y / CHECKER_M)) % 2
    ground_rgb = np.where(parity[..., None] == 0, GROUND_A, GROUND_B)
    fog = np.clip(np.where(ground, t, FOG_M) / FOG_M, 0.0, 1.0)[..., None]
    ground_rgb = ground_rgb * (1 - fog) + SKY_HORIZON * fog
    sky_mix = np.clip(dz, 0.0, 0.5)[..., None] / 0.5
    sky_rgb = SKY_HORIZON * (1 - sky_mix) + SKY_TOP * sky_mix
    return np.where(ground[..., None], ground_rgb, sky_rgb)


def render(objects: list[SynthObject], cam: Camera, frame: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image and uint8 object-id mask (index + 1; 0 = background) of ``objects`` seen by ``cam``."""
    img = background(cam)
    # Blob shadows: a darkened disc on the ground under each object.
    shadow = np.zeros((cam.height, cam.width), np.uint8)
    for o in objects:
        p = o.positions[frame]
        disc = np.column_stack([p[0] + _unit_circle(20)[:, 0] * o.radius * 0.95,
                                p[1] + _unit_circle(20)[:, 1] * o.radius * 0.95, np.full(20, 0.001)])
        uv, z = cam.project(disc)
        if np.all(z > 0.05):
            cv2.fillConvexPoly(shadow, _poly(uv), 1, lineType=cv2.LINE_8, shift=_SHIFT)
    img[shadow > 0] *= 0.6
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    mask = np.zeros((cam.height, cam.width), np.uint8)
    eye = cam.position
    order = sorted(range(len(objects)), key=lambda i: -float(np.linalg.norm(objects[i].positions[frame] - eye)))
    for idx in order:
        o = objects[idx]
        verts, faces = object_mesh(o, frame)
        centre = o.positions[frame]
        uv, z = cam.project(verts)
        if np.any(z <= 0.05):
            continue  # behind the camera: scene sampling never produces this
        base = np.asarray(PALETTE[o.colour], dtype=np.float64)
        drawn = []
        for f in faces:
            pts = verts[f]
            fc = pts.mean(axis=0)
            n = np.cross(pts, np.roll(pts, -1, axis=0)).sum(axis=0)  # Newell: robust to repeated (pole) vertices
            norm = np.linalg.norm(n)
            if norm < 1e-12:
                continue
            n /= norm
            if np.dot(n, fc - centre) < 0:
                n = -n
            if np.dot(n, eye - fc) <= 0:
                continue  # back face
            shade = AMBIENT + (1 - AMBIENT) * max(0.0, float(np.dot(n, LIGHT_DIR)))
            drawn.append((-float(np.linalg.norm(fc - eye)), f, shade))
        drawn.sort(key=lambda d: d[0])
        for _, f, shade in drawn:
            colour = tuple(int(c) for c in np.clip(np.round(base * shade), 0, 255))
            poly = _poly(uv[f])
            cv2.fillConvexPoly(img, poly, colour, lineType=cv2.LINE_8, shift=_SHIFT)
            cv2.fillConvexPoly(mask, poly, idx + 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return img, mask


def render_alone(obj: SynthObject, cam: Camera, frame: int = 0) -> int:
    """Pixel count of one object drawn on its own (for the visibility check)."""
    mask = np.zeros((cam.height, cam.width), np.uint8)
    verts, faces = object_mesh(obj, frame)
    uv, _ = cam.project(verts)
    for f in faces:
        cv2.fillConvexPoly(mask, _poly(uv[f]), 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return int(mask.sum())
