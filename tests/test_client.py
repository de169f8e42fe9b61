"""The Python client (`pipemon.track`, `pipemon.tracked`) against an exporter on a real port."""

import asyncio
import http.server
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import ClassVar

import pytest

import pipemon
from pipemon.client import Reporter
from pipemon.service.app import EXPORTER_KEY, create_app
from tests.helpers import value
from tests.procs import free_port

P = {"pipeline": "orders_daily", "team": "data-eng"}


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        return resp.read().decode()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def start_exporter(aiohttp_client, config, port):
    """Start the exporter on `port` (nothing listens there before); returns its URL."""

    async def start() -> str:
        client = await aiohttp_client(create_app(config), server_kwargs={"port": port})
        client.exporter = client.app[EXPORTER_KEY]
        return f"http://127.0.0.1:{port}"

    return start


def reporter(url: str, spool: Path, **kwargs) -> Reporter:
    return Reporter(url, spool=spool, timeout=2, backoff=0.01, **kwargs)


def spooled(spool: Path) -> list[dict]:
    return [json.loads(line) for line in spool.read_text().splitlines()] if spool.exists() else []


async def test_a_successful_run_reports_start_and_finish(start_exporter, tmp_path):
    url = await start_exporter()
    rep = reporter(url, tmp_path / "spool")

    def pipeline() -> tuple[str, str]:
        with pipemon.track("orders_daily", reporter=rep) as run:
            during = scrape(url)
            run.records = 42
        return during, run.run_id

    during, run_id = await asyncio.to_thread(pipeline)
    assert value(during, "pipeline_runs_in_progress", **P) == 1
    text = await asyncio.to_thread(scrape, url)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_runs_in_progress", **P) == 0
    assert value(text, "pipeline_records_processed_total", **P) == 42
    assert value(text, "pipeline_run_duration_seconds_count", **P) == 1
    assert len(run_id) == 32 and not spooled(tmp_path / "spool")


async def test_an_exception_marks_the_run_failed_and_is_reraised(start_exporter, tmp_path):
    url = await start_exporter()
    rep = reporter(url, tmp_path / "spool")

    @pipemon.tracked("orders_daily", reporter=rep)
    def pipeline(n: int) -> None:
        pipemon.current_run().records = n
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await asyncio.to_thread(pipeline, 5)
    text = await asyncio.to_thread(scrape, url)
    assert value(text, "pipeline_runs_total", **P, status="failure") == 1
    assert value(text, "pipeline_runs_total", **P, status="success") == 0
    assert value(text, "pipeline_records_processed_total", **P) == 5
    assert pipemon.current_run() is None


async def test_each_call_of_a_tracked_function_is_a_new_run(start_exporter, tmp_path):
    url = await start_exporter()
    rep = reporter(url, tmp_path / "spool")
    ids = []

    @pipemon.tracked("orders_daily", reporter=rep)
    def pipeline() -> str:
        ids.append(pipemon.current_run().run_id)
        return "done"

    assert await asyncio.to_thread(pipeline) == "done"
    assert await asyncio.to_thread(pipeline) == "done"
    assert len(set(ids)) == 2
    assert value(await asyncio.to_thread(scrape, url), "pipeline_runs_total", **P, status="success") == 2


async def test_exporter_down_then_up_spooled_events_arrive_exactly_once(start_exporter, port, tmp_path):
    spool = tmp_path / "spool.ndjson"
    rep = reporter(f"http://127.0.0.1:{port}", spool, retries=2)

    def runs(*outcomes: bool) -> None:
        for ok in outcomes:
            try:
                with pipemon.track("orders_daily", reporter=rep) as run:
                    run.records = 10
                    if not ok:
                        raise RuntimeError("pipeline failed")
            except RuntimeError:
                pass

    await asyncio.to_thread(runs, True, False)  # nothing listens: the pipeline goes on, events are spooled
    finishes = [e["event"]["status"] for e in spooled(spool) if e["path"] == "/api/v1/runs"]
    assert finishes == ["success", "failure"]
    url = await start_exporter()
    await asyncio.to_thread(runs, True)  # the next report sends the spool first
    assert spooled(spool) == []
    await asyncio.to_thread(runs, True)
    text = await asyncio.to_thread(scrape, url)
    assert value(text, "pipeline_runs_total", **P, status="success") == 3
    assert value(text, "pipeline_runs_total", **P, status="failure") == 1
    assert value(text, "pipeline_records_processed_total", **P) == 40
    assert value(text, "pipeline_runs_in_progress", **P) == 0
    # Exactly once: nothing was sent twice, and the starts of spooled finished runs were not sent at all.
    assert value(text, "pipemon_events_duplicate_total") == 0
    assert value(text, "pipemon_events_received_total", endpoint="runs") == 4
    assert value(text, "pipemon_events_received_total", endpoint="runs_start") == 2


async def test_two_processes_flushing_the_same_spool_send_each_event_once(start_exporter, tmp_path):
    spool = tmp_path / "spool.ndjson"
    down = reporter(f"http://127.0.0.1:{free_port()}", spool, retries=1)
    for i in range(300):
        down._spool("/api/v1/runs", {"pipeline": "orders_daily", "run_id": f"r{i}", "status": "success",
                                     "duration_seconds": 1})
    url = await start_exporter()
    flushers = [reporter(url, spool) for _ in range(4)]
    await asyncio.gather(*(asyncio.to_thread(f.flush) for f in flushers))
    await asyncio.to_thread(flushers[0].flush)  # whoever was skipped: the spool is empty by now
    text = await asyncio.to_thread(scrape, url)
    assert value(text, "pipeline_runs_total", **P, status="success") == 300
    assert value(text, "pipemon_events_duplicate_total") == 0
    assert spooled(spool) == []


async def test_a_rejected_event_is_logged_and_dropped_never_raised(start_exporter, tmp_path, caplog):
    url = await start_exporter()
    spool = tmp_path / "spool"

    def pipeline() -> None:
        with pipemon.track("orders_daily", team="analytics", reporter=reporter(url, spool)) as run:
            run.records = "many"  # ignored with a warning

    await asyncio.to_thread(pipeline)
    assert "team_mismatch" in caplog.text and "ignoring records='many'" in caplog.text
    assert spooled(spool) == []
    assert value(await asyncio.to_thread(scrape, url), "pipeline_runs_total", **P, status="success") == 0


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first two POSTs, then 200."""

    posts: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        self.posts.append((self.headers["Authorization"], self.rfile.read(int(self.headers["Content-Length"]))))
        ok = len(self.posts) > 2
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "accepted"}' if ok else b'{"status": "rejected"}')

    def log_message(self, *args: object) -> None:
        pass


def test_5xx_is_retried_with_backoff(tmp_path):
    FlakyHandler.posts = []
    server = http.server.HTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rep = reporter(f"http://127.0.0.1:{server.server_port}", tmp_path / "spool", retries=3, token="s3cret")
        rep.report("/api/v1/runs", {"pipeline": "p", "run_id": "1", "status": "success", "duration_seconds": 1})
    finally:
        server.shutdown()
    assert [auth for auth, _ in FlakyHandler.posts] == ["Bearer s3cret"] * 3
    assert not spooled(tmp_path / "spool")


def test_import_pipemon_stays_light():
    code = ("import sys, pipemon; pipemon.track; pipemon.tracked; "
            "print(sorted({'aiohttp', 'msgspec', 'yaml', 'prometheus_client'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
