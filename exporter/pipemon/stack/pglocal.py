"""A throwaway local PostgreSQL for `pipemon stack --ha`: Debian's PostgreSQL 15 binaries, a cluster in the
stack's directory, listening on 127.0.0.1 only with trust authentication (never expose it), run as the
`postgres` user when pipemon runs as root (initdb and postgres refuse root)."""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
import tempfile
from pathlib import Path

BIN = Path(os.environ.get("PIPEMON_PG_BIN", "/usr/lib/postgresql/15/bin"))
INSTALL_HINT = "sudo apt-get install -y postgresql"
DATABASE = "pipemon"


def installed() -> bool:
    return (BIN / "postgres").exists()


def run_as() -> dict[str, object]:
    """Popen keyword arguments that drop root to the `postgres` user (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def cluster_dir(directory: Path) -> Path:
    """Where the cluster of a stack in `directory` lives. As root, a directory of the `postgres` user under /tmp
    named after `directory` (which may lie where `postgres` cannot reach, e.g. under a 0700 home or pytest's
    temporary root)."""
    if not run_as():
        return directory
    digest = hashlib.sha1(str(directory.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"pipemon-pg-{digest}"


def prepare(directory: Path) -> Path:
    """initdb into cluster_dir(directory)/data unless it exists; returns the data directory."""
    who = run_as()
    directory = cluster_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data"
    if who:
        os.chown(directory, who["user"], who["group"])  # type: ignore[arg-type]
        os.chmod(directory, 0o700)
    if not (data / "PG_VERSION").exists():
        result = subprocess.run([str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E",
                                 "UTF8"], capture_output=True, text=True, cwd=directory, **who)
        if result.returncode:
            raise RuntimeError(f"initdb failed: {result.stderr or result.stdout}")
    return data


def command(data: Path, port: int) -> list[str]:
    """The foreground server: stopped with the stack's other children (SIGTERM: a smart shutdown)."""
    return [str(BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(data.parent),
            "-c", "listen_addresses=127.0.0.1"]


def url(port: int, database: str = DATABASE) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{database}"


def create_database(port: int) -> None:
    import psycopg

    with psycopg.connect(url(port, "postgres"), autocommit=True, connect_timeout=3) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
            conn.execute(f"CREATE DATABASE {DATABASE}")


def ready(port: int) -> bool:
    import psycopg

    try:
        with psycopg.connect(url(port, "postgres"), connect_timeout=1):
            return True
    except psycopg.Error:
        return False
