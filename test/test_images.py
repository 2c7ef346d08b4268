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


# ---- Bayer ----------------------------------------------------------------------------------------------------------
# Each ROS pattern names the colours of the 2x2 cell at the top-left, row by row.
BAYER_PATTERNS = ("rggb", "bggr", "gbrg", "grbg")
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def _mosaic(rgb, pattern):
    """What a sensor with this colour filter array records for an RGB scene: one channel per pixel."""
    out = np.empty(rgb.shape[:2], rgb.dtype)
    for i, colour in enumerate(pattern):
        dy, dx = divmod(i, 2)
        out[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(colour)]
    return out


def _quadrants(h=16, w=16):
    """Flat red / green (top), blue / white (bottom) quadrants."""
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:h // 2, :w // 2], rgb[:h // 2, w // 2:] = RED, GREEN
    rgb[h // 2:, :w // 2], rgb[h // 2:, w // 2:] = BLUE, WHITE
    return rgb


def _interiors(img, h=16, w=16, margin=2):
    """The quadrants minus a margin, where demosaicing sees only one flat colour."""
    q = [img[:h // 2, :w // 2], img[:h // 2, w // 2:], img[h // 2:, :w // 2], img[h // 2:, w // 2:]]
    return [a[margin:-margin, margin:-margin].astype(int) for a in q]


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_bayer8_flat_quadrants_come_back_in_their_colours(pattern):
    mosaic = _mosaic(_quadrants(), pattern)
    out = decode_raw(f"bayer_{pattern}8", 16, 16, 16, mosaic.tobytes())
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3) and out.flags.c_contiguous
    for got, want in zip(_interiors(out), (RED, GREEN, BLUE, WHITE)):
        assert np.abs(got - np.array(want)).max() <= 2, (pattern, want, got[0, 0])


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_bayer_patterns_are_not_interchangeable(pattern):
    """Decoding a mosaic with any other pattern gets the colours wrong (e.g. red comes back blue), so the
    pattern -> OpenCV code table above is checked both ways, not just 'some code that happens to work'."""
    mosaic = _mosaic(_quadrants(), pattern).tobytes()
    for other in BAYER_PATTERNS:
        if other == pattern:
            continue
        out = decode_raw(f"bayer_{other}8", 16, 16, 16, mosaic)
        errors = [np.abs(got - np.array(want)).max() for got, want in zip(_interiors(out), (RED, GREEN, BLUE))]
        assert max(errors) > 200, (pattern, other)


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_bayer8_gradient_is_reconstructed_in_the_interior(pattern):
    """Red rising to the right, green rising downwards: checks pixel positions, not only flat colours."""
    h, w = 12, 20
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.dstack([20 + 10 * x, 15 + 12 * y, 250 - 3 * (x + y)]).astype(np.uint8)
    out = decode_raw(f"bayer_{pattern}8", h, w, w, _mosaic(rgb, pattern).tobytes())
    diff = np.abs(out[1:-1, 1:-1].astype(int) - rgb[1:-1, 1:-1])
    assert diff.max() <= 2, (pattern, diff.max())


def test_bayer8_step_padding_is_honoured():
    mosaic = _mosaic(_quadrants(), "rggb")
    padded = np.full((16, 16 + 6), 255, np.uint8)  # white junk in the padding must not leak into the image
    padded[:, :16] = mosaic
    out = decode_raw("bayer_rggb8", 16, 16, 22, padded.tobytes())
    np.testing.assert_array_equal(out, decode_raw("bayer_rggb8", 16, 16, 16, mosaic.tobytes()))


@pytest.mark.parametrize("pattern", BAYER_PATTERNS)
def test_bayer16_drops_the_low_byte_and_honours_endianness(pattern):
    mosaic8 = _mosaic(_quadrants(), pattern)
    low = np.random.default_rng(1).integers(0, 256, mosaic8.shape)  # noise in the low byte must not matter
    mosaic16 = (mosaic8.astype(np.uint16) << 8) | low.astype(np.uint16)
    want = decode_raw(f"bayer_{pattern}8", 16, 16, 16, mosaic8.tobytes())
    le = decode_raw(f"bayer_{pattern}16", 16, 16, 32, mosaic16.astype("<u2").tobytes())
    np.testing.assert_array_equal(le, want)
    be = mosaic16.astype(">u2").tobytes()
    np.testing.assert_array_equal(decode_raw(f"bayer_{pattern}16", 16, 16, 32, be, is_bigendian=True), want)
    # the same big-endian bytes read as little-endian are the noise, not the picture
    assert np.abs(decode_raw(f"bayer_{pattern}16", 16, 16, 32, be).astype(int) - want).max() > 100


def test_bayer16_step_padding_is_honoured():
    mosaic16 = _mosaic(_quadrants(), "gbrg").astype(np.uint16) * 257
    padded = np.full((16, 2 * 16 + 4), 0xAB, np.uint8)
    padded[:, :32] = mosaic16.astype(">u2").view(np.uint8).reshape(16, 32)
    out = decode_raw("bayer_gbrg16", 16, 16, 36, padded.tobytes(), is_bigendian=True)
    for got, want in zip(_interiors(out), (RED, GREEN, BLUE, WHITE)):
        assert np.abs(got - np.array(want)).max() <= 2


# ---- YUV ------------------------------------------------------------------------------------------------------------
# (Y, U, V) of a few colours in BT.601 video range (Y 16..235), the YUV flavour OpenCV decodes
YUV = {RED: (81, 90, 240), GREEN: (145, 54, 34), BLUE: (41, 240, 110), WHITE: (235, 128, 128), BLACK: (16, 128, 128)}
# 2 x 8 picture: pixel pairs red, green, blue, then white next to black (one U/V pair, two different Y)
ROW = [RED, RED, GREEN, GREEN, BLUE, BLUE, WHITE, BLACK]


def _yuv422(order):
    """Pack ROW (twice) as 4:2:2: every 2 pixels share the U/V of the first; order is 'uyvy' or 'yuyv'."""
    row = []
    for left, right in zip(ROW[::2], ROW[1::2]):
        (y0, u, v), y1 = YUV[left], YUV[right][0]
        row += [u, y0, v, y1] if order == "uyvy" else [y0, u, y1, v]
    return np.array([row, row], np.uint8)


def _close(out, want, tol=4):
    return np.abs(out.astype(int) - np.array(want)).max() <= tol


@pytest.mark.parametrize("enc,order", [("yuv422", "uyvy"), ("uyvy", "uyvy"), ("yuv422_yuy2", "yuyv"), ("yuyv", "yuyv")])
def test_yuv422_byte_orders_decode_to_known_colours(enc, order):
    out = decode_raw(enc, 2, 8, 16, _yuv422(order).tobytes())
    assert out.dtype == np.uint8 and out.shape == (2, 8, 3) and out.flags.c_contiguous
    assert _close(out, np.array([ROW, ROW])), out[0].tolist()


def test_yuv422_byte_orders_are_not_interchangeable():
    uyvy, yuyv = _yuv422("uyvy").tobytes(), _yuv422("yuyv").tobytes()
    want = np.array([ROW, ROW])
    assert not _close(decode_raw("yuv422_yuy2", 2, 8, 16, uyvy), want, tol=60)
    assert not _close(decode_raw("yuv422", 2, 8, 16, yuyv), want, tol=60)


def test_yuv422_step_padding_is_honoured():
    padded = np.full((2, 16 + 8), 200, np.uint8)
    padded[:, :16] = _yuv422("uyvy")
    out = decode_raw("yuv422", 2, 8, 24, padded.tobytes())
    assert _close(out, np.array([ROW, ROW]))


# 4 x 8 picture in 2x2 blocks: red, green, blue, white / blue, red, white-black checkerboard, green
BLOCKS = [[RED, GREEN, BLUE, WHITE], [BLUE, RED, None, GREEN]]


def _nv(order, step=8, pad=0):
    """Y plane (4 rows) then one interleaved chroma row per 2 Y rows; order 'vu' (nv21) or 'uv' (nv12)."""
    buf = np.full((6, step), pad, np.uint8)
    want = np.zeros((4, 8, 3), np.uint8)
    for by, blocks in enumerate(BLOCKS):
        for bx, colour in enumerate(blocks):
            ys, xs = slice(2 * by, 2 * by + 2), slice(2 * bx, 2 * bx + 2)
            if colour is None:  # checkerboard of white and black: same chroma, Y differs per pixel
                buf[ys, xs] = [[235, 16], [16, 235]]
                want[ys, xs] = [[WHITE, BLACK], [BLACK, WHITE]]
                u = v = 128
            else:
                (y, u, v) = YUV[colour]
                buf[ys, xs] = y
                want[ys, xs] = colour
            buf[4 + by, 2 * bx:2 * bx + 2] = (v, u) if order == "vu" else (u, v)
    return buf, want


@pytest.mark.parametrize("enc,order", [("nv21", "vu"), ("nv12", "uv")])
def test_yuv420_semi_planar_decodes_to_known_colours(enc, order):
    buf, want = _nv(order)
    out = decode_raw(enc, 4, 8, 8, buf.tobytes())  # height is the picture's; the data holds 4 x 3/2 rows
    assert out.dtype == np.uint8 and out.shape == (4, 8, 3)
    assert _close(out, want), out.tolist()
    other = "nv12" if enc == "nv21" else "nv21"
    swapped = decode_raw(other, 4, 8, 8, buf.tobytes())
    assert swapped[0, 0, 2] > 200 and swapped[0, 0, 0] < 60  # U/V swapped: red comes back blue


def test_nv21_step_padding_is_honoured_on_both_planes():
    buf, want = _nv("vu", step=12, pad=250)
    out = decode_raw("nv21", 4, 8, 12, buf.tobytes())
    assert _close(out, want)


@pytest.mark.parametrize("kwargs,match", [
    (dict(encoding="bayer_rggb8", height=4, width=5, step=5, data=bytes(20)), r"odd width 5: Bayer.*must be even"),
    (dict(encoding="bayer_grbg16", height=3, width=4, step=8, data=bytes(24)), r"odd height 3: Bayer"),
    (dict(encoding="bayer_bggr8", height=3, width=3, step=3, data=bytes(9)), r"odd width 3 and height 3"),
    (dict(encoding="yuv422", height=2, width=3, step=6, data=bytes(12)), r"'yuv422'.*odd width 3.*width must be even"),
    (dict(encoding="yuv422_yuy2", height=3, width=5, step=10, data=bytes(30)), r"odd width 5"),
    (dict(encoding="nv21", height=3, width=4, step=4, data=bytes(12)), r"'nv21'.*odd height 3.*2x2"),
    (dict(encoding="nv21", height=4, width=4, step=4, data=bytes(16)),
     r"size mismatch.*16 bytes.*step x \(height x 3/2\) = 4 x 6 = 24"),
    (dict(encoding="yuv422", height=2, width=4, step=6, data=bytes(12)), r"step 6 is smaller.*4 px x 2 channel"),
    (dict(encoding="bayer_rggb16", height=2, width=2, step=2, data=bytes(4)), r"step 2 is smaller"),
    (dict(encoding="bayer_rggb8", height=2, width=2, step=2, data=b""), r"no pixel data"),
    (dict(encoding="nv24", height=2, width=2, step=4, data=bytes(8)),
     r"unsupported image encoding 'nv24'.*bayer_rggb8.*bayer_grbg16.*yuv422.*yuv422_yuy2.*nv21"),
])
def test_bad_bayer_and_yuv_images_say_what_is_wrong(kwargs, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_raw(**kwargs)


def test_bayer_and_yuv_respect_the_pixel_limit_before_touching_data():
    with pytest.raises(ImageDecodeError, match="8000x8000.*max_image_pixels"):
        decode_raw("bayer_rggb8", 8000, 8000, 8000, b"")
    with pytest.raises(ImageDecodeError, match="limit of 3 pixels"):
        decode_raw("nv21", 2, 2, 2, bytes(6), max_pixels=3)
