"""Report pipeline runs to pipemon from Python; standard library only.

    with pipemon.track("orders_daily") as run:
        run.records = load()

    @pipemon.tracked("orders_daily")
    def main(): ...

A run reports its start and its finish (success, or failure when the block raises; the exception is re-raised)
to the native API with a stable run id. Monitoring never breaks the pipeline: nothing here raises into the
caller. Events the exporter cannot take now (connection error, timeout, 5xx, after a few retries with
exponential backoff) are appended to a local spool file and sent, oldest first, before the next report of any
pipeline using the same spool. Delivery is at least once; the exporter's idempotency on (pipeline, run_id) makes
it count once. An event the exporter rejects (4xx) is logged and dropped: sending it again would not help.

Several exporter URLs (replicas over one PostgreSQL: `url=[...]`, or comma-separated in PIPEMON_URL) make the
client fail over: an exporter that does not answer (or answers 5xx) is passed over for the next one, and the
next report starts with the one that last answered; only when none of them takes the event is it spooled. An
event that reached a replica which then died is sent again to another: the database counts it once.

Environment: PIPEMON_URL (default http://127.0.0.1:9464; several: comma-separated), PIPEMON_TOKEN (bearer
token), PIPEMON_SPOOL (default ~/.cache/pipemon/spool.ndjson), PIPEMON_RUN_ID (the id of this attempt; see
`new_run_id`).
"""

from __future__ import annotations

import contextvars
import fcntl
import functools
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger("pipemon.client")
DEFAULT_URL = "http://127.0.0.1:9464"
DEFAULT_SPOOL = "~/.cache/pipemon/spool.ndjson"
START_PATH = "/api/v1/runs/start"
FINISH_PATH = "/api/v1/runs"
SPOOL_BATCH = 500  # events per request when flushing the spool
Entry = tuple[str, dict[str, Any]]  # (API path, event)
P = ParamSpec("P")
R = TypeVar("R")


class Unreachable(Exception):
    """The exporter cannot take events right now: worth retrying later."""


class Rejected(Exception):
    """The exporter refused the request (4xx): sending it again would not help."""


def new_run_id() -> str:
    """PIPEMON_RUN_ID when set, else a random id. The variable is for an outer scheduler that names each attempt
    (e.g. `$DAG_RUN_ID-$TRY`): it must differ between attempts, or a retry's outcome would be a duplicate."""
    return os.environ.get("PIPEMON_RUN_ID") or uuid.uuid4().hex


@dataclass
class Run:
    """One run being tracked; set `records` (rows processed) before it ends."""

    pipeline: str
    run_id: str = field(default_factory=new_run_id)
    team: str | None = None
    records: int | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_monotonic: float = field(default_factory=time.monotonic)
    ended: tuple[datetime, float] | None = None  # wall clock and monotonic time of the end, once it ended

    def end(self) -> None:
        """Stamp the end of the run (the finish event uses it; default: when the event is made)."""
        self.ended = (datetime.now(UTC), time.monotonic())

    def start_event(self) -> dict[str, Any]:
        return _without_none({"pipeline": self.pipeline, "run_id": self.run_id,
                              "started_at": self.started_at.isoformat(), "team": self.team})

    def finish_event(self, success: bool) -> dict[str, Any]:
        finished_at, finished_monotonic = self.ended or (datetime.now(UTC), time.monotonic())
        return _without_none({
            "pipeline": self.pipeline, "run_id": self.run_id, "status": "success" if success else "failure",
            "started_at": self.started_at.isoformat(), "finished_at": finished_at.isoformat(),
            "duration_seconds": max(0.0, finished_monotonic - self.started_monotonic),
            "records_processed": _valid_records(self.records), "team": self.team,
        })


def _valid_records(records: object) -> int | None:
    if records is None or (isinstance(records, int) and not isinstance(records, bool) and records >= 0):
        return records  # type: ignore[return-value]
    log.warning("pipemon: ignoring records=%r (expected a non-negative int)", records)
    return None


def _without_none(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if v is not None}


# ---- the spool ---------------------------------------------------------------------------------------


