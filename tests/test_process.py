"""The exporter as a real process: kill -9 mid-stream, promtool on the exposition, SIGHUP reload."""

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_REGISTRY
from tests.helpers import run, samples, value
from tests.procs import free_port, require_binary, running

pytestmark = pytest.mark.slow


def serve_cmd(port: int, state_dir: Path, registry: Path = EXAMPLE_REGISTRY) -> list[str]:
    return [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{port}", "--registry",
            str(registry), "--state-dir", str(state_dir)]


def post(port: int, body, ndjson: bool = False, timeout: float = 5):
    data = "\n".join(map(json.dumps, body)).encode() if ndjson else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/runs", data=data, headers={
        "Content-Type": "application/x-ndjson" if ndjson else "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def counted(text: str, prefix: str) -> float:
    return sum(v for (name, labels), v in samples(text).items()
               if name == "pipeline_runs_total" and dict(labels)["pipeline"].startswith(prefix))


class Sender:
    """Streams single and batched runs from two threads; remembers which ones were acknowledged."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: set[str] = set()
        self.sent: set[str] = set()
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def _send(self, runs: list[dict], ndjson: bool) -> None:
        with self._lock:
            self.sent.update(r["run_id"] for r in runs)
        try:
            answer = post(self.port, runs if ndjson else runs[0], ndjson)
        except OSError:
            return
        results = answer["results"] if ndjson else [answer]
        with self._lock:
            self.acked.update(r["run_id"] for r in results if r["status"] in ("accepted", "duplicate"))

    def loop(self, name: str, batch: int) -> None:
        i = 0
        while not self.stop.is_set():
            runs = [run(f"load_{i % 7}", f"{name}-{i + k}") for k in range(batch)]
            self._send(runs, batch > 1)
            i += batch


def test_kill_9_mid_stream_loses_no_acknowledged_run(tmp_path):
    port = free_port()
    cmd = serve_cmd(port, tmp_path / "state")
    log = tmp_path / "exporter.log"
    with running(cmd, f"http://127.0.0.1:{port}/-/ready", log) as proc:
        sender = Sender(port)
        threads = [threading.Thread(target=sender.loop, args=("single", 1)),
                   threading.Thread(target=sender.loop, args=("batch", 50))]
        for t in threads:
            t.start()
        while len(sender.acked) < 2000:
            threading.Event().wait(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        sender.stop.set()
        for t in threads:
            t.join()
    assert len(sender.acked) >= 2000
    with running(cmd, f"http://127.0.0.1:{port}/-/ready", log):
        after = counted(scrape(port), "load_")
        # Every acknowledged run is there; a run in flight at the kill may be there too, never twice.
        assert len(sender.acked) <= after <= len(sender.sent)
        unacked = sorted(sender.sent - sender.acked)
        for run_id in unacked:  # the client retries what it never saw acknowledged
            post(port, _original(run_id))
        assert counted(scrape(port), "load_") == len(sender.sent)


def _original(run_id: str) -> dict:
    """The run a Sender made with this id (pipeline derived from the counter the same way)."""
    name, _, number = run_id.rpartition("-")
    return run(f"load_{_pipeline_index(name, int(number))}", run_id)


def _pipeline_index(name: str, number: int) -> int:
    if name == "single":
        return number % 7
    return (number - number % 50) % 7


def test_promtool_accepts_the_exposition(tmp_path):
    promtool = require_binary("/usr/bin/promtool")
    port = free_port()
    with running(serve_cmd(port, tmp_path / "state"), f"http://127.0.0.1:{port}/-/ready", tmp_path / "log"):
        post(port, [run("orders_daily", f"r{i}", records_processed=i) for i in range(5)]
             + [run('odd "name"\\x', "r1", "failure")], ndjson=True)
        text = scrape(port)
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert value(text, "pipeline_runs_total", pipeline='odd "name"\\x', team="unowned", status="failure") == 1


def test_sighup_reloads_the_registry(tmp_path):
    registry = tmp_path / "reg.yaml"
    registry.write_text("teams:\n  a: {}\n  b: {}\npipelines:\n  - {match: job, team: a}\n")
    port = free_port()
    with running(serve_cmd(port, tmp_path / "state", registry), f"http://127.0.0.1:{port}/-/ready",
                 tmp_path / "log") as proc:
        post(port, run("job", "1"))
        registry.write_text("teams:\n  a: {}\n  b: {}\npipelines:\n  - {match: job, team: b}\n")
        proc.send_signal(signal.SIGHUP)
        for _ in range(50):
            text = scrape(port)
            if 'team="b"' in text:
                break
            threading.Event().wait(0.1)
        assert value(text, "pipeline_runs_total", pipeline="job", team="b", status="success") == 1
