"""The auxiliary geometry targets: right objects, right places, right tokens."""
import os
import shutil

import numpy as np
import pytest

from phi3v_spatial.data.records import read_jsonl
from phi3v_spatial.train.collator import GEOMETRY_ANSWER, GEOMETRY_NAME, IGNORE_INDEX, SpatialCollator
from phi3v_spatial.train.geometry import GEOMETRY_FEATURES, SceneGeometry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(REPO, "models", "phi3v-spatial-tiny")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from phi3v_spatial.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("geometry")
    path = generate_dataset(str(root / "synth"), 24, seed=5, size=(160, 120), kinds=["yesno", "choice", "count"])
    return os.path.dirname(path), list(read_jsonl(path))


def test_features_agree_with_every_clear_image_relation_label(synth):
    """Left/right and above/below labels are decided in the image too (relation_holds), in front/behind by depth
    with a margin, and closer/farther by the distance to the camera with a margin (which, in these narrow views,
    orders objects as depth does), so the sign of the features' difference must agree with each of those yes/no
    labels; bigger/smaller must follow apparent size more often than not (3D size = apparent size x distance)."""
    root, recs = synth
    geo = SceneGeometry()
    sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1), "in front of": (3, -1),
            "behind": (3, 1), "closer to the camera than": (3, -1), "farther from the camera than": (3, 1)}
    checked = dict.fromkeys(sign, 0)
    size_agree, size_n = 0, 0
    for r in recs:
        if r.type != "yesno":
            continue
        objs = geo.question_objects(r, root)
        assert objs is not None and [n for _, n, _ in objs] == [r.subj, r.obj]
        assert all(r.question[k:k + len(n)] == n for k, n, _ in objs)
        d = objs[0][2] - objs[1][2]
        if r.relation in sign:
            k, s = sign[r.relation]
            assert (np.sign(d[k]) == s) == bool(r.label), (r.question, r.answer, d)
            checked[r.relation] += 1
        elif r.relation in ("bigger than", "smaller than"):
            size_n += 1
            size_agree += (d[2] > 0) == ((r.relation == "bigger than") == bool(r.label))
    assert all(n > 0 for n in checked.values()), checked
    assert size_n > 0 and size_agree / size_n > 0.6, (size_agree, size_n)


def test_features_are_the_projected_object_centre(synth):
    root, recs = synth
    r = next(x for x in recs if x.type == "yesno")
    f = SceneGeometry().object_features(r, root, r.subj)
    import json

    scene = next(json.loads(line) for line in open(os.path.join(root, "scenes.jsonl"))
                 if json.loads(line)["id"] == r.images[0].split("/")[-1].split("_")[0])
    c = scene["cameras"][0][0]
    o = next(o for o in scene["objects"] if o["name"] == r.subj)
    p = np.array(c["R"]) @ np.array(o["positions"][0]) + np.array(c["t"])
    u, v = c["fx"] * p[0] / p[2] + c["cx"], c["fy"] * p[1] / p[2] + c["cy"]
    np.testing.assert_allclose(f[:2], [4 * (u / 160 - 0.5), 4 * (v / 120 - 0.5)], atol=1e-5)
    np.testing.assert_allclose(f[2], (np.log(c["fx"] * o["size"] / p[2]) - 3.0) / 0.5, atol=1e-5)
    np.testing.assert_allclose(f[3], p[2] - 3.25, atol=1e-5)
    assert f.shape == (len(GEOMETRY_FEATURES),)


def test_records_without_ground_truth_get_none(synth, tmp_path):
    root, recs = synth
    geo = SceneGeometry()
    count = next(x for x in recs if x.type == "count")
    assert geo.question_objects(count, root) is None
    superlative = next((x for x in recs if x.type == "choice" and len(x.choices) > 2), None)
    if superlative is not None:
        assert geo.question_objects(superlative, root) is None
    # the same records in a folder without scenes.jsonl (a VSR-like set): nothing, no error
    bare = tmp_path / "bare"
    shutil.copytree(os.path.join(root, "images"), bare / "images")
    r = next(x for x in recs if x.type == "yesno")
    assert geo.question_objects(r, str(bare)) is None
    assert geo.object_features(r, root, "no such object") is None


def test_a_referring_expression_answer_targets_the_object_it_names(tmp_path):
    """"Which one is the biggest cube?" -> "green cube": the answer position regresses the green cube's features
    (as an open answer's does), so the grounding gets the same supervision as the name it is read out as."""
    from phi3v_spatial.data.synth import generate_dataset

    path = generate_dataset(str(tmp_path / "refer"), 8, seed=3, size=(160, 120), kinds=["refer"])
    root, recs = os.path.dirname(path), list(read_jsonl(path))
    geo = SceneGeometry()
    assert recs and all(r.type == "refer" for r in recs)
    for r in recs:
        target = geo.answer_object(r, root)
        assert target is not None, r.question
        np.testing.assert_array_equal(target, geo.object_features(r, root, r.answer))
        assert geo.question_objects(r, root) is None


