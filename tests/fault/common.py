"""Shared pieces of the fault suite: an exporter process that can be killed and restarted, HTTP helpers that
return (status, body) instead of raising, and the resident memory of a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import samples
from tests.procs import free_port, stop, wait_http

OPEN_REGISTRY = "unknown_pipelines: accept\nteams:\n  alpha: {}\n  beta: {}\n"


class Exporter:
    """`pipemon serve` as a real process on 127.0.0.1; start(), kill9() and start() again on the same state."""

    def __init__(self, tmp: Path, *extra: str, registry: str = OPEN_REGISTRY, env: dict[str, str] | None = None,
                 state_dir: Path | None = None, port: int | None = None, scheme: str = "http") -> None:
        self.tmp = tmp
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.registry = tmp / "registry.yaml"
        self.registry.write_text(registry)
        self.state_dir = state_dir or tmp / "state"
        self.extra = list(extra)
        self.env = {**os.environ, **(env or {})}
        self.log = tmp / "exporter.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def cmd(self) -> list[str]:
        return [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{self.port}",
                "--registry", str(self.registry), "--state-dir", str(self.state_dir), *self.extra]

    def start(self, ready: bool = True, timeout: float = 20) -> Exporter:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd(), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        self.starts += 1
        if ready:
            try:
                wait_http(f"http://127.0.0.1:{self.port}/-/ready", timeout, self.proc)
            except Exception as exc:
                raise RuntimeError(f"exporter did not start: {exc}\n--- log:\n{self.tail()}") from exc
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def rss_kib(self) -> int:
        assert self.proc is not None
        return rss_kib(self.proc.pid)

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def request(url: str, body: Any = None, *, method: str | None = None, headers: dict[str, str] | None = None,
            raw: bytes | None = None, timeout: float = 10, context: Any = None) -> tuple[int, Any]:
    """(status, decoded JSON or text); HTTP errors are answers, not exceptions. Connection errors raise OSError."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            status, payload, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, payload, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    if "json" in ctype:
        return status, json.loads(payload)
    return status, payload.decode(errors="replace")


def post_ndjson(url: str, events: list[dict], headers: dict[str, str] | None = None,
                timeout: float = 10) -> tuple[int, Any]:
    raw = "\n".join(json.dumps(e) for e in events).encode()
    return request(url, raw=raw, headers={"Content-Type": "application/x-ndjson", **(headers or {})},
                   timeout=timeout)


def scrape(base: str, **kwargs: Any) -> str:
    status, text = request(f"{base}/metrics", **kwargs)
    assert status == 200, (status, text)
    return text


def runs_counted(text: str, prefix: str = "") -> float:
    """Sum of pipeline_runs_total over every pipeline whose name starts with `prefix`."""
    return sum(v for (name, labels), v in samples(text).items()
               if name == "pipeline_runs_total" and dict(labels)["pipeline"].startswith(prefix))


def metric(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def pipeline_samples(text: str) -> dict:
    """The per-pipeline samples (what ingest may change), values as repr so NaN equals NaN."""
    return {k: repr(v) for k, v in samples(text).items() if k[0].startswith("pipeline_")}


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Stopwatch(threading.Thread):
    """Samples a process's RSS every `interval` seconds while it runs."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.rss: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.halt.wait(self.interval):
            try:
                self.rss.append((time.monotonic() - start, rss_kib(self.pid)))
            except (OSError, RuntimeError):
                return
