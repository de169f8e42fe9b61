"""The real exporter fed with a simulated history: registry file, `pipemon serve`, events in simulated time order,
and `/metrics` scraped at simulated scrape times into an OpenMetrics file for `promtool tsdb create-blocks-from`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import yaml

from detection.fleet import TEAMS, Fleet, Pipeline, Run
from tests.procs import REPO, free_port, running

# The exporter closes runs in progress by wall-clock time (3 x max_runtime after their start). Simulated starts
# lie days in the past, so every run in progress would be abandoned at the next sweep: this factor turns that
# off. The simulator reports a stuck run's end itself, as a failed finish at 3 x max_runtime (what the
# abandon would have done by the data's own time).
ABANDON_AFTER_FACTOR = "1000000000"
INSTANCE = "pipemon:9464"
TARGET_LABELS = f'job="pipemon",instance="{INSTANCE}"'
SNAPSHOT_EVERY = 240.0  # every sample at least this often: inside Prometheus' 5 min lookback


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def registry_entry(p: Pipeline, schedule_features: bool) -> dict:
    entry: dict = {"match": p.name, "team": p.team, "max_runtime": _duration(p.max_runtime)}
    if p.registration == "schedule" and schedule_features:
        entry["schedule"] = p.cron()
        entry["schedule_grace"] = _duration(p.grace)
    elif p.registration in ("schedule", "interval"):
        entry["expected_interval"] = _duration(p.longest_gap())
    return entry


def write_registry(pipelines: list[Pipeline], path: Path, schedule_features: bool) -> None:
    """The registry of the fleet. `defaults:` names no expected_interval: pipelines registered with neither a
    schedule nor an interval get whatever the exporter does without one (today the built-in 1d)."""
    doc = {
        "unknown_pipelines": "accept",
        "defaults": {"tier": "standard", "max_runtime": "2h"},
        "teams": {team: {"description": f"{team} (simulated)"} for team in TEAMS},
        "pipelines": [registry_entry(p, schedule_features) for p in pipelines],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _env(exporter_src: Path | None) -> dict[str, str] | None:
    """The environment that runs the exporter of `exporter_src` (a `git archive` of exporter/), else the tree's."""
    if exporter_src is None:
        return None
    return os.environ | {"PYTHONPATH": str(exporter_src)}


def exporter_accepts_schedule(work: Path, exporter_src: Path | None = None) -> bool:
    """Whether `pipemon check-config` accepts `schedule:`/`schedule_grace:` (the registry change of issue 11)."""
    sample = work / "schedule-probe.yaml"
    sample.write_text(yaml.safe_dump({
        "teams": {"data-eng": {}},
        "pipelines": [{"match": "probe", "team": "data-eng", "schedule": "0 2 * * *", "schedule_grace": "15m"}],
    }))
    out = subprocess.run([sys.executable, "-m", "pipemon.cli", "check-config", str(sample)], capture_output=True,
                         text=True, cwd=REPO, env=_env(exporter_src))
    return out.returncode == 0


@contextlib.contextmanager
def exporter(work: Path, registry: Path, exporter_src: Path | None = None) -> Iterator[int]:
    """`pipemon serve` on a free port of 127.0.0.1 with a fresh state directory; yields the port."""
    port = free_port()
    cmd = [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{port}", "--registry",
           str(registry), "--state-dir", str(work / "state"), "--abandon-after-factor", ABANDON_AFTER_FACTOR,
           "--log-level", "warning"]
    with running(cmd, f"http://127.0.0.1:{port}/-/ready", work / "exporter.log", env=_env(exporter_src), timeout=30):
        yield port


# ---- events ------------------------------------------------------------------------------------------


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(t * 1000) % 1000:03d}Z"


def start_event(run: Run) -> bytes:
    return (f'{{"pipeline":"{run.pipeline}","run_id":"{run.run_id}","started_at":"{_iso(run.start)}"}}'
            ).encode()


def finish_event(run: Run) -> bytes:
    records = "" if run.records is None else f',"records_processed":{run.records}'
    status = "success" if run.success else "failure"
    return (f'{{"pipeline":"{run.pipeline}","run_id":"{run.run_id}","status":"{status}",'
            f'"started_at":"{_iso(run.start)}","finished_at":"{_iso(run.end)}"{records}}}').encode()


def event_stream(fleet: Fleet) -> list[tuple[float, int, Run]]:
    """(time, 0 start | 1 finish, run), in time order; a start sorts before a finish of the same instant."""
    events = [(r.start, 0, r) for r in fleet.runs] + [(r.end, 1, r) for r in fleet.runs if r.end <= fleet.end]
    events.sort(key=lambda e: (e[0], e[1]))
    return events


