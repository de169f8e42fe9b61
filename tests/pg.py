"""A real PostgreSQL 15 (Debian's `postgresql`) for tests and benchmarks: its own cluster in a temporary
directory, on a free port of 127.0.0.1 with the socket in that directory, run as the `postgres` user (initdb
refuses root). `postgres_server` is the session-wide one; `pg_url` gives each test an empty database."""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import free_port

BIN = Path(os.environ.get("PIPEMON_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "postgres"
_names = itertools.count(1)


def available() -> bool:
    return (BIN / "initdb").exists()


def require() -> None:
    """Skip outside CI when PostgreSQL is not installed; in CI that is a failure (`make test` installs it)."""
    if available():
        return
    message = f"PostgreSQL 15 not installed ({BIN}/initdb missing): apt-get install postgresql"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class PostgresServer:
    """One cluster: start(), stop() (fast shutdown), start() again on the same data; urls for databases."""

    def __init__(self, fsync: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pipemon-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.fsync = fsync
        self._as_root = os.geteuid() == 0
        if self._as_root:
            entry = pwd.getpwnam(USER)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run(BIN / "initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, *cmd: object) -> None:
        argv = [str(c) for c in cmd]
        if self._as_root:
            argv = ["runuser", "-u", USER, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=self.dir)
        if result.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr or result.stdout}"
                               f"\n--- log:\n{self.tail()}")

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""

    def start(self) -> PostgresServer:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
                f" -c fsync={'on' if self.fsync else 'off'}")
        self._run(BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "30", "start")
        return self

    def stop(self) -> None:
        self._run(BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        name = f"pipemon_{os.getpid()}_{next(_names)}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        if self.running():
            with contextlib.suppress(RuntimeError):
                self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def postgres(fsync: bool = False) -> Iterator[PostgresServer]:
    server = PostgresServer(fsync)
    try:
        yield server.start()
    finally:
        server.destroy()
