"""The recent-runs ring: the last N runs of one pipeline (any outcome), for people to look at.

Compact on purpose, since every pipeline holds one: five doubles per run in one array plus the run id
(a reference to the same string the dedup window holds), about 50 bytes a run.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

RECENT_RUNS = 50  # runs kept per pipeline (--recent-runs)
FIELDS = 5  # status, started, finished, duration, records
SUCCESS, FAILURE, ABANDONED = 0.0, 1.0, 2.0
STATUS_NAMES = {SUCCESS: "success", FAILURE: "failure", ABANDONED: "abandoned"}
NAN = math.nan


@dataclass(frozen=True, slots=True)
class Run:
    """One run of the ring; NaN: not known (a finish without START has no start)."""

    run_id: str
    status: str
    started: float
    finished: float
    duration: float
    records: float

    @property
    def throughput(self) -> float:
        if math.isnan(self.records) or math.isnan(self.duration):
            return NAN
        if self.duration > 0:
            return self.records / self.duration
        return 0.0 if self.records == 0 else NAN

    def as_json(self) -> dict[str, object]:
        def known(value: float) -> float | None:
            return None if math.isnan(value) or math.isinf(value) else value

        return {"run_id": self.run_id, "status": self.status, "started_timestamp": known(self.started),
                "finished_timestamp": known(self.finished), "duration_seconds": known(self.duration),
                "records": known(self.records), "throughput_records_per_second": known(self.throughput)}


class RecentRuns:
    """The last `capacity` runs in the order they were recorded, oldest first."""

    __slots__ = ("capacity", "ids", "values")

    def __init__(self, capacity: int = RECENT_RUNS) -> None:
        self.capacity = capacity
        self.values = array("d")
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, run_id: str, status: float, started: float, finished: float, duration: float,
            records: float) -> None:
        if self.capacity <= 0:
            return
        self.ids.append(run_id)
        self.values.extend((status, started, finished, duration, records))
        if len(self.ids) > self.capacity:  # a memmove of 2 KB: cheaper than a ring's bookkeeping here
            del self.ids[0]
            del self.values[:FIELDS]

    def drop(self, run_id: str, status: float) -> None:
        """Remove the latest entry of `run_id` with `status` (an abandonment its finish replaces)."""
        for index in range(len(self.ids) - 1, -1, -1):
            if self.ids[index] == run_id and self.values[index * FIELDS] == status:
                del self.ids[index]
                del self.values[index * FIELDS:(index + 1) * FIELDS]
                return

    def __iter__(self) -> Iterator[Run]:
        v = self.values
        for index, run_id in enumerate(self.ids):
            s, started, finished, duration, records = v[index * FIELDS:(index + 1) * FIELDS]
            yield Run(run_id, STATUS_NAMES.get(s, "failure"), started, finished, duration, records)

    def latest_first(self, limit: int | None = None) -> list[Run]:
        runs = list(self)[::-1]
        return runs if limit is None else runs[:limit]

    # ---- persistence (Snapshot.recent_ids / recent_values) -------------------------------------------

    def to_lists(self) -> tuple[list[str], list[float]]:
        return list(self.ids), self.values.tolist()

    @classmethod
    def from_lists(cls, capacity: int, ids: list[str], values: list[float],
                   seen: dict[str, int] | None = None) -> RecentRuns:
        """Restore; a checkpoint whose lists disagree in length (never written so) is dropped, not trusted.
        `seen`, the restored dedup window: the ring's run ids are among its latest keys, and sharing those
        string objects instead of holding decoded copies saves more than half of the ring's memory."""
        ring = cls(capacity)
        if len(values) != FIELDS * len(ids):
            return ring
        keep = min(len(ids), max(capacity, 0))
        start = len(ids) - keep
        ring.values = array("d", values[start * FIELDS:])
        ring.ids = list(ids[start:])
        if seen:
            latest: dict[str, str] = {}
            for run_id in reversed(seen):  # newest last in the window; the ring's ids are near the end
                latest[run_id] = run_id
                if len(latest) >= 2 * len(ring.ids):
                    break
            ring.ids = [latest.get(run_id, run_id) for run_id in ring.ids]
        return ring
