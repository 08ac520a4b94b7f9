"""`make bench-smoke` keeps the benchmark working; it asserts nothing about speed."""

import json
import subprocess
import sys

import pytest

from support import ROOT

pytestmark = pytest.mark.slow


def test_benchmark_smoke_run_produces_every_figure(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--output", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert set(results["workloads"]) == {"W1", "W2", "W3"}
    for entry in results["workloads"].values():
        for key in ("B0", "B1", "B2", "B3", "constellation", "first_result_seconds"):
            assert entry[key] > 0, key
    assert {"export_csv_seconds", "status_query_ms", "dispatcher_peak_rss_mib"} <= results["workloads"]["W1"].keys()
    assert (tmp_path / "latest.png").stat().st_size > 0
    assert "| W1 |" in done.stdout
