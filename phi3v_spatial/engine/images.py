"""Camera payloads -> RGB uint8 HxWx3 numpy arrays, with errors a robot operator can act on.

ROS-free on purpose: the node feeds it the fields of ``sensor_msgs/Image`` / ``CompressedImage``
and bag replay feeds it the same fields read by ``rosbags``, so both decode frames identically.
No cv_bridge (the PyPI one breaks with OpenCV 5 / NumPy >= 2.3): RGB/mono encodings are plain numpy,
Bayer and YUV go through ``cv2.cvtColor`` (imported only when such a frame arrives).
"""
from __future__ import annotations

import struct

import numpy as np

# 4096 x 4096: far above any camera a VLM sees well (images are resized to 336-px crops anyway),
# yet it stops an 8000 x 8000 frame from costing hundreds of MB per copy.
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_PIXELS_PARAMETER = "max_image_pixels"

# encoding -> (channels, numpy dtype, how to turn it into RGB)
_COLOR_ENCODINGS = {
    "rgb8": (3, np.uint8, "rgb"),
    "bgr8": (3, np.uint8, "bgr"),
    "rgba8": (4, np.uint8, "rgba"),
    "bgra8": (4, np.uint8, "bgra"),
    "mono8": (1, np.uint8, "mono"),
    "8UC1": (1, np.uint8, "mono"),
    "8UC3": (3, np.uint8, "bgr"),    # OpenCV's default channel order, as cv_bridge assumes
    "8UC4": (4, np.uint8, "bgra"),
    "mono16": (1, np.uint16, "mono"),
    # Bayer mosaics (1 value per pixel) and YUV, demosaiced/converted by OpenCV (codes in _CV_CODES)
    "bayer_rggb8": (1, np.uint8, "bayer"),
    "bayer_bggr8": (1, np.uint8, "bayer"),
    "bayer_gbrg8": (1, np.uint8, "bayer"),
    "bayer_grbg8": (1, np.uint8, "bayer"),
    "bayer_rggb16": (1, np.uint16, "bayer"),
    "bayer_bggr16": (1, np.uint16, "bayer"),
    "bayer_gbrg16": (1, np.uint16, "bayer"),
    "bayer_grbg16": (1, np.uint16, "bayer"),
    "yuv422": (2, np.uint8, "yuv422"),       # UYVY byte order (the older ROS name)
    "uyvy": (2, np.uint8, "yuv422"),         # the same, under its current ROS name
    "yuv422_yuy2": (2, np.uint8, "yuv422"),  # YUYV byte order (the older ROS name)
    "yuyv": (2, np.uint8, "yuv422"),         # the same, under its current ROS name
    # 4:2:0 semi-planar: height rows of Y, then height/2 rows of interleaved chroma, all `step` bytes wide
    "nv21": (1, np.uint8, "yuv420sp"),
    "nv12": (1, np.uint8, "yuv420sp"),
}
# encoding -> name of its cv2.COLOR_* code (a name, because cv2 is only imported when such a frame arrives).
# OpenCV names a Bayer pattern by the 2x2 block that starts at pixel (1, 1), not (0, 0), so its names are the
# ROS/sensor names shifted one row and one column: rggb -> BG, bggr -> RG, gbrg -> GR, grbg -> GB (as cv_bridge maps).
# YUV uses OpenCV's conversion (BT.601, video range Y 16..235), as cv_bridge does.
_CV_CODES = {
    "bayer_rggb8": "COLOR_BayerBG2RGB", "bayer_rggb16": "COLOR_BayerBG2RGB",
    "bayer_bggr8": "COLOR_BayerRG2RGB", "bayer_bggr16": "COLOR_BayerRG2RGB",
    "bayer_gbrg8": "COLOR_BayerGR2RGB", "bayer_gbrg16": "COLOR_BayerGR2RGB",
    "bayer_grbg8": "COLOR_BayerGB2RGB", "bayer_grbg16": "COLOR_BayerGB2RGB",
    "yuv422": "COLOR_YUV2RGB_UYVY", "uyvy": "COLOR_YUV2RGB_UYVY",
    "yuv422_yuy2": "COLOR_YUV2RGB_YUY2", "yuyv": "COLOR_YUV2RGB_YUY2",
    "nv21": "COLOR_YUV2RGB_NV21", "nv12": "COLOR_YUV2RGB_NV12",
}
# Depth images are valid camera data, just not something the VLM can look at.
DEPTH_ENCODINGS = ("16UC1", "32FC1", "16SC1", "32SC1", "64FC1")

SUPPORTED_ENCODINGS = tuple(_COLOR_ENCODINGS)