class Spool:
    """Undelivered events, one JSON line each: {"path": ..., "event": {...}}. An exclusive flock on the file
    serialises appends and flushes across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def has_events(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def append(self, path: str, event: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(_line(path, event))

    def drain(self, send: Callable[[list[Entry]], list[Entry]]) -> None:
        """Pass the spooled events to `send` and keep only those it returns. Skipped while another process
        drains: the lock is held until the file is rewritten, so no event is sent twice concurrently."""
        if not self.has_events():
            return
        with open(self.path, "r+", encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            left = send(_parse_lines(f.read().splitlines()))
            f.seek(0)
            f.truncate()
            f.writelines(_line(path, event) for path, event in left)


def _line(path: str, event: dict[str, Any]) -> str:
    return json.dumps({"path": path, "event": event}, separators=(",", ":")) + "\n"


def _parse_lines(lines: list[str]) -> list[Entry]:
    entries: list[Entry] = []
    for line in lines:
        try:
            item = json.loads(line)
            entries.append((str(item["path"]), dict(item["event"])))
        except (ValueError, KeyError, TypeError):
            log.warning("pipemon: skipping an unreadable spool line: %.80s", line)
    return entries


# ---- sending -----------------------------------------------------------------------------------------


def exporter_urls(url: str | Sequence[str] | None) -> list[str]:
    """The exporter URLs to try in turn: given (a list, or comma-separated), else PIPEMON_URL, else the default."""
    given = url if url else os.environ.get("PIPEMON_URL") or DEFAULT_URL
    parts = given.split(",") if isinstance(given, str) else [p for item in given for p in item.split(",")]
    urls = [part.strip().rstrip("/") for part in parts if part.strip()]
    return urls or [DEFAULT_URL]


class Reporter:
    """Sends run events to an exporter, failing over between several; spools what none of them takes.
    `report` never raises."""

    def __init__(self, url: str | Sequence[str] | None = None, token: str | None = None,
                 spool: str | Path | None = None, timeout: float = 3.0, retries: int = 3,
                 backoff: float = 0.5) -> None:
        self.urls = exporter_urls(url)
        self._current = 0  # the exporter that answered last: tried first
        self.token = token if token is not None else os.environ.get("PIPEMON_TOKEN")
        self.spool = Spool(Path(spool or os.environ.get("PIPEMON_SPOOL") or DEFAULT_SPOOL).expanduser())
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff = backoff

    def start(self, run: Run) -> None:
        self.report(START_PATH, run.start_event())

    def finish(self, run: Run, success: bool) -> None:
        self.report(FINISH_PATH, run.finish_event(success))

    def report(self, path: str, event: dict[str, Any]) -> None:
        """Send spooled events, then this one (with retries); spool it when the exporter is unreachable."""
        try:
            self.flush()
            self._send_with_retries(path, event)
        except Unreachable as exc:
            log.warning("pipemon unreachable (%s): %s of %s spooled to %s", exc, path, event.get("run_id"),
                        self.spool.path)
            self._spool(path, event)
        except Rejected as exc:
            log.warning("pipemon rejected %s of run %s: %s", path, event.get("run_id"), exc)
        except Exception:  # a bug here must not fail the pipeline either
            log.exception("pipemon: reporting %s failed", path)

    def flush(self) -> None:
        """Send the spooled events as NDJSON batches, then keep only the undelivered ones."""
        try:
            self.spool.drain(self._send_spooled)
        except Exception as exc:  # an unreadable spool must not keep the new event from being sent
            log.warning("pipemon: cannot send the spool %s: %r", self.spool.path, exc)

    def _spool(self, path: str, event: dict[str, Any]) -> None:
        try:
            self.spool.append(path, event)
        except OSError as exc:
            log.error("pipemon: cannot spool to %s (%s); event lost: %s", self.spool.path, exc, event)

    def _send_with_retries(self, path: str, event: dict[str, Any]) -> None:
        for attempt in range(self.retries):
            try:
                self._post(path, json.dumps(event).encode(), "application/json")
                return
            except Unreachable:
                if attempt == self.retries - 1:
                    raise
                time.sleep(self.backoff * 2**attempt)

    def _send_spooled(self, entries: list[Entry]) -> list[Entry]:
        """Send spooled events once each; returns those to keep. A start whose finish is spooled too is dropped:
        the finish carries everything."""
        finished = {(e.get("pipeline"), e.get("run_id")) for p, e in entries if p == FINISH_PATH}
        entries = [(p, e) for p, e in entries
                   if p == FINISH_PATH or (e.get("pipeline"), e.get("run_id")) not in finished]
        left: list[Entry] = []
        for path in (START_PATH, FINISH_PATH):
            events = [e for p, e in entries if p == path]
            for i in range(0, len(events), SPOOL_BATCH):
                batch = events[i:i + SPOOL_BATCH]
                if left:  # the exporter went away meanwhile: keep the rest for next time
                    left.extend((path, e) for e in batch)
                    continue
                try:
                    self._log_rejections(path, self._post(path, _ndjson(batch), "application/x-ndjson"))
                except Unreachable:
                    left.extend((path, e) for e in batch)
                except Rejected as exc:
                    log.warning("pipemon rejected %d spooled events: %s", len(batch), exc)
        if entries:
            log.info("pipemon: %d spooled events sent, %d kept", len(entries) - len(left), len(left))
        return left

    @staticmethod
    def _log_rejections(path: str, answer: dict[str, Any]) -> None:
        for result in answer.get("results", []):
            if result.get("status") == "rejected":
                log.warning("pipemon rejected a spooled event of %s: %s", path, result.get("error"))

    @property
    def url(self) -> str:
        """The exporter tried first."""
        return self.urls[self._current]

    def _post(self, path: str, body: bytes, content_type: str) -> dict[str, Any]:
        """POST to the exporters in turn from the current one; Unreachable only when none of them answers."""
        failures: list[str] = []
        for step in range(len(self.urls)):
            index = (self._current + step) % len(self.urls)
            try:
                answer = self._post_to(self.urls[index], path, body, content_type)
            except Unreachable as exc:
                failures.append(f"{self.urls[index]}: {exc}")
                continue
            if index != self._current:
                log.warning("pipemon: failed over to %s (%s)", self.urls[index], "; ".join(failures))
                self._current = index
            return answer
        raise Unreachable("; ".join(failures))

    def _post_to(self, base: str, path: str, body: bytes, content_type: str) -> dict[str, Any]:
        headers = {"Content-Type": content_type}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(base + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            if exc.code >= 500:
                raise Unreachable(f"HTTP {exc.code}: {detail}") from exc
            raise Rejected(f"HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, DNS, timeout, garbled answer
            raise Unreachable(str(getattr(exc, "reason", exc))) from exc


def _ndjson(events: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


# ---- the public API ----------------------------------------------------------------------------------

_current: contextvars.ContextVar[Run | None] = contextvars.ContextVar("pipemon_run", default=None)


def current_run() -> Run | None:
    """The run tracked by the innermost `track` block or `tracked` function, if any."""
    return _current.get()


class track:  # lower case: used like a function, `with pipemon.track(...) as run`
    """Track one run of `pipeline`: reports the start on entry and the finish on exit (failure if the block
    raises; the exception propagates). `run_id` defaults to `new_run_id()`."""

    def __init__(self, pipeline: str, *, team: str | None = None, run_id: str | None = None,
                 reporter: Reporter | None = None) -> None:
        self.run = Run(pipeline, run_id or new_run_id(), team)
        self.reporter = reporter or Reporter()
        self._token: contextvars.Token[Run | None] | None = None

    def __enter__(self) -> Run:
        self.run.started_at, self.run.started_monotonic = datetime.now(UTC), time.monotonic()
        self._token = _current.set(self.run)
        _never_raise(self.reporter.start, self.run)
        return self.run

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.run.end()
        if self._token is not None:
            _current.reset(self._token)
        success = exc_type is None or (isinstance(exc, SystemExit) and exc.code in (0, None))
        _never_raise(self.reporter.finish, self.run, success)


def _never_raise(fn: Callable[..., None], *args: object) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("pipemon: reporting failed")


def tracked(pipeline: str, *, team: str | None = None, reporter: Reporter | None = None
            ) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: each call of the function is one run (a new run id per call; see `new_run_id`).
    Set the records with `pipemon.current_run().records = n`."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with track(pipeline, team=team, reporter=reporter):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
