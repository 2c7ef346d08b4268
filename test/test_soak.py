"""``phi3v-spatial soak``: a short real soak against spatial_node on the tiny checkpoint, and the table's verdict.

The short run starts the node through its console script (as ``make soak`` does), publishes a raw 640x480 rgb8
camera and a JPEG camera from their own process (at 5 Hz: the test shares two CPU cores), runs three clients
mixing every service and the plan action with lifecycle cycles, and checks what the soak exists to catch: no lost
request, no traceback in the node's log, no success reply carrying NaN, every request type sent and answered.
"""
import os
import subprocess
import sys

import pytest

from phi3v_spatial.benchmark.soak import (
    KINDS, SoakConfig, SoakResult, Stat, format_markdown, format_table, percentile, slope_per_min,
)

CLI = os.path.join(os.path.dirname(sys.executable), "phi3v-spatial")


def _rows(markdown: str) -> dict:
    """request kind -> {column: value} from the markdown table."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) == len(header) and cells[0] in (*KINDS, "lifecycle"):
            out[cells[0]] = dict(zip(header, cells))
    return out


def test_short_soak_loses_nothing_and_reports(tiny_model_dir, tmp_path):
    md = tmp_path / "soak.md"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [CLI, "soak", "--model", tiny_model_dir, "--duration", "30", "--warmup", "5", "--hz", "5",
         "--cycle-s", "10", "--request-timeout", "20", "--grace", "10", "--max-new-tokens", "8", "--plan-tokens", "24",
         "--workdir", str(tmp_path / "work"), "--markdown", str(md)],
        capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    log = (tmp_path / "work" / "spatial_node.log")
    assert proc.returncode == 0, out + "\n--- node log ---\n" + (log.read_text()[-5000:] if log.exists() else "")
    # the table printed
    assert "request" in out and "p95 ms" in out and "node RSS MiB" in out and "verdict" in out, out
    verdict = [ln for ln in out.splitlines() if ln.startswith("verdict")]
    assert verdict and verdict[-1].split()[-1] == "PASS", out
    rows = _rows(md.read_text())
    for kind in KINDS:
        r = rows[kind]
        sent, ok, failed, lost = (int(r[c]) for c in ("sent", "ok", "failed", "lost"))
        assert sent > 0, f"{kind} never sent:\n{out}"
        assert lost == 0, f"{kind}: {lost} lost\n{out}"
        assert ok + failed == sent, f"{kind}: not every request answered\n{out}"
    for kind in ("ask", "query_relations", "set_adapter"):
        assert int(rows[kind]["ok"]) > 0, f"{kind}: no success at all\n{out}"
    assert int(rows["lifecycle"]["ok"]) >= 2 and int(rows["lifecycle"]["failed"]) == 0, out
    assert "Traceback" not in log.read_text()
    text = md.read_text()
    assert "| Traceback in node log | no |" in text
    assert "| success replies carrying NaN | 0 |" in text
    assert "| node died | no |" in text and "| node exit status after SIGINT | 0 |" in text
    # the node's memory and threads were sampled, the cameras counted
    assert "not measured" not in text and "/soak/front/image_raw" in text and "received unknown" not in text
    assert "| node caches at the end | vision " in text
    assert "fastdds_large_frames.xml |" in text  # the camera process ran with the shipped large-frame profile


def _result(**stats) -> SoakResult:
    cfg = SoakConfig(duration_s=60, warmup_s=10)
    rss = [(t, 100.0 + 0.5 * t) for t in range(0, 70)]   # +30 MiB/min
    return SoakResult(cfg, {k: stats.get(k, Stat()) for k in (*KINDS, "lifecycle")}, rss,
                      [(t, 20) for t in range(70)], {"/cam": {"published": 100, "received": 50}}, False, False, 70.0)


def test_verdict_fails_on_lost_nan_and_traceback():
    good = Stat(sent=3, ok=3, latencies=[0.1, 0.2, 0.3])
    r = _result(ask=good)
    assert r.passed and "PASS" in format_table(r)
    assert "+30.00 MiB/min" in format_table(r) and "50 received / 100 published" in format_table(r)
    lost = _result(ask=Stat(sent=2, ok=1, lost=1, latencies=[0.1]))
    assert not lost.passed and "1 request(s) lost" in format_table(lost)
    nan = _result(query_relations=Stat(sent=1, ok=1, nan=1, latencies=[0.1]))
    assert not nan.passed and "carried NaN" in format_markdown(nan)
    tb = _result(ask=good)
    tb.traceback = True
    assert not tb.passed and "Traceback" in "; ".join(tb.problems())


def test_percentile_and_trend():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)
    # the slope ignores the warm-up's samples
    samples = [(t, 1000.0) for t in range(0, 30)] + [(t, 500.0 + 2.0 * t) for t in range(30, 90)]
    assert slope_per_min(samples, 30) == pytest.approx(120.0)
    assert slope_per_min(samples[:2], 0) is None


def test_malloc_trim_gives_freed_heap_memory_back():
    """What the node does after a large request (engine/memory.py): 200 MiB in 100 KiB blocks (below glibc's mmap
    threshold, so they come from the heap), all freed but the last one, which pins the heap's top: free() alone
    keeps the memory; the trim gives it back."""
    from phi3v_spatial.engine import memory

    if memory._libc is None:
        pytest.skip("not glibc: no malloc_trim")
    blocks = [bytearray(100 * 1024) for _ in range(2048)]
    for b in blocks:
        b[::4096] = b"\1" * len(b[::4096])  # touch every page
    pin = blocks[-1]
    del blocks
    before = memory.rss_bytes()
    released = memory.trim()
    after = memory.rss_bytes()
    assert released >= 100 * 2**20 and before - after >= 100 * 2**20, (before, after, released)
    assert memory.stats()["trims"] >= 1
    del pin
