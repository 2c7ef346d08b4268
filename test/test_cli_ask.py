"""`phi3v-spatial ask` end to end: image files in, an answer / scores / a plan error out."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        p = str(d / f"frame{i}.png")
        cv2.imwrite(p, rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
        paths.append(p)
    return paths


def _ask(*args):
    return subprocess.run([os.path.join(BIN, "phi3v-spatial"), "ask", *args], capture_output=True, text=True, timeout=300)


def test_ask_prints_the_engines_answer(tiny_model_dir, tiny_processor, image_files):
    from phi3v_spatial.engine.engine import SpatialEngine

    out = _ask("--model", tiny_model_dir, "--image", image_files[0], "--image", image_files[1],
               "--max-new-tokens", "5", "Where is the red cube?")
    assert out.returncode == 0, out.stderr
    frames = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in image_files]
    expected = SpatialEngine.from_pretrained(tiny_model_dir, device="cpu").ask("Where is the red cube?", frames, max_new_tokens=5)
    assert out.stdout.strip() == expected.answer


def test_ask_scores_relations(tiny_model_dir, tiny_processor, image_files):
    out = _ask("--model", tiny_model_dir, "--image", image_files[0], "--relation", "red cube", "left of", "blue sphere",
               "--relation", "red cube", "behind", "blue sphere", "x")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("red cube | left of | blue sphere: p(yes)=")


def test_ask_reports_operator_errors(tmp_path, image_files):
    out = _ask("--model", str(tmp_path / "nope"), "--image", image_files[0], "q")
    assert out.returncode == 1 and "does not exist" in out.stderr
    out = _ask("--model", str(tmp_path), "--image", str(tmp_path / "missing.png"), "q")
    assert out.returncode != 0 and "cannot read image" in out.stderr