@dataclass
class FeedStats:
    sent: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    scrapes: int = 0
    samples: int = 0


class Client:
    """One keep-alive connection to the exporter."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post_ndjson(self, path: str, lines: list[bytes], stats: FeedStats) -> None:
        for i in range(0, len(lines), 5000):
            chunk = lines[i:i + 5000]
            self.conn.request("POST", path, b"\n".join(chunk), {"Content-Type": "application/x-ndjson"})
            resp = self.conn.getresponse()
            body = json.loads(resp.read())
            stats.sent += len(chunk)
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status}: {body}")
            stats.accepted += body["accepted"]
            stats.duplicate += body["duplicate"]
            stats.rejected += body["rejected"]
            for result in body["results"]:
                if result["status"] == "rejected":
                    reason = f"{result['error']['reason']}: {result['error']['message'][:120]}"
                    stats.rejections[reason] = stats.rejections.get(reason, 0) + 1

    def metrics(self) -> bytes:
        self.conn.request("GET", "/metrics")
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"/metrics: HTTP {resp.status}")
        return body


def send_slot(client: Client, events: list[tuple[float, int, Run]], stats: FeedStats) -> None:
    """One slot of simulated time: its starts, then its finishes (the batch endpoints take one kind each)."""
    starts = [start_event(run) for _, kind, run in events if kind == 0]
    finishes = [finish_event(run) for _, kind, run in events if kind == 1]
    if starts:
        client.post_ndjson("/api/v1/runs/start", starts, stats)
    if finishes:
        client.post_ndjson("/api/v1/runs", finishes, stats)


class Scrape:
    """Turns an exposition into the sample lines of the families the rules read, with the target labels
    Prometheus would add. Regex and set operations over the whole body: there are ~20,000 scrapes a run."""

    def __init__(self, names: set[str]) -> None:
        names = names - {"process_start_time_seconds"}  # the real one is wall-clock: the bench writes its own
        alternatives = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
        self.keep = re.compile(rf"^(?:{alternatives})(?:{{| ).*$", re.M)
        self.with_labels = re.compile(r"^([^{ \n]+)\{", re.M)
        self.without_labels = re.compile(r"^([^{ \n]+) ", re.M)

    def lines(self, body: bytes) -> list[str]:
        text = "\n".join(self.keep.findall(body.decode()))
        text = self.with_labels.sub(rf"\1{{{TARGET_LABELS},", text)
        text = self.without_labels.sub(rf"\1{{{TARGET_LABELS}}} ", text)
        return text.split("\n") if text else []


def feed(fleet: Fleet, port: int, record_start: float, scrape_interval: float, names: set[str],
         out: TextIO, dense: bool = False) -> FeedStats:
    """Send every event in simulated time order; from `record_start` on, scrape after each slot of
    `scrape_interval` and write the scrape's samples stamped with the slot's end (the simulated scrape time).

    Unless `dense`, a slot writes only the samples that changed since the previous scrape, and every
    SNAPSHOT_EVERY all of them: an instant selector (5 min lookback) then sees exactly what a scrape every slot
    would give, and rate()/increase() see every change of a counter."""
    stats = FeedStats()
    client = Client(port)
    events = event_stream(fleet)
    i = 0
    warm_slot = 600.0  # before the recorded window nobody scrapes: larger slots, same order
    t = fleet.start
    while t < record_start:
        t_next = min(t + warm_slot, record_start)
        j = _upto(events, i, t_next)
        send_slot(client, events[i:j], stats)
        i, t = j, t_next
    scrape = Scrape(names)
    extra = [f'up{{{TARGET_LABELS}}} 1', f"process_start_time_seconds{{{TARGET_LABELS}}} {fleet.start:.0f}"]
    current: list[str] = []
    previous: set[str] = set()
    last_snapshot = -math.inf
    while t <= fleet.end:
        j = _upto(events, i, t)
        fresh: list[str] = []
        if j > i or not current:
            send_slot(client, events[i:j], stats)
            current = scrape.lines(client.metrics()) + extra
            stats.scrapes += 1
            now = set(current)
            fresh = list(now - previous)
            previous = now
        if dense or t - last_snapshot >= SNAPSHOT_EVERY:
            fresh, last_snapshot = current, t
        if fresh:
            stamp = f" {t:.0f}\n"
            out.write(stamp.join(fresh) + stamp)
            stats.samples += len(fresh)
        i = j
        t += scrape_interval
    out.write("# EOF\n")
    return stats


def _upto(events: list[tuple[float, int, Run]], i: int, t: float) -> int:
    """The index after the last event at or before `t`, from `i` on."""
    while i < len(events) and events[i][0] <= t:
        i += 1
    return i