class ImageDecodeError(ValueError):
    """An image the node cannot use; ``str(err)`` is written for the operator."""


class DepthImageIgnored(ImageDecodeError):
    """A depth image (16UC1/32FC1/...) reached a colour-only input: a wiring mistake, not corrupt data."""


class ImageTooLarge(ImageDecodeError):
    """Above the max_image_pixels limit: depends on a setting, not on the data, so it is never cached."""


def _check_pixels(height: int, width: int, max_pixels: int | None) -> None:
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if limit > 0 and height * width > limit:
        raise ImageTooLarge(
            f"image is too large: {width}x{height} = {height * width} pixels, above the limit of {limit} pixels; "
            f"downscale the camera stream or raise the '{MAX_PIXELS_PARAMETER}' parameter"
        )


def _as_buffer(data):
    """A zero-copy byte view of array.array/bytes/numpy data (lists are copied once)."""
    if isinstance(data, (bytes, bytearray)):
        return data
    try:
        return memoryview(data).cast("B")
    except TypeError:
        try:
            return bytes(data)
        except (TypeError, ValueError):
            raise ImageDecodeError(f"image data is not a byte buffer ({type(data).__name__})") from None


def decode_raw(encoding: str, height: int, width: int, step: int, data, *, is_bigendian: bool = False,
               max_pixels: int | None = None) -> np.ndarray:
    """Decode the fields of a ``sensor_msgs/Image`` into a fresh RGB uint8 HxWx3 array.

    mono16 and 16-bit Bayer are scaled to 8 bit by dropping the low byte (value / 256), as cv_bridge does;
    row padding (``step`` larger than a row) is honoured, for nv21/nv12 on the chroma rows too.
    """
    enc = (encoding or "").strip()
    if not enc:
        raise ImageDecodeError(
            f"image has an empty 'encoding' field; set it to one of {', '.join(SUPPORTED_ENCODINGS)}")
    if enc in DEPTH_ENCODINGS:
        raise DepthImageIgnored(
            f"depth image (encoding '{enc}') ignored: the model needs colour or mono images; "
            f"point the request/image_topics at an RGB camera topic instead of a depth topic")
    key = enc if enc in _COLOR_ENCODINGS else enc.lower()
    spec = _COLOR_ENCODINGS.get(key)
    if spec is None:
        raise ImageDecodeError(
            f"unsupported image encoding '{encoding}'; supported: {', '.join(SUPPORTED_ENCODINGS)} "
            f"(compressed streams go through sensor_msgs/CompressedImage)")
    channels, dtype, kind = spec
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"empty image: width={width}, height={height} (the camera sent no pixels)")
    _check_pixels(height, width, max_pixels)
    _check_even(key, kind, height, width)
    itemsize = np.dtype(dtype).itemsize
    row_bytes = width * channels * itemsize
    if step < row_bytes:
        raise ImageDecodeError(
            f"image step {step} is smaller than one row of {width} px x {channels} channel(s) x {itemsize} byte(s) "
            f"= {row_bytes} bytes for encoding '{enc}'; the step/width/encoding fields disagree")
    buf = _as_buffer(data)
    nbytes = len(buf)
    if nbytes == 0:
        raise ImageDecodeError(f"empty image: {width}x{height} '{enc}' header but no pixel data")
    # 4:2:0 semi-planar frames carry height/2 chroma rows below the Y rows (ROS: height scaling 1.5)
    rows = height + height // 2 if kind == "yuv420sp" else height
    if nbytes != step * rows:
        expected = "step x height" if rows == height else "step x (height x 3/2)"
        raise ImageDecodeError(
            f"image data size mismatch: got {nbytes} bytes, expected {expected} = {step} x {rows} = "
            f"{step * rows} bytes for a {width}x{height} '{enc}' image")
    arr = np.frombuffer(buf, dtype=np.uint8).reshape(rows, step)[:, :row_bytes]
    if itemsize > 1:  # 16 bit (mono16, Bayer): keep the high byte (value / 256), as cv_bridge does
        arr = np.ascontiguousarray(arr).view(np.dtype(dtype).newbyteorder(">" if is_bigendian else "<"))
        arr = (arr >> 8).astype(np.uint8)
    if key in _CV_CODES:  # Bayer / YUV: OpenCV converts them
        return _cv_convert(key, arr, rows, width, channels)
    arr = arr.reshape(height, width, channels)
    if kind == "rgb":
        out = arr.copy()
    elif kind == "bgr":
        out = arr[:, :, ::-1].copy()
    elif kind == "rgba":
        out = arr[:, :, :3].copy()
    elif kind == "bgra":
        out = arr[:, :, 2::-1].copy()
    else:  # mono8 / mono16 (already scaled to 8 bit)
        out = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(out)


