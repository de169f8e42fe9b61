"""Durable state in SQLite (the default backend): an append-only log of accepted records, folded into
per-pipeline checkpoints.

An event is acknowledged only after its record is committed to the log, so `kill -9` loses nothing that
was acknowledged. Checkpoints bound the log: they store the snapshots of the pipelines that changed and
delete the log up to the point the snapshots cover, in one transaction. Start-up loads the snapshots and
replays what is left of the log. All methods are blocking; the caller runs them in one worker thread.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from pipemon.backends import Loaded, Row, StorageError

log = logging.getLogger("pipemon.storage")
# Fault injection for tests where a read-only or full file system cannot be mounted: while the file named by
# this variable exists, every write fails as if the disk were full ("full") or read-only (anything else).
FAULT_ENV = "PIPEMON_STORAGE_FAULT"

SCHEMA = """
CREATE TABLE IF NOT EXISTS pipelines (name TEXT PRIMARY KEY, snapshot BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY AUTOINCREMENT, record BLOB NOT NULL);
"""


class SQLiteBackend:
    """One process's state in a local file (no replicas: `shared` is False)."""

    shared = False

    def __init__(self, path: Path, sync: str = "normal") -> None:
        self.path = path
        self.sync = sync
        self._db: sqlite3.Connection | None = None
        self._fault_file = os.environ.get(FAULT_ENV) or None

    def describe(self) -> str:
        return str(self.path.parent)

    def open(self) -> Loaded:
        """Open (or create) the database; returns the checkpoint snapshots and the log (seq, row) to replay."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            self.close()
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("state file %s is unreadable (%s): moved aside to %s, starting with empty state",
                      self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    src.rename(f"{aside}{suffix}")
            return self._open()

    def _open(self) -> Loaded:
        if not self.path.exists():
            log.info("no state file at %s: starting with empty state", self.path)
        db = self._connect()
        db.execute("PRAGMA journal_mode=WAL")
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check failed")
        db.executescript(SCHEMA)
        snapshots = db.execute("SELECT name, snapshot FROM pipelines").fetchall()
        records = db.execute("SELECT seq, record FROM log ORDER BY seq").fetchall()
        return Loaded(snapshots, records)

    def read_since(self, after: int) -> list[Row]:
        """Nothing to catch up: this process is the only writer, and applies each row as it commits it."""
        return []

    def try_lead(self) -> bool:
        return True

    def watch(self, wake: Callable[[int], None]) -> None:
        """No other writers to watch."""

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def append(self, row: bytes, after: int = 0) -> tuple[int, list[Row]]:
        """Commit one row to the log and return its sequence number (and no other writers' rows: there are
        none); raises StorageError (keeping nothing) when it cannot."""
        seq = 0

        def write(db: sqlite3.Connection) -> None:
            nonlocal seq
            seq = db.execute("INSERT INTO log (record) VALUES (?)", (row,)).lastrowid

        self._write(write)
        return seq, []

    # A checkpoint is several short transactions, so that log appends interleave with it: forget, then
    # snapshots in chunks, then the log up to the sequence the snapshots cover. A crash between them is
    # harmless: each snapshot knows the sequence it covers, and replay skips what it already holds.

    def delete_pipelines(self, names: list[str], upto: int = 0) -> None:
        self._write(lambda db: db.executemany("DELETE FROM pipelines WHERE name = ?", [(n,) for n in names]))

    def write_snapshots(self, snapshots: list[tuple[str, int, bytes]]) -> None:
        rows = [(name, blob) for name, _covers, blob in snapshots]  # one writer: never an older one
        self._write(lambda db: db.executemany("INSERT OR REPLACE INTO pipelines (name, snapshot) VALUES (?, ?)",
                                              rows))

    def truncate_log(self, upto: int) -> None:
        self._write(lambda db: db.execute("DELETE FROM log WHERE seq <= ?", (upto,)))

    def _write(self, work) -> None:
        try:
            if self._fault_file is not None:
                self._injected_fault()
            db = self._db or self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                work(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            # Reconnect next time: a file system that went read-only or full may leave the handle unusable.
            self.close()
            raise StorageError(str(exc)) from exc

    def _injected_fault(self) -> None:
        try:
            kind = Path(self._fault_file).read_text().strip()
        except OSError:
            return
        raise sqlite3.OperationalError("database or disk is full (injected)" if kind == "full"
                                       else "attempt to write a readonly database (injected)")

    def _connect(self) -> sqlite3.Connection:
        db = self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # In WAL mode `normal` survives a crash of the process (kill -9); `full` also a power loss.
        db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
        return db


def state_path(state_dir: Path) -> Path:
    return state_dir / "pipemon.sqlite3"
