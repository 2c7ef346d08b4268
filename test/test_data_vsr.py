"""VSR JSONL + a local COCO folder become yes/no records phrased with the shared prompts."""
import json
import logging

import cv2
import numpy as np
import pytest

from phi3v_spatial.data.vsr import META_CATEGORY_NAMES, VSR_META_CATEGORIES, VsrMissingImageError, load_vsr, read_vsr
from phi3v_spatial.engine import prompts


def _sample(tmp_path, with_missing=False):
    coco = tmp_path / "coco"
    (coco / "train2017").mkdir(parents=True)
    img = np.full((48, 64, 3), 128, np.uint8)
    cv2.imwrite(str(coco / "000000000001.jpg"), img)
    cv2.imwrite(str(coco / "train2017" / "000000000002.jpg"), img)
    lines = [
        {"image": "000000000001.jpg", "image_link": "http://images.cocodataset.org/val2017/000000000001.jpg",
         "caption": "The cat is left of the dog.", "label": 1, "relation": "left of", "annotator_id": 3},
        {"image": "000000000002.jpg", "image_link": "http://images.cocodataset.org/train2017/000000000002.jpg",
         "caption": "The cup is touching the table.", "label": 0, "relation": "touching", "subj": "cup", "obj": "table",
         "vote_true_validator_id": [1], "vote_false_validator_id": [2, 4]},
        {"image": "000000000002.jpg", "caption": "The bus is far away from the car", "label": True,
         "relation": "far away from", "subj": "bus", "obj": "car"},
    ]
    if with_missing:
        lines.append({"image": "000000000099.jpg", "caption": "The man is near the horse.", "label": 1, "relation": "near"})
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path), str(coco)


def test_meta_categories_match_vsr():
    assert set(VSR_META_CATEGORIES.values()) == set(META_CATEGORY_NAMES)
    assert len(VSR_META_CATEGORIES) == 70  # 71 listed, "among" twice
    expected = {"left of": "Projective", "in front of": "Projective", "above": "Projective", "under": "Projective",
                "touching": "Topological", "on": "Topological", "facing": "Orientation", "near": "Proximity",
                "far away from": "Proximity", "adjacent to": "Adjacency", "toward": "Directional",
                "down from": "Directional", "next to": "Unallocated", "among": "Unallocated", "enclosed by": "Unallocated"}
    for rel, cat in expected.items():
        assert VSR_META_CATEGORIES[rel] == cat, rel


def test_reads_captions_and_relation_questions(tmp_path):
    path, coco = _sample(tmp_path)
    recs = read_vsr(path, coco)
    by_id = {r.id: r for r in recs}
    assert len(recs) == 5  # 3 caption records + 2 relation records (lines with subj/obj)
    cap = by_id["vsr-test-1-caption"]
    assert cap.question == prompts.caption_question("The cat is left of the dog.") and cap.answer == prompts.YES
    assert cap.images == ["000000000001.jpg"] and cap.label == 1 and cap.meta_category == "Projective"
    assert cap.source == "vsr" and cap.type == "yesno" and "vsr-test-1-relation" not in by_id
    rel = by_id["vsr-test-2-relation"]
    assert rel.question == prompts.relation_question("cup", "touching", "table") and rel.answer == prompts.NO
    assert rel.images == ["train2017/000000000002.jpg"] and rel.meta_category == "Topological"
    assert by_id["vsr-test-3-caption"].answer == prompts.YES and by_id["vsr-test-3-caption"].label == 1
    for r in recs:
        assert all((tmp_path / "coco" / p).is_file() for p in r.images)
    assert len(read_vsr(path, coco, relation_questions=False)) == 3


def test_missing_image_is_named_or_skipped(tmp_path, caplog):
    path, coco = _sample(tmp_path, with_missing=True)
    with pytest.raises(VsrMissingImageError, match="000000000099.jpg"):
        load_vsr(path, coco)
    with caplog.at_level(logging.WARNING):
        data = load_vsr(path, coco, on_missing="skip")
    assert data.skipped == ["000000000099.jpg"] and len(data.records) == 5
    assert "skipped 1" in caplog.text


def test_bad_lines_are_reported_with_their_line(tmp_path):
    _, coco = _sample(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "000000000001.jpg", "caption": "x", "relation": "near"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing VSR key 'label'"):
        read_vsr(str(bad), coco)
    bad.write_text(json.dumps({"image": "000000000001.jpg", "caption": "x", "relation": "near", "label": 7}) + "\n")
    with pytest.raises(ValueError, match="label must be"):
        read_vsr(str(bad), coco)
