"""`pipemon run -- COMMAND`: a real subprocess reporting to an exporter on a real port."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pipemon.service.app import create_app
from tests.helpers import value
from tests.procs import free_port

P = {"pipeline": "orders_daily", "team": "data-eng"}
# A child that says when it is ready, then waits for a signal; on SIGTERM it writes its records and exits 0.
HANDLES_TERM = """
import os, signal, sys, time
def done(signum, frame):
    open(os.environ["PIPEMON_RECORDS_FILE"], "w").write("7\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
open(sys.argv[1], "w").close()
time.sleep(60)
"""
DIES_OF_TERM = "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(60)"


@pytest.fixture
async def exporter_url(aiohttp_client, config) -> str:
    port = free_port()
    await aiohttp_client(create_app(config), server_kwargs={"port": port})
    return f"http://127.0.0.1:{port}"


def pipemon_run(url: str, tmp_path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PIPEMON_URL": url, "PIPEMON_SPOOL": str(tmp_path / "spool.ndjson")}
    env.pop("PIPEMON_RUN_ID", None)
    return subprocess.Popen([sys.executable, "-m", "pipemon.cli", "run", *args], env=env,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def finish(proc: subprocess.Popen) -> int:
    return await asyncio.to_thread(proc.wait, 30)


async def scrape(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            return resp.read().decode()

    return await asyncio.to_thread(get)


async def wait_for(path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.05)


async def test_exit_0_is_a_success_with_the_given_records(exporter_url, tmp_path):
    proc = pipemon_run(exporter_url, tmp_path, "--pipeline", "orders_daily", "--records", "5", "--",
                       sys.executable, "-c", "import time; time.sleep(0.2)")
    assert await finish(proc) == 0
    text = await scrape(exporter_url)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_records_processed_total", **P) == 5
    assert value(text, "pipeline_runs_in_progress", **P) == 0
    assert 0.2 <= value(text, "pipeline_run_duration_seconds_sum", **P) < 5


async def test_non_zero_exit_passes_through_and_records_come_from_the_file(exporter_url, tmp_path):
    proc = pipemon_run(exporter_url, tmp_path, "--pipeline", "orders_daily", "--",
                       "sh", "-c", 'echo 1234 > "$PIPEMON_RECORDS_FILE"; exit 3')
    assert await finish(proc) == 3
    text = await scrape(exporter_url)
    assert value(text, "pipeline_runs_total", **P, status="failure") == 1
    assert value(text, "pipeline_records_processed_total", **P) == 1234


async def test_sigterm_is_forwarded_and_the_child_decides_the_outcome(exporter_url, tmp_path):
    ready = tmp_path / "ready"
    proc = pipemon_run(exporter_url, tmp_path, "--pipeline", "orders_daily", "--",
                       sys.executable, "-c", HANDLES_TERM, str(ready))
    await wait_for(ready)
    proc.send_signal(signal.SIGTERM)
    assert await finish(proc) == 0  # the child caught it, wrote its records and exited 0
    text = await scrape(exporter_url)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_records_processed_total", **P) == 7


async def test_a_child_killed_by_a_signal_is_a_failure_and_the_wrapper_dies_the_same_way(exporter_url, tmp_path):
    ready = tmp_path / "ready"
    proc = pipemon_run(exporter_url, tmp_path, "--pipeline", "orders_daily", "--",
                       sys.executable, "-c", DIES_OF_TERM, str(ready))
    await wait_for(ready)
    proc.send_signal(signal.SIGTERM)
    assert await finish(proc) == -signal.SIGTERM
    text = await scrape(exporter_url)
    assert value(text, "pipeline_runs_total", **P, status="failure") == 1


async def test_a_missing_command_is_127_and_a_failure(exporter_url, tmp_path):
    proc = pipemon_run(exporter_url, tmp_path, "--pipeline", "orders_daily", "--", "no-such-command-xyz")
    assert await finish(proc) == 127
    assert "command not found" in proc.stderr.read()
    assert value(await scrape(exporter_url), "pipeline_runs_total", **P, status="failure") == 1


def test_an_unreachable_exporter_never_changes_the_exit_code(tmp_path):
    proc = pipemon_run(f"http://127.0.0.1:{free_port()}", tmp_path, "--pipeline", "orders_daily", "--records",
                       "9", "--", "sh", "-c", "exit 4")
    assert proc.wait(60) == 4
    lines = [json.loads(line) for line in (tmp_path / "spool.ndjson").read_text().splitlines()]
    assert lines[-1]["event"]["status"] == "failure" and lines[-1]["event"]["records_processed"] == 9
