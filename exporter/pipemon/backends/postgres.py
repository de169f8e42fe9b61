"""State in PostgreSQL, shared by any number of exporter replicas.

The log is commit-ordered: a writer takes the row lock of the log head (`UPDATE … RETURNING`), so writers
commit one at a time and a position becomes visible only after every position below it. Every replica applies
the log in position order, so all replicas hold the same state and agree on which record of a run came first
(the later ones are duplicates on every replica alike). Each commit sends a NOTIFY so the others catch up at
once. Checkpoints and the abandoned-run sweep are for the one replica that holds a session advisory lock.
All methods are blocking; the caller runs them in one worker thread (`watch` has its own thread).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

try:
    import psycopg
except ImportError as exc:  # an optional extra: SQLite needs nothing
    raise ImportError("--state postgresql://… needs psycopg: pip install 'pipemon[postgres]'") from exc

from pipemon.backends import Loaded, LogGap, Row, StorageError

log = logging.getLogger("pipemon.storage")
SCHEMA_VERSION = 1
CHANNEL = "pipemon_log"
LEAD_LOCK = 0x706970656D6F6E  # advisory lock key of the once-across-replicas jobs ("pipemon")
MIGRATE_LOCK = LEAD_LOCK + 1
# Each migration takes the schema from the version before it to its index + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE pipemon_pipelines (name text PRIMARY KEY, covers bigint NOT NULL, snapshot bytea NOT NULL);
    CREATE TABLE pipemon_log (seq bigint PRIMARY KEY, record bytea NOT NULL);
    INSERT INTO pipemon_meta (key, value) VALUES ('log_head', 0), ('log_floor', 0);
    """,
)
# Fail fast when the server is gone: ingest answers 503 and /metrics serves the last state instead of hanging.
CONNECT_OPTIONS = {"connect_timeout": 3,
                   "options": "-c statement_timeout=10000 -c idle_in_transaction_session_timeout=30000",
                   "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2}


class PostgresBackend:
    shared = True

    def __init__(self, url: str) -> None:
        self.url = url
        self._db: psycopg.Connection | None = None
        self._leading = False
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def describe(self) -> str:
        """The URL without its password or query (`?password=…` is valid libpq syntax), for logs."""
        parts = urlsplit(self.url)
        host = parts.netloc.rpartition("@")[2]
        user = parts.username
        return urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host, query=""))

    # ---- connection --------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        if self._db is None or self._db.closed:
            self._leading = False  # a session lock dies with its session
            self._db = psycopg.connect(self.url, autocommit=True, **CONNECT_OPTIONS)
        return self._db

    def _run(self, work: Callable[[psycopg.Connection], object]):
        """Run `work` in one transaction; any database error becomes StorageError (and a fresh connection)."""
        try:
            db = self._connect()
            with db.transaction():
                return work(db)
        except LogGap:
            raise
        except psycopg.Error as exc:
            self._drop()
            raise StorageError(f"PostgreSQL: {exc}".strip()) from exc

    def _drop(self) -> None:
        if self._db is not None:
            with contextlib.suppress(psycopg.Error):
                self._db.close()
        self._db, self._leading = None, False

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._drop()

    # ---- schema ------------------------------------------------------------------------------------

    def migrate(self, db: psycopg.Connection) -> None:
        """Create or upgrade the schema; one replica at a time (the others wait on the lock)."""
        db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS pipemon_meta (key text PRIMARY KEY, value bigint NOT NULL)")
        row = db.execute("SELECT value FROM pipemon_meta WHERE key = 'schema_version'").fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise StorageError(f"the database has pipemon schema version {version}, newer than this pipemon's"
                               f" {SCHEMA_VERSION}: upgrade pipemon")
        for number in range(version, SCHEMA_VERSION):
            db.execute(MIGRATIONS[number])
            log.info("PostgreSQL schema migrated to version %d", number + 1)
        db.execute("INSERT INTO pipemon_meta (key, value) VALUES ('schema_version', %s)"
                   " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (SCHEMA_VERSION,))

    def open(self) -> Loaded:
        self._run(self.migrate)

        def load(db: psycopg.Connection) -> Loaded:
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")  # one moment of the log
            floor = _meta(db, "log_floor")
            snapshots = [(n, bytes(b)) for n, b in db.execute("SELECT name, snapshot FROM pipemon_pipelines")]
            records = [(s, bytes(r)) for s, r in db.execute("SELECT seq, record FROM pipemon_log ORDER BY seq")]
            return Loaded(snapshots, records, floor)

        return self._run(load)

    # ---- the log -----------------------------------------------------------------------------------

    def append(self, row: bytes, after: int) -> tuple[int, list[Row]]:
        def write(db: psycopg.Connection) -> tuple[int, list[Row]]:
            # The head's row lock orders the writers (and the truncation); held to the commit.
            seq = db.execute("UPDATE pipemon_meta SET value = value + 1 WHERE key = 'log_head'"
                             " RETURNING value").fetchone()[0]
            if after < _meta(db, "log_floor"):
                raise LogGap(f"the log was truncated past position {after}")
            earlier = _rows(db, "SELECT seq, record FROM pipemon_log WHERE seq > %s AND seq < %s ORDER BY seq",
                            (after, seq))
            db.execute("INSERT INTO pipemon_log (seq, record) VALUES (%s, %s)", (seq, row))
            db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))
            return seq, earlier

        return self._run(write)

    def read_since(self, after: int) -> list[Row]:
        def read(db: psycopg.Connection) -> list[Row]:
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if after < _meta(db, "log_floor"):
                raise LogGap(f"the log was truncated past position {after}")
            return _rows(db, "SELECT seq, record FROM pipemon_log WHERE seq > %s ORDER BY seq", (after,))

        return self._run(read)

    def truncate_log(self, upto: int) -> None:
        def truncate(db: psycopg.Connection) -> None:
            db.execute("SELECT 1 FROM pipemon_meta WHERE key = 'log_head' FOR UPDATE")  # no append meanwhile
            db.execute("DELETE FROM pipemon_log WHERE seq <= %s", (upto,))
            db.execute("UPDATE pipemon_meta SET value = greatest(value, %s) WHERE key = 'log_floor'", (upto,))

        self._run(truncate)

    # ---- checkpoints -------------------------------------------------------------------------------

    def write_snapshots(self, snapshots: list[tuple[str, int, bytes]]) -> None:
        def write(db: psycopg.Connection) -> None:
            with db.cursor() as cur:
                cur.executemany("INSERT INTO pipemon_pipelines (name, covers, snapshot) VALUES (%s, %s, %s)"
                                " ON CONFLICT (name) DO UPDATE SET covers = excluded.covers,"
                                " snapshot = excluded.snapshot WHERE pipemon_pipelines.covers <= excluded.covers",
                                snapshots)

        self._run(write)

    def delete_pipelines(self, names: list[str], upto: int) -> None:
        if names:
            self._run(lambda db: db.execute("DELETE FROM pipemon_pipelines WHERE name = ANY(%s) AND covers <= %s",
                                            (names, upto)))

    def try_lead(self) -> bool:
        """Hold the session advisory lock of the once-across-replicas jobs; a replica that dies (or loses its
        connection) releases it, and another one takes it at its next try."""
        try:
            db = self._connect()
            if self._leading:
                db.execute("SELECT 1")  # the session is alive, so it still holds the lock
            else:
                self._leading = bool(db.execute("SELECT pg_try_advisory_lock(%s)", (LEAD_LOCK,)).fetchone()[0])
            return self._leading
        except psycopg.Error as exc:
            log.warning("PostgreSQL: cannot check the leader lock: %s", exc)
            self._drop()
            return False

    # ---- notifications -----------------------------------------------------------------------------

    def watch(self, wake: Callable[[int], None]) -> None:
        self._watcher = threading.Thread(target=self._listen, args=(wake,), name="pipemon-listen", daemon=True)
        self._watcher.start()

    def _listen(self, wake: Callable[[int], None]) -> None:
        """LISTEN on its own connection; reconnects after trouble (the recorder also polls, so a notification
        lost meanwhile only delays a catch-up)."""
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, **CONNECT_OPTIONS) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    wake(0)  # whatever was missed while not listening
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            wake(int(note.payload) if note.payload.isdigit() else 0)
            except psycopg.Error as exc:
                log.debug("PostgreSQL LISTEN connection lost: %s", exc)
                self._stop.wait(1.0)


def _meta(db: psycopg.Connection, key: str) -> int:
    return db.execute("SELECT value FROM pipemon_meta WHERE key = %s", (key,)).fetchone()[0]


def _rows(db: psycopg.Connection, query: str, params: tuple) -> list[Row]:
    return [(seq, bytes(record)) for seq, record in db.execute(query, params)]
