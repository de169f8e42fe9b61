"""Turning request bodies into records: splitting batches, validating items, checking ownership and limits.

Every problem becomes a `Rejection` with an HTTP status, a bounded `reason` (the label of
`pipemon_events_rejected_total`), the offending field and a message. A rejected item never reaches storage.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from pipemon.model.events import BATCH_ITEM_TYPES, InvalidEvent, Record, Start, names_match_pattern
from pipemon.model.registry import UNOWNED_TEAM, Registry
from pipemon.model.state import FINISHED, STARTED, Pipelines
from pipemon.service.auth import Principal

_FIELD_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_FIELD_NAMED = re.compile(r"field `([^`]+)`")
MAX_IN_PROGRESS_PER_PIPELINE = 1000
T = TypeVar("T")


@dataclass(frozen=True)
class Rejection(Exception):
    status: int
    reason: str
    message: str
    field: str | None = None

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"reason": self.reason, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"status": "rejected", "code": self.status, "error": error}


class Ignored(Exception):
    """A valid event pipemon leaves aside on purpose (a child run folded into its root, an unknown pipeline the
    registry ignores): answered 200 `ignored`, counted in pipemon_events_ignored_total{reason}."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def body(self) -> dict[str, Any]:
        return {"status": "ignored", "reason": self.reason}


def split_items(body: bytes, ndjson: bool) -> tuple[list[bytes | msgspec.Raw], bool]:
    """The items of a body and whether it was a batch: one JSON object, a JSON array, or NDJSON lines."""
    if ndjson:
        return [line for line in body.splitlines() if line.strip()], True
    stripped = body.lstrip()
    if stripped.startswith(b"["):
        try:
            return msgspec.json.decode(body, type=list[msgspec.Raw]), True
        except msgspec.DecodeError as exc:  # ValidationError included: it is a DecodeError
            raise Rejection(400, "malformed", f"the body is not a JSON array: {exc}") from exc
    if stripped.startswith(b"{"):
        return [body], False
    raise Rejection(400, "malformed", "expected a JSON object, a JSON array of objects, or NDJSON"
                    " (Content-Type: application/x-ndjson)")


