"""Clients that fail over: `pipemon.client` and `pipemon run` with several exporter URLs pass over one that is
down (or answers 5xx) for the next, stay with the one that answered, and spool only when none answers."""

import asyncio
import http.server
import os
import subprocess
import sys
import threading
import urllib.request

import pytest

import pipemon
from pipemon.client import Reporter, exporter_urls
from pipemon.service.app import create_app
from tests.helpers import value
from tests.procs import free_port

P = {"pipeline": "orders_daily", "team": "data-eng"}


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        return resp.read().decode()


class _Unavailable(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_POST(self) -> None:
        type(self).hits += 1
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering_503():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Unavailable.hits = 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
async def exporter_url(aiohttp_client, config) -> str:
    port = free_port()
    await aiohttp_client(create_app(config), server_kwargs={"port": port})
    return f"http://127.0.0.1:{port}"


def test_urls_from_a_list_commas_or_the_environment(monkeypatch):
    assert exporter_urls(["http://a:1/", "http://b:2,http://c:3"]) == ["http://a:1", "http://b:2", "http://c:3"]
    monkeypatch.setenv("PIPEMON_URL", "http://a:1, http://b:2")
    assert exporter_urls(None) == ["http://a:1", "http://b:2"]
    monkeypatch.delenv("PIPEMON_URL")
    assert exporter_urls(None) == ["http://127.0.0.1:9464"]


async def test_a_down_exporter_is_passed_over_and_the_answering_one_kept(exporter_url, answering_503, tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    rep = Reporter([down, answering_503, exporter_url], spool=tmp_path / "spool", timeout=2, backoff=0.01)

    def runs() -> None:
        for i in range(3):
            with pipemon.track("orders_daily", run_id=f"r{i}", reporter=rep):
                pass

    await asyncio.to_thread(runs)
    assert rep.url == exporter_url  # where it failed over to, and stays
    assert _Unavailable.hits == 1  # passed over once, not at every report
    assert not (tmp_path / "spool").exists()
    text = await asyncio.to_thread(scrape, exporter_url)
    assert value(text, "pipeline_runs_total", **P, status="success") == 3


async def test_all_down_spools_then_the_spool_goes_to_whichever_is_up(exporter_url, tmp_path):
    down = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    spool = tmp_path / "spool"
    offline = Reporter(down, spool=spool, timeout=1, retries=1, backoff=0.01)
    await asyncio.to_thread(lambda: pipemon.track("orders_daily", run_id="s1", reporter=offline).__enter__())
    assert spool.read_text().count("\n") == 1
    online = Reporter([down[0], exporter_url], spool=spool, timeout=2, retries=1, backoff=0.01)

    def second() -> None:
        with pipemon.track("orders_daily", run_id="s2", reporter=online):  # sends the spool first
            pass

    await asyncio.to_thread(second)
    assert spool.read_text() == ""
    text = await asyncio.to_thread(scrape, exporter_url)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_runs_in_progress", **P) == 1  # s1's start, spooled while all were down


async def test_pipemon_run_fails_over_between_urls(exporter_url, tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PIPEMON_SPOOL": str(tmp_path / "spool")}
    env.pop("PIPEMON_URL", None)
    proc = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "pipemon.cli", "run", "--pipeline", "orders_daily", "--url", down,
        "--url", exporter_url, "--records", "5", "--", "true"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "failed over" in proc.stderr
    text = await asyncio.to_thread(scrape, exporter_url)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
