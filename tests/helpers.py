"""Small helpers shared by the exporter tests."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, keyed by (name, labels), parsed with prometheus-client's parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value; KeyError if absent."""
    return samples(text)[(name, frozenset(labels.items()))]


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def run(pipeline: str, run_id: str, status: str = "success", **extra: object) -> dict:
    event = {"pipeline": pipeline, "run_id": run_id, "status": status, "duration_seconds": 10.0}
    event.update(extra)
    return event