def _check_even(enc: str, kind: str, height: int, width: int) -> None:
    """Bayer cells and YUV chroma span 2 pixels: an odd size means the width/height/encoding fields are wrong."""
    if kind == "bayer":
        why, dims = "Bayer images are made of 2x2 colour cells", (("width", width), ("height", height))
    elif kind == "yuv420sp":
        why, dims = "one U/V pair covers 2x2 pixels", (("width", width), ("height", height))
    elif kind == "yuv422":
        why, dims = "one U/V pair covers 2 pixels of a row", (("width", width),)
    else:
        return
    odd = [f"{name} {v}" for name, v in dims if v % 2]
    if odd:
        must = " and ".join(name for name, _ in dims)
        raise ImageDecodeError(
            f"'{enc}' image has an odd {' and '.join(odd)}: {why}, so the {must} must be even; "
            f"check the camera's width/height/encoding settings")


def _cv_convert(enc: str, arr: np.ndarray, rows: int, width: int, channels: int) -> np.ndarray:
    """Bayer/YUV rows (padding cut off, 16 bit already scaled to 8) -> RGB via cv2.cvtColor."""
    import cv2  # imported here: only Bayer/YUV streams need OpenCV

    src = arr.reshape(rows, width, channels) if channels > 1 else arr.reshape(rows, width)
    out = cv2.cvtColor(np.ascontiguousarray(src), getattr(cv2, _CV_CODES[enc]))
    return np.ascontiguousarray(out)


def _png_size(b: bytes) -> tuple[int, int] | None:
    if len(b) >= 24 and b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
        w, h = struct.unpack(">II", b[16:24])
        return h, w
    return None


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    """Height/width from the first SOF marker, so oversized JPEGs are refused before decoding."""
    if len(b) < 4 or b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg_len = struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack(">HH", b[i + 5:i + 9])
            return h, w
        i += 2 + seg_len
    return None


def _format_name(b: bytes) -> str:
    if b[:2] == b"\xff\xd8":
        return "JPEG"
    if b[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    return "compressed"


def decode_compressed(data, format: str = "", *, max_pixels: int | None = None) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` payload (jpeg/png/...) into RGB uint8 HxWx3.

    The size is read from the PNG/JPEG header first so an oversized frame is refused without decoding it.
    """
    import cv2  # imported here: only compressed streams need OpenCV

    fmt = (format or "").lower()
    if any(d in fmt for d in ("16uc1", "32fc1", "compresseddepth")):
        raise DepthImageIgnored(
            f"compressed depth image (format '{format}') ignored: the model needs colour images; "
            f"subscribe to the colour stream's /compressed topic instead")
    b = bytes(_as_buffer(data)) if not isinstance(data, bytes) else data
    if not b:
        raise ImageDecodeError(f"empty compressed image (format '{format}'): no bytes received")
    size = _png_size(b) or _jpeg_size(b)
    if size is not None:
        _check_pixels(size[0], size[1], max_pixels)
    img = cv2.imdecode(np.frombuffer(b, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    name = _format_name(b)
    if img is None or img.size == 0:
        raise ImageDecodeError(
            f"corrupt or unreadable {name} image ({len(b)} bytes, format '{format}'): OpenCV could not decode it; "
            f"check the camera's compression settings / the transport")
    _check_pixels(img.shape[0], img.shape[1], max_pixels)
    if img.dtype != np.uint8:
        img = (img >> 8).astype(np.uint8) if img.dtype == np.uint16 else np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        out = np.repeat(img[:, :, None], 3, axis=2)
    elif img.shape[2] == 1:
        out = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        out = img[:, :, 2::-1]
    else:
        out = img[:, :, ::-1]
    return np.ascontiguousarray(out)


def validate_image(arr, *, max_pixels: int | None = None, name: str = "image") -> np.ndarray:
    """Check (and where unambiguous, coerce) an in-memory image to RGB uint8 HxWx3 for the engine."""
    if not isinstance(arr, np.ndarray):
        try:
            arr = np.asarray(arr)  # PIL images and nested lists
        except Exception as exc:  # noqa: BLE001 - anything unconvertible is an operator error
            raise ImageDecodeError(f"{name}: not an image ({type(arr).__name__}): {exc}") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageDecodeError(f"{name}: expected an HxWx3 RGB array, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"{name}: empty image (shape {tuple(arr.shape)})")
    _check_pixels(arr.shape[0], arr.shape[1], max_pixels)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)
        elif arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        else:
            raise ImageDecodeError(f"{name}: expected uint8 pixels, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)
