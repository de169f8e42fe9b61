"""The benchmark script runs (tiny sizes), so it cannot rot."""

import subprocess
import sys

import pytest

from tests.procs import REPO


@pytest.mark.slow
def test_bench_quick_run_prints_every_figure():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--quick"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for figure in ("single-run POSTs", "NDJSON batches of 1,000", "/metrics at 1,000 pipelines", "RSS at 1,000"):
        assert figure in out.stdout
