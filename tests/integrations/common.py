"""What the integration tests with real orchestrators share: a pipemon exporter process with the documented
registry (docs/examples/orchestrators.yaml), and polling its API and /metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.helpers import samples
from tests.procs import free_port, running

REPO = Path(__file__).resolve().parents[2]
REGISTRY = REPO / "docs" / "examples" / "orchestrators.yaml"


class Pipemon:
    """A running `pipemon serve` on 127.0.0.1."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return response.read()

    def pipelines(self) -> dict[str, dict]:
        listed = json.loads(self.get("/api/v1/pipelines"))["pipelines"]
        return {p["pipeline"]: p for p in listed if p["runs_success"] + p["runs_failure"] + p["runs_in_progress"]}

    def pipeline(self, name: str) -> dict:
        return json.loads(self.get(f"/api/v1/pipelines/{urllib.request.quote(name)}"))

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        return samples(self.get("/metrics").decode())

    def counter(self, name: str) -> dict[str, float]:
        """A family's samples by their `reason` label (or "" without one)."""
        return {dict(labels).get("reason", ""): v for (n, labels), v in self.metrics().items() if n == name}


@contextlib.contextmanager
def pipemon(tmp: Path, registry: Path = REGISTRY) -> Iterator[Pipemon]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "pipemon.log"
    cmd = [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{port}", "--registry",
           str(registry), "--state-dir", str(tmp / "pipemon-state")]
    with running(cmd, url + "/-/ready", log) as proc:
        yield Pipemon(url, proc, log)


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 1.0,
               diagnose: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose()}")
        time.sleep(every)


@contextlib.contextmanager
def process_group(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None
                  ) -> Iterator[subprocess.Popen]:
    """Run `cmd` in a session of its own; on exit SIGTERM, then SIGKILL, the whole group (an Airflow scheduler's
    executor workers, a Dagster daemon's sensor processes)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        yield proc
    finally:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group


def tool_env(tool: str, **extra: str) -> dict[str, str]:
    """The environment for a tool of its cached virtualenv: its bin first, no pipemon venv leaking in."""
    from tests.integrations import toolvenvs

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{toolvenvs.ensure(tool) / 'bin'}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def ndjson(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
