"""``eval --ray``: records sharded over 2 Ray actors give the same report and predictions as one process."""
import json

import pytest

from fixtures.processes import descendants, wait_until_empty
from phi3v_spatial import cli

pytest.importorskip("ray", reason="ray is pinned in requirements.txt; make setup installs it")


def test_eval_sharded_on_ray_equals_eval_in_one_process(tmp_path, tiny_model_dir, capsys):
    from phi3v_spatial.data.synth import generate_dataset

    data = str(tmp_path / "synth")
    generate_dataset(data, 4, seed=7, size=(64, 48), kinds=["yesno", "choice", "count"])
    common = ["eval", "--model", tiny_model_dir, "--data", f"synth:{data}", "--limit", "14", "--no-progress",
              "--max-new-tokens", "3"]
    single, sharded = str(tmp_path / "single.json"), str(tmp_path / "sharded.json")
    assert cli.main([*common, "--out", single]) == 0
    before = set(descendants())
    capsys.readouterr()
    assert cli.main([*common, "--out", sharded, "--ray", "local", "--actors", "2"]) == 0
    assert "2 actors x 1 CPU" in capsys.readouterr().out

    a, b = json.load(open(single)), json.load(open(sharded))
    assert a["report"]["overall"]["n"] == 14
    assert a["report"] == b["report"]
    assert [(p["id"], p["predicted"], p["correct"]) for p in a["predictions"]] == \
        [(p["id"], p["predicted"], p["correct"]) for p in b["predictions"]]
    # one process at 2 torch threads, actors at 1: scores may round differently in the last bits
    scores = [[p["score"] for p in x["predictions"]] for x in (a, b)]
    assert [s is None for s in scores[0]] == [s is None for s in scores[1]] and any(s is not None for s in scores[0])
    assert [s for s in scores[0] if s is not None] == pytest.approx([s for s in scores[1] if s is not None], rel=1e-5)
    assert not wait_until_empty(lambda: set(descendants()) - before), descendants()
