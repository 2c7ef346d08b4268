"""`phi3v-spatial bench` end to end on the embedded model: every row and target is printed, both paths agree.

Timings are printed, never asserted (speed is measured by the benchmark, not by tests).
"""
import json
import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)


def test_bench_prints_every_measurement_and_target(tmp_path):
    out_json = tmp_path / "bench.json"
    run = subprocess.run([os.path.join(BIN, "phi3v-spatial"), "bench", "--repeat", "1", "--candidates", "3",
                          "--size", "320x240", "--max-new-tokens", "4", "--vision-crops", "4", "--json", str(out_json)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout
    assert "outputs equal on both paths: yes" in text
    for row in ("first query, new window", "follow-up query, same window", "follow-up ask, same window",
                "3 relations, new window", "vision tower per frame", "node: 320x240 message -> RGB frame",
                "node: RGB frame -> HD crops", "peak memory"):
        assert row in text, f"missing row {row!r}:\n{text}"
    res = json.loads(out_json.read_text())
    assert res["equal_outputs"] is True
    assert {t["name"] for t in res["targets"]} >= {"follow-up query / first query (engine)",
                                                   "node overhead per frame, message -> model input (ms)"}
    assert all(r["engine_s"] > 0 for r in res["rows"])
    # the engine path filled its caches: one image embedding and one prefix
    assert res["memory"]["engine_cache"]["vision"]["entries"] == 1
    assert res["memory"]["engine_cache"]["prefix"]["entries"] == 1


def test_bench_rejects_bad_arguments():
    run = subprocess.run([os.path.join(BIN, "phi3v-spatial"), "bench", "--size", "big"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "--size must look like 640x480" in run.stderr
    run = subprocess.run([os.path.join(BIN, "phi3v-spatial"), "bench", "--model", "/no/such/model"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "does not exist" in run.stderr


def test_length_groups_benchmark_times_each_way_and_gets_the_same_gradient(tmp_path, capsys):
    """The length-groups benchmark on a few synthetic scenes: every way printed, each one's gradient the padded
    batch's to float rounding (the timings are printed, not asserted)."""
    import re

    from phi3v_spatial.benchmark import length_groups
    from phi3v_spatial.data.synth import generate_dataset
    from phi3v_spatial.train.embedded import EVAL_TYPES, TRAIN_COUNTS, Recipe

    r = Recipe()
    data = generate_dataset(str(tmp_path / "synth"), 6, seed=2, frames=2, cameras=2, size=tuple(r.image_size),
                            kinds=list(dict.fromkeys(tuple(r.base_types) + EVAL_TYPES)), counts=TRAIN_COUNTS)
    assert length_groups.main(["--data", data, "--batches", "1", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"\d+% of one padded batch's positions are padding", text), text
    gaps = [float(x) for x in re.findall(r"gradient off one padded batch's by ([0-9.e+-]+)", text)]
    assert "1 group :" in text and "2 groups:" in text and "4 groups:" in text and len(gaps) == 2, text
    assert all(g < 1e-4 for g in gaps), text
