"""FrameWindow: stamp-keyed keyframes, staleness against a caller-given now, lazy decode, thread safety."""
import threading

import numpy as np
import pytest

from phi3v_spatial.engine.images import ImageDecodeError
from phi3v_spatial.engine.window import (
    NS, CompressedPayload, FrameWindow, RawPayload, StaleWindowError, WindowError,
)


def raw(value=0, h=2, w=3):
    return RawPayload("rgb8", h, w, w * 3, np.full((h, w, 3), value, np.uint8).tobytes())


def s(t):
    return int(t * NS)


def test_keyframes_are_spaced_and_latest_always_replaced():
    win = FrameWindow(num_frames=3, min_interval_s=1.0, max_age_s=0, capacity=8)
    statuses = [win.add("/a", s(t), raw(int(t * 10))) for t in (0.0, 0.3, 0.6, 1.0, 1.2, 2.1, 2.4)]
    assert statuses == ["keyframe", "latest", "latest", "keyframe", "latest", "keyframe", "latest"]
    sel = win.select(["/a"])
    # latest (2.4), then keyframes at least 1 s before it and 1 s apart: 1.0 (2.1 is too close), 0.0
    assert sel.stamps_ns == [s(0.0), s(1.0), s(2.4)]
    assert win.select(["/a"], num_frames=1).stamps_ns == [s(2.4)]


def test_zero_interval_keeps_every_frame_up_to_capacity():
    win = FrameWindow(num_frames=10, min_interval_s=0.0, max_age_s=0, capacity=3)
    for t in range(6):
        win.add("/a", s(t), raw(t))
    assert win.select().stamps_ns == [s(3), s(4), s(5)]


def test_stale_window_names_topic_and_age_relative_to_given_now():
    win = FrameWindow(num_frames=1, max_age_s=2.0)
    win.add_topic("/front")
    win.add_topic("/side")
    win.add("/front", s(100.0), raw())
    win.add("/side", s(95.0), raw())
    with pytest.raises(StaleWindowError, match=r"/side newest frame is 6\.00 s old.*max_age_s = 2"):
        win.select(now_ns=s(101.0))
    assert win.select(["/front"], now_ns=s(101.0)).stamps_ns == [s(100.0)]
    # the same frames are fresh for a caller whose "now" is earlier (replay's question time)
    assert win.select(now_ns=s(96.0)).topics == ["/front", "/side"]


def test_old_keyframes_are_not_used_past_max_age():
    win = FrameWindow(num_frames=3, min_interval_s=1.0, max_age_s=2.5)
    for t in (0.0, 1.0, 2.0, 3.0):
        win.add("/a", s(t), raw())
    assert win.select(now_ns=s(3.0)).stamps_ns == [s(1.0), s(2.0), s(3.0)]


def test_unknown_and_silent_topics_are_clear_errors():
    win = FrameWindow()
    with pytest.raises(WindowError, match="no camera topics"):
        win.select()
    win.add_topic("/cam")
    with pytest.raises(WindowError, match="no frames received yet on /cam"):
        win.select()
    with pytest.raises(WindowError, match="/other not subscribed.*/cam"):
        win.select(["/other"])


def test_multi_camera_selection_is_slot_aligned():
    win = FrameWindow(num_frames=2, min_interval_s=1.0, max_age_s=0)
    for t in (0.0, 1.0, 2.0):
        win.add("/b", s(t) + 50_000_000, raw())
        win.add("/a", s(t), raw())
    sel = win.select()
    assert [f.topic for f in sel.frames] == ["/a", "/b", "/a", "/b"]
    assert sel.stamps_ns == [s(1.0), s(1.0) + 50_000_000, s(2.0), s(2.0) + 50_000_000]
    assert sel.skew_ns == 50_000_000


def test_redelivery_is_a_duplicate_and_any_step_back_starts_the_topic_afresh():
    win = FrameWindow(num_frames=5, max_age_s=0)
    win.add("/a", s(9.0), raw(1))
    win.add("/a", s(10.0), raw(2))
    assert win.add("/a", s(10.0), raw(2)) == "duplicate"  # the same picture delivered again
    assert win.add("/a", s(9.0), raw(1)) == "duplicate"  # an older held frame delivered again
    assert win.select().stamps_ns == [s(9.0), s(10.0)]
    # a step back of 0.1 s is a clock reset too (a short sim episode, a short bag looped): the old frames go, so a
    # window never mixes the old run's pictures with the new run's, and no new frame is thrown away
    assert win.add("/a", s(9.9), raw(3)) == "reset"
    assert win.select().stamps_ns == [s(9.9)]
    assert win.add("/a", s(1.0), raw(4)) == "reset"  # sim time restarted / bag looped
    assert win.select().stamps_ns == [s(1.0)]
    assert win.stats()["/a"]["resets"] == 2 and win.stats()["/a"]["dropped"] == 2


