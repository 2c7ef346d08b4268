"""Raw/compressed camera payloads decode to RGB, and every bad input gets an operator-facing reason."""
import cv2
import numpy as np
import pytest

from phi3v_spatial.engine.images import (
    DEFAULT_MAX_PIXELS, DepthImageIgnored, ImageDecodeError, decode_compressed, decode_raw, validate_image,
)


def _rgb(h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("enc,conv", [
    ("rgb8", lambda a: a),
    ("bgr8", lambda a: a[:, :, ::-1]),
    ("rgba8", lambda a: np.dstack([a, np.full(a.shape[:2], 255, np.uint8)])),
    ("bgra8", lambda a: np.dstack([a[:, :, ::-1], np.full(a.shape[:2], 9, np.uint8)])),
])
def test_colour_encodings_round_trip_to_rgb(enc, conv):
    rgb = _rgb()
    raw = np.ascontiguousarray(conv(rgb))
    out = decode_raw(enc, 5, 7, raw.strides[0], raw.tobytes())
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_step_padding_is_honoured():
    rgb = _rgb(4, 6)
    padded = np.zeros((4, 6 * 3 + 10), np.uint8)
    padded[:, :18] = rgb.reshape(4, 18)
    padded[:, 18:] = 77  # junk in the padding must not leak into the image
    out = decode_raw("rgb8", 4, 6, 28, padded.tobytes())
    np.testing.assert_array_equal(out, rgb)


def test_mono8_and_mono16_become_grey_rgb():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = decode_raw("mono8", 3, 4, 4, g.tobytes())
    assert out.shape == (3, 4, 3) and (out[:, :, 0] == g).all() and (out[:, :, 2] == g).all()
    g16 = (np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)
    out = decode_raw("mono16", 3, 4, 8, g16.astype("<u2").tobytes())
    np.testing.assert_array_equal(out[:, :, 1], (g16 >> 8).astype(np.uint8))
    out_be = decode_raw("mono16", 3, 4, 8, g16.astype(">u2").tobytes(), is_bigendian=True)
    np.testing.assert_array_equal(out_be, out)


def test_array_array_input_like_rclpy_messages():
    import array
    rgb = _rgb()
    out = decode_raw("rgb8", 5, 7, 21, array.array("B", rgb.tobytes()))
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("enc", ["16UC1", "32FC1"])
def test_depth_is_a_distinct_error_kind(enc):
    with pytest.raises(DepthImageIgnored, match="depth"):
        decode_raw(enc, 2, 2, 8, bytes(16))


@pytest.mark.parametrize("kwargs,match", [
    (dict(encoding="yuv999", height=2, width=2, step=6, data=bytes(12)), "unsupported image encoding 'yuv999'.*rgb8"),
    (dict(encoding="", height=2, width=2, step=6, data=bytes(12)), "empty 'encoding'"),
    (dict(encoding="rgb8", height=2, width=2, step=6, data=bytes(11)), "size mismatch.*11 bytes.*12"),
    (dict(encoding="rgb8", height=2, width=4, step=6, data=bytes(12)), "step 6 is smaller"),
    (dict(encoding="rgb8", height=0, width=0, step=0, data=b""), "empty image"),
    (dict(encoding="rgb8", height=2, width=2, step=6, data=b""), "no pixel data"),
])
def test_bad_raw_images_say_what_is_wrong(kwargs, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_raw(**kwargs)


def test_too_large_names_the_limit_and_parameter_before_touching_data():
    with pytest.raises(ImageDecodeError, match=rf"8000x8000.*{DEFAULT_MAX_PIXELS}.*max_image_pixels"):
        decode_raw("mono8", 8000, 8000, 8000, b"")  # rejected on the header alone
    out = decode_raw("mono8", 2, 2, 2, bytes(4), max_pixels=4)
    assert out.shape == (2, 2, 3)
    with pytest.raises(ImageDecodeError, match="limit of 3 pixels"):
        decode_raw("mono8", 2, 2, 2, bytes(4), max_pixels=3)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_compressed_decodes_to_rgb(ext):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :12] = (255, 0, 0)  # left half red
    ok, buf = cv2.imencode(ext, rgb[:, :, ::-1])
    assert ok
    out = decode_compressed(buf.tobytes(), ext[1:])
    assert out.shape == (16, 24, 3)
    assert out[8, 3, 0] > 200 and out[8, 3, 2] < 50 and out[8, 20].max() < 50


def test_corrupt_and_empty_compressed():
    ok, buf = cv2.imencode(".jpg", _rgb(32, 32))
    broken = b"\xff\xd8" + bytes(200)
    with pytest.raises(ImageDecodeError, match="corrupt or unreadable JPEG"):
        decode_compressed(broken, "jpeg")
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_compressed(b"not an image at all", "jpeg")
    with pytest.raises(ImageDecodeError, match="empty compressed image"):
        decode_compressed(b"", "jpeg")


def test_compressed_oversize_is_refused_from_the_header():
    big = np.zeros((8000, 8000), np.uint8)
    ok, png = cv2.imencode(".png", big)
    with pytest.raises(ImageDecodeError, match="8000x8000.*max_image_pixels"):
        decode_compressed(png.tobytes(), "png")
    ok, jpg = cv2.imencode(".jpg", np.zeros((300, 500, 3), np.uint8))
    with pytest.raises(ImageDecodeError, match="500x300"):
        decode_compressed(jpg.tobytes(), "jpeg", max_pixels=1000)


def test_validate_image_coerces_and_rejects():
    assert validate_image(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert validate_image(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    assert validate_image(np.ones((2, 2, 3), np.float32)).max() == 255
    with pytest.raises(ImageDecodeError, match="shape"):
        validate_image(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(ImageDecodeError, match="empty"):
        validate_image(np.zeros((0, 5, 3), np.uint8))
