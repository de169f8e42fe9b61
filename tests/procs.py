"""Start and stop real processes (exporter, Prometheus, Alertmanager) on 127.0.0.1 for tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_binary(path: str) -> str:
    """The binary's path, or skip outside CI; in CI a missing binary is a failure (.ci/run installs them)."""
    if shutil.which(path):
        return path
    message = f"{path} not installed (apt-get install prometheus prometheus-alertmanager prometheus-pushgateway)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers 2xx; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if 200 <= resp.status < 300:
                    return
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(cmd: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None,
            timeout: float = 20.0) -> Iterator[subprocess.Popen]:
    """Run `cmd` with output to `log`, wait for `ready_url`, stop it on exit."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        try:
            wait_http(ready_url, timeout, proc)
        except Exception as exc:
            raise RuntimeError(f"{cmd[0]} did not start: {exc}\n--- log:\n{log.read_text()[-3000:]}") from exc
        yield proc
    finally:
        stop(proc)


def stack_command(directory: Path, registry: Path, ports: list[int], scrape: str = "1s",
                  evaluation: str = "1s") -> list[str]:
    """`pipemon stack` on the given seven ports, with short intervals for tests and benchmarks: every `for:`
    capped at 1 s, 1 s group wait and interval, a one-hour repeat interval (the cooldown)."""
    return [sys.executable, "-m", "pipemon.cli", "stack", "--dir", str(directory), "--registry", str(registry),
            "--ports", ",".join(map(str, ports)), "--scrape-interval", scrape, "--evaluation-interval", evaluation,
            "--max-for", "1s", "--group-wait", "1s", "--group-interval", "1s", "--repeat-interval", "1h"]
