"""The benchmark script runs (tiny sizes), so it cannot rot."""

import subprocess
import sys

import pytest

from tests.procs import REPO

FIGURES = (
    "single-run POSTs", "NDJSON batches of 1,000", "/metrics at 1,000 pipelines", "RSS at 1,000",
    # every row of the table in bench/README.md
    "runs recorded/s, one run per request, 32 keep-alive connections",
    "/metrics full render at 1,000 pipelines, text format", "/metrics full render at 1,000 pipelines, OpenMetrics",
    "/metrics at 1,000 pipelines, ≤ 1% changed", "p99 of single-run POSTs while /metrics is scraped",
    "render time per pipeline", "memory per pipeline", "event → notification at the sink",
)


@pytest.mark.slow
def test_bench_quick_run_prints_every_figure():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--quick"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for figure in FIGURES:
        assert figure in out.stdout, figure
    assert "| pipemon " in out.stdout and "| pushgateway " in out.stdout and "| ratio " in out.stdout


@pytest.mark.slow
def test_ha_bench_quick_run_prints_every_figure():
    from tests import pg

    pg.require()
    out = subprocess.run([sys.executable, str(REPO / "bench" / "ha.py"), "--quick"], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    for figure in ("single runs, 1 client", "single runs, 8 clients", "NDJSON batches of 500",
                   "replication lag", "whole /metrics", "shard 3 of 4"):
        assert figure in out.stdout, figure


@pytest.mark.slow
def test_ui_bench_quick_run_prints_every_figure():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "ui.py"), "--quick"], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    for figure in ("| 1,000 | overview, right after the runs arrived |", "| 1,000 | overview, first page (judged",
                   "| 1,000 | pipeline page |", "recent-runs ring, 50 runs:", "RSS at 1,000 pipelines",
                   "after an overview too"):
        assert figure in out.stdout, figure