def decode_item(raw: bytes | msgspec.Raw, wire_type: type[T]) -> T:
    try:
        return msgspec.json.decode(raw, type=wire_type)
    except msgspec.ValidationError as exc:
        raise _validation_rejection(str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise Rejection(400, "malformed", f"malformed JSON: {exc}") from exc


def decode_batch(items: list[bytes | msgspec.Raw], wire_type: type[T]) -> list[T] | None:
    """All items decoded in one call, or None when any of them fails (the caller then decodes them one by one
    for per-item errors). One call per batch instead of one per item: the common case is a clean batch."""
    fast_type = BATCH_ITEM_TYPES.get(wire_type)
    try:
        decoded = msgspec.json.decode(b"[" + b",".join(items) + b"]", type=list[fast_type or wire_type])
    except msgspec.DecodeError:  # includes ValidationError
        return None
    # An item holding several values ("{...},{...}") would shift the others: such a batch goes item by item.
    if len(decoded) != len(items) or (fast_type is not None and not names_match_pattern(decoded)):
        return None
    return decoded


def _validation_rejection(message: str) -> Rejection:
    at = _FIELD_AT.search(message)
    named = _FIELD_NAMED.search(message)  # missing or unknown field: named inside the object at `at`
    path = [part for part in (at.group(1) if at else None, named.group(1) if named else None) if part]
    field = ".".join(path) or None
    return Rejection(422, "invalid_field", _FIELD_AT.sub("", message), field)


def to_record(event: T, convert: Callable[[T], Record]) -> Record:
    try:
        return convert(event)
    except InvalidEvent as exc:
        raise Rejection(422, exc.reason, str(exc), exc.field) from exc


class Admission:
    """Decides whether a record may enter: ownership, tokens and the caps. One instance per request."""

    def __init__(self, registry: Registry, pipelines: Pipelines, principal: Principal | None,
                 max_pipelines: int) -> None:
        self.registry = registry
        self.pipelines = pipelines
        self.principal = principal
        self.max_pipelines = max_pipelines
        self._new: set[str] = set()
        self._starts: Counter[str] = Counter()  # starts admitted in this request, per pipeline
        self._teams: dict[tuple[str, str | None], str | Rejection | Ignored] = {}

    def team_of(self, pipeline: str, claimed: str | None) -> str:
        """The owning team of a pipeline, as the registry (or the first event) says; rejects the others.

        Answers are remembered for the request: nothing they depend on changes while one is admitted."""
        key = (pipeline, claimed)
        known = self._teams.get(key)
        if known is None:
            try:
                known = self._team_of(pipeline, claimed)
            except (Rejection, Ignored) as rejection:
                known = rejection
            self._teams[key] = known
        if isinstance(known, Rejection | Ignored):
            raise known
        return known

    def _team_of(self, pipeline: str, claimed: str | None) -> str:
        state = self.pipelines.get(pipeline)
        spec = self.registry.lookup(pipeline)
        if state is not None and (spec is None or not spec.registered):
            team = state.team
        elif spec is not None and spec.registered:
            team = spec.team
        elif spec is None and self.registry.ignores_unknown:
            if claimed is None or claimed not in self.registry.teams:
                raise Ignored("unknown_pipeline")
            team = claimed  # unlisted, but its producer names a team of the registry (an Airflow DAG owner)
        elif spec is None:
            raise Rejection(422, "unknown_pipeline", f"pipeline {pipeline!r} is not in the registry, and the"
                            " registry rejects unknown pipelines", "pipeline")
        else:
            team = claimed or (self.principal.team if self.principal and self.principal.team else UNOWNED_TEAM)
            if team != UNOWNED_TEAM and team not in self.registry.teams:
                raise Rejection(422, "unknown_team", f"team {team!r} is not in the registry", "team")
        if claimed is not None and claimed != team:
            raise Rejection(422, "team_mismatch", f"pipeline {pipeline!r} belongs to team {team!r}, not"
                            f" {claimed!r}", "team")
        if self.principal is not None and not self.principal.may_write(team):
            raise Rejection(403, "forbidden", f"token {self.principal.name!r} may not report pipelines of team"
                            f" {team!r}", "pipeline")
        return team

    def may_fold(self, root_pipeline: str) -> bool:
        """Whether a child run's event may add to its root run: it may write the root's pipeline. Another team's
        root is a 403 rejection of the child's event; a root that is not admitted at all (an unknown pipeline)
        has nothing to fold into."""
        try:
            self.team_of(root_pipeline, None)
        except Rejection as rejection:
            if rejection.status == 403:
                raise
            return False
        except Ignored:
            return False
        return True

    def admit(self, pipeline: str, starting: bool) -> None:
        """Enforce the caps on tracked pipelines and on runs in progress."""
        state = self.pipelines.get(pipeline)
        if state is None and pipeline not in self._new:
            if len(self.pipelines) + len(self._new) >= self.max_pipelines:
                raise Rejection(429, "pipeline_cap", f"pipemon tracks {self.max_pipelines} pipelines already"
                                " (--max-pipelines); forget unused ones or raise the cap", "pipeline")
            self._new.add(pipeline)
        if starting:
            in_progress = len(state.in_progress) if state is not None else 0
            if in_progress + self._starts[pipeline] >= MAX_IN_PROGRESS_PER_PIPELINE:
                raise Rejection(429, "in_progress_cap", f"pipeline {pipeline!r} has {MAX_IN_PROGRESS_PER_PIPELINE}"
                                " runs in progress already", "run_id")
            self._starts[pipeline] += 1

    def is_retry(self, record: Record) -> bool:
        phase = STARTED if isinstance(record, Start) else FINISHED
        return self.pipelines.seen(record.pipeline, record.run_id, phase)