@pytest.mark.skipif(not os.path.isdir(EMBEDDED), reason="models/phi3v-spatial-tiny is not built")
@pytest.mark.parametrize("turns", [1, 3])
def test_collator_targets_sit_on_the_names_and_the_answer_position(synth, turns):
    from phi3v_spatial.model import Phi3VProcessor

    root, recs = synth
    processor = Phi3VProcessor.from_pretrained(EMBEDDED, num_crops=1)
    tok = processor.tokenizer
    geo = SceneGeometry()
    items = [(r, root) for r in recs]
    collator = SpatialCollator(processor, turns=turns, items=items, geometry=geo)
    plain = SpatialCollator(processor, turns=turns, items=items)
    n_named = 0
    for r in recs[:30]:
        s = collator.encode(r, root)
        # the geometry never changes what the model sees or learns
        p = plain.encode(r, root)
        assert s.input_ids == p.input_ids and s.labels == p.labels
        names = [e for e in s.geometry if e[0] == GEOMETRY_NAME]
        answers = [e for e in s.geometry if e[0] == GEOMETRY_ANSWER]
        assert len(names) == 2 * len(answers)
        for k, (_, pos, target) in enumerate(answers):
            # the answer entry is the last prompt token: the next one is the turn's first learned token
            assert s.labels[pos] == IGNORE_INDEX and s.labels[pos + 1] != IGNORE_INDEX
            first, second = names[2 * k][2], names[2 * k + 1][2]
            np.testing.assert_allclose(target, first - second, atol=1e-6)
        for _, pos, target in names:
            text = tok.decode(s.input_ids[pos - 3:pos + 1])
            # the token ends an object name whose features are the target
            match = [n for n in _scene_names(r, root) if text.rstrip("?").endswith(n.split()[-1])]
            assert match, text
            assert any(np.allclose(geo.object_features(r, root, n), target) for n in _scene_names(r, root)), text
            n_named += 1
        if r.type == "count" and turns == 1:
            assert s.geometry == []
    assert n_named > 10
    batch = collator(items[:6])
    for key in ("geometry_name", "geometry_answer"):
        assert batch[f"{key}_index"].shape[1] == 2 and batch[f"{key}_target"].shape[1] == len(GEOMETRY_FEATURES)
        assert len(batch[f"{key}_index"]) == len(batch[f"{key}_target"])
    assert not any(k.startswith("geometry") for k in plain(items[:6]))


def _scene_names(record, root):
    import json

    sid = record.images[0].split("/")[-1].split("_")[0]
    for line in open(os.path.join(root, "scenes.jsonl")):
        d = json.loads(line)
        if d["id"] == sid:
            return [o["name"] for o in d["objects"]]
    return []


@pytest.mark.skipif(not os.path.isdir(EMBEDDED), reason="models/phi3v-spatial-tiny is not built")
def test_a_referring_expression_ends_on_the_place_of_the_object_it_means(tmp_path):
    """Refer questions and refer plans: the expression's last token regresses the object it means -- the named
    object of a refer question's answer; a refer plan's target unless the instruction names the target, then its
    reference. Other plans get no such target."""
    from phi3v_spatial.data.synth import generate_dataset
    from phi3v_spatial.model import Phi3VProcessor
    from phi3v_spatial.train.collator import GEOMETRY_TARGET

    path = generate_dataset(str(tmp_path / "refer"), 16, seed=4, size=(160, 120), kinds=["refer", "plan"],
                            counts={"refer": 2, "plan": 4}, frames=1, cameras=1)
    root, recs = os.path.dirname(path), list(read_jsonl(path))
    processor = Phi3VProcessor.from_pretrained(EMBEDDED, num_crops=1)
    collator = SpatialCollator(processor, geometry=SceneGeometry())
    geo = SceneGeometry()
    seen = {"refer": 0, "plan target": 0, "plan reference": 0, "other plans": 0}
    for r in recs:
        found = geo.expression_object(r, root)
        if not (r.type == "refer" or r.family == "refer"):
            assert not r.expression and found is None
            seen["other plans"] += 1
            continue
        assert r.expression and r.expression in r.question
        named_target = f"the {r.subj}" in r.question
        meant = r.obj if r.type == "plan" and named_target else r.subj
        if r.type == "plan":
            seen["plan reference" if named_target else "plan target"] += 1
            assert named_target != (f"the {r.obj}" in r.question)   # one object named, the other meant
        else:
            seen["refer"] += 1
        start, expression, feats = found
        assert (start, expression) == (r.question.find(r.expression), r.expression)
        np.testing.assert_array_equal(feats, geo.object_features(r, root, meant))
        sample = collator.encode(r, root)
        at_expression = [pos for kind, pos, t in sample.geometry if kind == GEOMETRY_TARGET and np.array_equal(t, feats)
                         and sample.labels[pos] == IGNORE_INDEX and sample.labels[pos + 1] == IGNORE_INDEX]
        assert len(at_expression) == 1, r.question
        text = processor.tokenizer.decode(sample.input_ids[at_expression[0] - 3:at_expression[0] + 1])
        assert text.rstrip("?.,").endswith(r.expression.split()[-1]), (text, r.expression)   # may hold the stop
    assert all(n > 0 for n in seen.values()), seen
