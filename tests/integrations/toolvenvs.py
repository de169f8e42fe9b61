"""Cached virtualenvs for the real orchestrators the integration tests drive (Airflow, dbt, Dagster).

Each tool gets its own virtualenv, outside the checkout so CI reruns on a clean clone reuse it:
``$PIPEMON_VENV_CACHE`` (default ``~/.cache/pipemon/venvs``) / ``<tool>-<hash of its pinned requirements>``.
A venv is only used once its ``.complete`` marker exists, so an interrupted install is redone, never half-used.

    python tests/integrations/toolvenvs.py [airflow dbt dagster]   # build (or reuse) and print the paths
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REQUIREMENTS = Path(__file__).parent / "requirements"
TOOLS = ("airflow", "dbt", "dagster")


def cache_root() -> Path:
    return Path(os.environ.get("PIPEMON_VENV_CACHE", Path.home() / ".cache" / "pipemon" / "venvs"))


def venv_path(tool: str) -> Path:
    req = (REQUIREMENTS / f"{tool}.txt").read_bytes()
    python = f"{sys.version_info.major}.{sys.version_info.minor}".encode()  # the venv is built by this Python
    digest = hashlib.sha256(req + python).hexdigest()[:12]
    return cache_root() / f"{tool}-{digest}"


def bin_dir(tool: str) -> Path:
    return venv_path(tool) / "bin"


def is_ready(tool: str) -> bool:
    return (venv_path(tool) / ".complete").exists()


def ensure(tool: str) -> Path:
    """The tool's virtualenv, built from its requirements file if it is not in the cache yet."""
    path = venv_path(tool)
    if is_ready(tool):
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"toolvenvs: building {path.name} (cold, a few minutes)", file=sys.stderr, flush=True)
    # The base interpreter, not this venv's: the tool venvs must not see pipemon's packages.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(path)], check=True)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _pip([*pip, "--upgrade", "pip"])
    _pip([*pip, "-r", str(REQUIREMENTS / f"{tool}.txt")])
    (path / ".complete").write_text(f"{time.monotonic() - started:.0f}s\n")
    print(f"toolvenvs: {path.name} built in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return path


def _pip(cmd: list[str]) -> None:
    """Run pip; its output is shown only when it fails (a missing local index warns once per package)."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "is ignored: it is neither" not in line]
        raise SystemExit(f"toolvenvs: {' '.join(cmd[-2:])} failed:\n" + "\n".join(lines[-40:]))


def main(argv: list[str]) -> int:
    for tool in argv or TOOLS:
        started = time.monotonic()
        path = ensure(tool)
        print(f"{tool}: {path} ({time.monotonic() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
