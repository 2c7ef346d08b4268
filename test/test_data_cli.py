"""`phi3v-spatial synth` end to end, including bags in both storages read back with rosbags."""
import os

import cv2
import numpy as np
import pytest
import yaml

from fixtures.plans import template_regex
from phi3v_spatial.cli import main
from phi3v_spatial.data.bag_writer import bag_location, write_camera_bag
from phi3v_spatial.data.plans import EVERY_TEMPLATES, LINEUP_TEMPLATES, MOVE_TEMPLATES
from phi3v_spatial.data.records import read_jsonl
from phi3v_spatial.data.synth import FRAME_PERIOD_NS, SCENE_GAP_NS, SYNTH_EPOCH_NS
from phi3v_spatial.engine import prompts


def _is_training_phrasing(instruction: str) -> bool:
    """The instruction is one of data.plans' training templates filled in, filler words allowed (synth without
    --heldout-templates)."""
    templates = [t for table in (EVERY_TEMPLATES, LINEUP_TEMPLATES, MOVE_TEMPLATES) for t in table["train"]]
    return any(template_regex(t, fillers=True).match(instruction) for t in templates)


def _read_bag(bag_dir):
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    out = []
    with Reader(bag_dir) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        for conn, t, raw in reader.messages():
            out.append((conn.topic, t, ts.deserialize_cdr(raw, conn.msgtype)))
    return types, out


def test_synth_without_bag(tmp_path):
    out = tmp_path / "ds"
    assert main(["synth", "--out", str(out), "--num", "3", "--seed", "1", "--size", "96x72", "--kinds", "yesno,describe",
                 "--quiet"]) == 0
    recs = list(read_jsonl(str(out / "records.jsonl")))
    assert {r.type for r in recs} == {"yesno", "describe"}
    img = cv2.imread(str(out / recs[0].images[0]))
    assert img.shape == (72, 96, 3)
    assert len((out / "scenes.jsonl").read_text().splitlines()) == 3


def test_synth_rejects_bad_arguments(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--num", "1", "--kinds", "yesno,riddles", "--quiet"]) == 2
    assert "riddles" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path / "x"), "--size", "big"])


@pytest.mark.parametrize("suffix, storage", [(".mcap", "mcap"), (".db3", "sqlite3")])
def test_synth_writes_a_bag_and_questions(tmp_path, suffix, storage):
    out, num, frames = tmp_path / "ds", 3, 2
    bag_arg = str(tmp_path / f"run{suffix}")
    assert main(["synth", "--out", str(out), "--num", str(num), "--seed", "4", "--frames", str(frames), "--cameras", "2",
                 "--bag", bag_arg, "--quiet"]) == 0
    bag_dir, st = bag_location(bag_arg)
    assert st == storage and os.path.isfile(os.path.join(bag_dir, f"run{suffix}"))
    types, msgs = _read_bag(bag_dir)
    assert types == {"/cam0/image_raw": "sensor_msgs/msg/Image", "/cam1/image_raw/compressed": "sensor_msgs/msg/CompressedImage"}
    for topic in types:
        stamps = [t for tp, t, _ in msgs if tp == topic]
        assert len(stamps) == num * frames
        segment = frames * FRAME_PERIOD_NS + SCENE_GAP_NS
        assert stamps == [SYNTH_EPOCH_NS + i * segment + f * FRAME_PERIOD_NS for i in range(num) for f in range(frames)]
    for topic, t, msg in msgs:
        assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == t
        i, rest = divmod(t - SYNTH_EPOCH_NS, frames * FRAME_PERIOD_NS + SCENE_GAP_NS)  # scene, offset in it
        f = rest // FRAME_PERIOD_NS
        if topic == "/cam0/image_raw":
            assert (msg.encoding, msg.height, msg.width, msg.step) == ("rgb8", 120, 160, 480)
            rgb = msg.data.reshape(120, 160, 3)
        else:
            assert msg.format == "jpeg"
            rgb = cv2.cvtColor(cv2.imdecode(msg.data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            assert rgb.shape == (120, 160, 3)
        cam = 0 if topic == "/cam0/image_raw" else 1
        png = cv2.cvtColor(cv2.imread(str(out / "images" / f"{i:06d}_c{cam}_f{f}.png")), cv2.COLOR_BGR2RGB)
        if cam == 0:
            assert np.array_equal(rgb, png)  # raw frames are the dataset images, bit for bit
        else:
            assert np.abs(rgb.astype(int) - png).mean() < 6  # jpeg

    entries = yaml.safe_load(open(bag_dir + ".questions.yaml"))
    assert {e["type"] for e in entries} == {"ask", "relations", "plan"}
    assert len({e["id"] for e in entries}) == len(entries)
    duration = (msgs[-1][1] - msgs[0][1]) / 1e9
    for e in entries:
        assert 0 < e["at"] <= duration + 0.2 and e["topics"] and e["num_frames"] in (1, frames)
        assert e["topics"][0] in types
        if e["type"] == "ask" and e["question"].endswith("Answer yes or no."):
            assert e["expect"] in (prompts.YES, prompts.NO)
        elif e["type"] == "relations":
            assert len(e["candidates"]) == len(e["expect"])
            assert all(isinstance(x["holds"], bool) for x in e["expect"])
        elif e["type"] == "plan":
            assert e["expect"][0]["action"] == "pick" and _is_training_phrasing(e["instruction"]), e["instruction"]
    assert any(e["num_frames"] == frames for e in entries)


def test_write_camera_bag_roundtrip_and_refuses_overwrite(tmp_path):
    rgb = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    path = write_camera_bag(str(tmp_path / "b.db3"), [("/cam0/image_raw", 5, rgb, False), ("/cam0/image_raw", 7, rgb, False)])
    types, msgs = _read_bag(path)
    assert [t for _, t, _ in msgs] == [5, 7]
    assert np.array_equal(msgs[0][2].data.reshape(6, 4, 3), rgb) and msgs[0][2].header.frame_id == "cam0"
    with pytest.raises(FileExistsError):
        write_camera_bag(str(tmp_path / "b.db3"), [])
    with pytest.raises(ValueError, match="mixes raw and compressed"):
        write_camera_bag(str(tmp_path / "c"), [("/x", 1, rgb, False), ("/x", 2, rgb, True)])
