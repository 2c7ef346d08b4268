"""--data specs parse into sources, and the seeded mixture honours the weights."""
import json

import cv2
import numpy as np
import pytest

from phi3v_spatial.data.mixture import DataSource, MixtureSampler, load_data_spec, parse_data_spec
from phi3v_spatial.data.records import SpatialRecord, write_jsonl
from phi3v_spatial.data.synth import generate_dataset


@pytest.mark.parametrize("spec, kind, path, image_dir, weight", [
    ("synth:out/a", "synth", "out/a", "", 1.0),
    ("synth:out/a:2.5", "synth", "out/a", "", 2.5),
    ("vsr:data/test.jsonl:/coco", "vsr", "data/test.jsonl", "/coco", 1.0),
    ("vsr:data/test.jsonl:/coco:0.5", "vsr", "data/test.jsonl", "/coco", 0.5),
    ("data/records.jsonl", "jsonl", "data/records.jsonl", "", 1.0),
    ("data/records.jsonl:3", "jsonl", "data/records.jsonl", "", 3.0),
])
def test_parse_specs(spec, kind, path, image_dir, weight):
    s = parse_data_spec(spec)
    assert (s.kind, s.path, s.image_dir, s.weight) == (kind, path, image_dir, weight)


@pytest.mark.parametrize("spec", ["", "vsr:only.jsonl", "synth:", "synth:dir:abc", "synth:dir:-1", "x.jsonl:0",
                                  "vsr:a.jsonl:/coco:1:2"])
def test_bad_specs_are_rejected(spec):
    with pytest.raises(ValueError):
        parse_data_spec(spec)


def test_load_synth_vsr_and_plain(tmp_path):
    generate_dataset(str(tmp_path / "syn"), 2, seed=0, size=(64, 48), kinds=["yesno"])
    records, root, weight = load_data_spec(f"synth:{tmp_path / 'syn'}:2")
    assert records and root == str(tmp_path / "syn") and weight == 2.0
    assert all((tmp_path / "syn" / p).is_file() for r in records for p in r.images)

    (tmp_path / "coco").mkdir()
    cv2.imwrite(str(tmp_path / "coco" / "1.jpg"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "v.jsonl").write_text(json.dumps({"image": "1.jpg", "caption": "A is near B.", "label": 0, "relation": "near"}))
    src = load_data_spec(f"vsr:{tmp_path / 'v.jsonl'}:{tmp_path / 'coco'}")
    assert len(src.records) == 1 and src.root == str(tmp_path / "coco") and src.records[0].answer == "no"

    (tmp_path / "sub").mkdir()
    write_jsonl(str(tmp_path / "sub" / "r.jsonl"), records[:3])
    plain = load_data_spec(f"{tmp_path / 'sub' / 'r.jsonl'}:0.25")
    assert len(plain.records) == 3 and plain.root == str(tmp_path / "sub") and plain.weight == 0.25

    with pytest.raises(FileNotFoundError, match="records.jsonl"):
        load_data_spec(f"synth:{tmp_path / 'nope'}")


def _source(prefix, n, weight):
    return DataSource([SpatialRecord(id=f"{prefix}{i}", images=[], question="q", answer="a", type="yesno") for i in range(n)],
                      f"/{prefix}", weight, prefix)


def test_mixture_follows_weights_and_is_seeded():
    sources = [_source("a", 50, 3.0), _source("b", 7, 1.0)]
    draws = MixtureSampler(sources, seed=5).take(4000)
    frac_a = sum(rec.id.startswith("a") for rec, _ in draws) / len(draws)
    assert abs(frac_a - 0.75) < 0.03
    assert all(root == "/" + rec.id[0] for rec, root in draws)
    same = MixtureSampler(sources, seed=5).take(200)
    other = MixtureSampler(sources, seed=6).take(200)
    assert [r.id for r, _ in same] == [r.id for r, _ in draws[:200]]
    assert [r.id for r, _ in other] != [r.id for r, _ in same]


def test_mixture_visits_every_record_once_per_pass():
    sampler = MixtureSampler([_source("a", 10, 1.0)], seed=0)
    first, second = sampler.take(10), sampler.take(10)
    assert sorted(r.id for r, _ in first) == sorted(r.id for r, _ in second) == sorted(f"a{i}" for i in range(10))


def test_mixture_rejects_empty_or_bad_weights():
    with pytest.raises(ValueError):
        MixtureSampler([_source("a", 0, 1.0)])
    with pytest.raises(ValueError):
        MixtureSampler([_source("a", 3, 0.0)])
