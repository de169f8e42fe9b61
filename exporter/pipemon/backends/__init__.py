"""State backends: where the log of accepted records and the per-pipeline checkpoints live.

Two implementations of one interface: SQLite in a local state directory (the embedded default) and PostgreSQL,
which several exporter replicas share. The recorder only talks to `StateBackend`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# A log row: (commit-ordered position, msgpack group of records).
Row = tuple[int, bytes]


class StorageError(RuntimeError):
    """The state could not be written (or read); nothing of the failed write is kept."""


class LogGap(StorageError):
    """The log was truncated past the position asked for: the reader must reload from the checkpoints."""


@dataclass
class Loaded:
    """What a backend holds at one moment: the checkpoint snapshots, the log after them, the truncation floor."""

    snapshots: list[tuple[str, bytes]]
    records: list[Row]
    floor: int = 0  # the log up to here is gone (folded into snapshots)


class StateBackend(Protocol):
    shared: bool  # whether other processes write the same log (replicas must catch up before they answer)

    def describe(self) -> str: ...

    def open(self) -> Loaded: ...

    def close(self) -> None: ...

    def append(self, row: bytes, after: int) -> tuple[int, list[Row]]:
        """Commit one row; returns its position and the rows other writers committed between `after` and it
        (read in the same transaction). Positions are commit-ordered: once position P is visible, every
        position below it is visible too. Raises StorageError (LogGap: the log no longer goes back to `after`)
        and then keeps nothing."""
        ...

    def read_since(self, after: int) -> list[Row]:
        """The committed rows after `after`, in order; raises LogGap when the log no longer goes back there."""
        ...

    def delete_pipelines(self, names: list[str], upto: int) -> None:
        """Drop the checkpoints of forgotten pipelines (those not newer than position `upto`)."""
        ...

    def write_snapshots(self, snapshots: list[tuple[str, int, bytes]]) -> None:
        """Store (pipeline, log position it holds, snapshot); never replaces a checkpoint that holds more."""
        ...

    def truncate_log(self, upto: int) -> None: ...

    def try_lead(self) -> bool:
        """Whether this process may run the once-across-replicas jobs (checkpoints, the abandoned-run sweep)."""
        ...

    def watch(self, wake: Callable[[int], None]) -> None:
        """Call `wake(position)` (from any thread) when another writer commits a row; stops at close()."""
        ...


def is_postgres_url(state: str) -> bool:
    return state.startswith(("postgresql://", "postgres://"))


def open_backend(state: str | Path, sync: str = "normal") -> StateBackend:
    """The backend for `--state`: a postgresql:// URL, else a state directory for SQLite."""
    if isinstance(state, str) and is_postgres_url(state):
        try:
            from pipemon.backends.postgres import PostgresBackend  # psycopg is an optional extra
        except ImportError as exc:
            raise StorageError(str(exc)) from exc
        return PostgresBackend(state)
    from pipemon.backends.sqlite import SQLiteBackend, state_path

    return SQLiteBackend(state_path(Path(state)), sync)
