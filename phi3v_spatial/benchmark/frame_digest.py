"""What frame identity costs: the payload digest per 640x480 rgb8 frame and per JPEG (issue 23).

The FrameWindow keys frames by (topic, stamp, BLAKE2b-128 of the message bytes), computed once per frame the first
time a request selects it (never on the subscription callback, except when a stamp collides with a held frame).
This prints that cost next to the frame's decode, and the alternatives the standard library offers.

    python -m phi3v_spatial.benchmark.frame_digest [--repeat 200]
"""
from __future__ import annotations

import argparse
import array
import hashlib
import statistics
import time
import zlib

import numpy as np


def _median_us(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv=None) -> int:
    import cv2

    from ..engine.window import CompressedPayload, RawPayload, decode_payload, payload_digest

    p = argparse.ArgumentParser(prog="python -m phi3v_spatial.benchmark.frame_digest")
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args(argv)
    h, w = 480, 640
    y, x = np.mgrid[0:h, 0:w]
    scene = np.stack([(x // 3) % 256, (y // 2) % 256, ((x + y) // 4) % 256], -1).astype(np.uint8)  # smooth, like a camera
    scene = np.clip(scene.astype(np.int16) + np.random.default_rng(0).integers(-6, 7, scene.shape), 0, 255).astype(np.uint8)
    raw = RawPayload("rgb8", h, w, w * 3, array.array("B", scene.tobytes()))  # rclpy hands uint8[] as array.array
    jpeg = CompressedPayload("jpeg", array.array("B", cv2.imencode(".jpg", scene[:, :, ::-1],
                                                                  [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()))
    print(f"median of {args.repeat} runs, microseconds per frame")
    print(f"{'payload':<34} {'bytes':>8} {'digest':>9} {'decode':>9}   (blake2b-128 as used; others for scale)")
    for name, pl in (("640x480 rgb8 (raw Image)", raw), ("640x480 JPEG q90 (CompressedImage)", jpeg)):
        view = memoryview(pl.data).cast("B")
        dig = _median_us(lambda: payload_digest(pl), args.repeat)
        dec = _median_us(lambda: decode_payload(pl), max(10, args.repeat // 4))
        others = {n: _median_us(lambda f=f: f(view), args.repeat) for n, f in (
            ("sha1", lambda b: hashlib.sha1(b).digest()), ("md5", lambda b: hashlib.md5(b).digest()),
            ("crc32", zlib.crc32))}
        print(f"{name:<34} {len(view):>8} {dig:>9.0f} {dec:>9.0f}   "
              + ", ".join(f"{n} {v:.0f}" for n, v in others.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
