"""The decoding benchmark runs end to end (tiny lengths; the figures are in the README)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_decode_times_each_length(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "scripts/bench_decode.py", "--tokens", "2,4",
                          "--repeats", "1", "--threads", "1", "--device", "cpu",
                          "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["threads"] == 1
    assert [row["tokens"] for row in result["lengths"]] == [2, 4]
    assert all(row["cached_s"] > 0 and row["uncached_s"] > 0 for row in result["lengths"])
    assert "4 tokens, batch 1, 1 thread:" in run.stdout