def test_another_picture_under_the_latest_stamp_replaces_it_and_gets_another_key():
    win = FrameWindow(num_frames=3, max_age_s=0)
    win.add("/a", s(4.0), raw(1))
    win.add("/a", s(5.0), raw(1))
    first = win.select().keys
    assert win.add("/a", s(5.0), raw(9)) == "reset"  # driver restarted at the same stamp: a new run begins
    sel = win.select()
    assert sel.stamps_ns == [s(5.0)] and int(sel.images()[0][0, 0, 0]) == 9
    assert sel.keys[0][:2] == first[-1][:2] and sel.keys[0] != first[-1]  # same (topic, stamp), another identity


def test_keys_carry_a_digest_of_the_payload_bytes():
    win = FrameWindow(num_frames=1, max_age_s=0)
    win.add("/a", s(1.0), raw(5))
    win.add("/b", s(1.0), raw(5))
    win.add("/c", s(1.0), RawPayload("bgr8", 2, 3, 9, np.full((2, 3, 3), 5, np.uint8).tobytes()))
    keys = {k[0]: k for k in win.select().keys}
    assert keys["/a"][2] == keys["/b"][2]  # the same bytes, the same digest (the topic tells them apart)
    assert keys["/c"][2] != keys["/a"][2]  # the same bytes in another encoding are another picture
    # the digest is the message's, and survives decoding (the payload buffer is dropped after it)
    frame = win.select(["/a"]).frames[0]
    before = frame.digest
    frame.rgb()
    assert frame.payload is None and frame.digest == before and len(before) == 32
    # compressed frames: the digest covers the bytes and the format
    win.add("/j", s(1.0), CompressedPayload("jpeg", b"\xff\xd8abc"))
    win.add("/p", s(1.0), CompressedPayload("png", b"\xff\xd8abc"))
    assert win.select(["/j"]).keys[0][2] != win.select(["/p"]).keys[0][2]


def test_decode_is_lazy_cached_and_errors_name_the_topic():
    win = FrameWindow(max_age_s=0)
    win.add("/cam", 1, CompressedPayload("jpeg", b"\xff\xd8garbage"))
    frame = win.select().frames[0]
    for _ in range(2):
        with pytest.raises(ImageDecodeError, match="camera /cam: corrupt"):
            frame.rgb()
    win.add("/cam", 2, raw(7))
    f = win.select().frames[0]
    a = f.rgb()
    assert a is f.rgb() and a.shape == (2, 3, 3) and int(a[0, 0, 0]) == 7 and f.payload is None


def test_concurrent_adds_and_selects():
    win = FrameWindow(num_frames=3, min_interval_s=0.0, max_age_s=0, capacity=4)
    errors = []

    def producer(topic):
        for i in range(2000):
            win.add(topic, i + 1, raw())

    def consumer():
        try:
            for _ in range(500):
                sel = win.select()
                assert sel.stamps_ns == sorted(sel.stamps_ns) or len(sel.topics) > 1
        except WindowError:
            pass
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    win.add("/a", 0, raw())
    win.add("/b", 0, raw())
    threads = [threading.Thread(target=producer, args=(t,)) for t in ("/a", "/b")] + [threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st = win.stats()
    assert st["/a"]["received"] == 2001 and st["/a"]["frames"] <= 4


def test_runtime_reconfigure_validates():
    win = FrameWindow()
    with pytest.raises(ValueError):
        win.configure(num_frames=0)
    win.configure(capacity=2, max_age_s=0)
    for t in range(5):
        win.add("/a", s(t), raw())
    assert len(win.select(num_frames=9).frames) == 2


def test_cameras_at_different_rates_are_aligned_by_stamp():
    """A 20 Hz and a 1 Hz camera: each slot pairs the slow camera's frame with the fast camera's nearest one."""
    win = FrameWindow(num_frames=2, min_interval_s=0.0, max_age_s=0, capacity=64)
    for k in range(61):  # fast: 0.00 .. 3.00 s every 0.05 s
        win.add("/fast", s(k * 0.05), raw(1))
    for t in (0.02, 1.02, 2.02):  # slow: once a second
        win.add("/slow", s(t), raw(2))
    sel = win.select(["/fast", "/slow"])
    # slot times are the slow camera's frames (1.02, 2.02); the fast camera answers with 1.00 and 2.00
    assert sel.stamps_ns == [s(1.0), s(1.02), s(2.0), s(2.02)]
    assert sel.skew_ns == s(0.02)
    one = win.select(["/fast", "/slow"], num_frames=1)
    assert one.stamps_ns == [s(2.0), s(2.02)] and one.skew_ns == s(0.02)


def test_a_frame_too_large_for_the_limit_decodes_once_the_limit_is_raised():
    win = FrameWindow(num_frames=1, max_age_s=0)
    win.add("/a", s(1), raw(7, h=10, w=10))
    (frame,) = win.select(["/a"]).frames
    with pytest.raises(ImageDecodeError, match="too large"):
        frame.rgb(max_pixels=50)
    assert frame.rgb(max_pixels=1000).shape == (10, 10, 3)
