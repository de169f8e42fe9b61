"""The fleet of bench/prometheus_cost.py and its day of history.

A fleet of N pipelines (five teams, schedules from 5 minutes to a day, a few flaky ones) is registered with
globs. Every pipeline's runs over the history window are sent to the exporter, so its counters end exactly
where the backfilled history ends; the history itself is written as OpenMetrics, one file per 2-hour TSDB
block (promtool re-reads its whole input once per block it writes: one file per block keeps that linear),
and turned into blocks by `promtool tsdb create-blocks-from openmetrics`.
"""

from __future__ import annotations

import random
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

TEAMS = ("data-eng", "analytics", "ml-platform", "finance", "growth")
# (label, period in seconds) by pipeline number modulo 10: 10% every 5 min, 20% every 15 min, 40% hourly,
# 30% daily (about 58 runs per pipeline and day).
SCHEDULES = (("5m", 300),) + (("15m", 900),) * 2 + (("1h", 3600),) * 4 + (("1d", 86400),) * 3
BLOCK = 7200  # seconds: Prometheus's block range, which promtool writes


@dataclass
class Pipeline:
    number: int
    name: str
    team: str
    period: int
    failure_rate: float
    base_duration: float
    phase: float  # seconds after a period boundary at which its runs finish
    runs: list[tuple[float, bool]] = field(default_factory=list)  # (finished at, success), in order

    def event(self, finished: float, success: bool, rng: random.Random) -> dict:
        duration = self.base_duration * rng.uniform(0.9, 1.1)
        return {"pipeline": self.name, "run_id": f"r{int(finished)}", "status": "success" if success else "failure",
                "duration_seconds": round(duration, 2), "finished_at": _rfc3339(finished),
                "records_processed": int(1000 + 50 * self.number % 997 * duration)}


def _rfc3339(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()


def fleet(n: int) -> list[Pipeline]:
    pipelines = []
    for i in range(n):
        label, period = SCHEDULES[i % 10]
        team = TEAMS[(i // 10) % len(TEAMS)]
        rng = random.Random(i)
        pipelines.append(Pipeline(i, f"pc_{team}_{label}_{i:05d}", team, period,
                                  0.4 if i % 20 == 7 else 0.03,  # one pipeline in 20 is flaky
                                  min(period * 0.3, 20.0 + (i % 50) * 12), rng.uniform(0, period)))
    return pipelines


def registry_yaml() -> str:
    """Teams and one glob per team and schedule; hourly finance pipelines carry threshold overrides, so
    pipeline_alert_threshold and the rules' override paths have series."""
    lines = ["unknown_pipelines: reject", "teams:"]
    lines += [f"  {team}: {{slack_channel: '#{team}'}}" for team in TEAMS]
    lines.append("pipelines:")
    for team in TEAMS:
        for label, period in dict(SCHEDULES).items():
            lines.append(f"  - {{match: 'pc_{team}_{label}_*', team: {team}, expected_interval: {period * 2},"
                         f" max_runtime: {min(period, 7200)}, tier: {'gold' if period <= 300 else 'standard'}"
                         + (", thresholds: {success_ratio_high: 0.7, min_runs: 3}" if (team, label) ==
                            ("finance", "1h") else "") + "}")
    return "\n".join(lines) + "\n"


def schedule_runs(pipelines: list[Pipeline], start: float, end: float) -> None:
    """Each pipeline's runs finishing in [start, end), appended to its `runs`."""
    for p in pipelines:
        rng = random.Random(p.number * 7919 + int(start))
        first = (start - p.phase) // p.period + 1
        t = first * p.period + p.phase
        while t < end:
            if t >= start:
                p.runs.append((t, rng.random() >= p.failure_rate))
            t += p.period


def fill_batches(pipelines: list[Pipeline], since: float, batch: int = 2000) -> Iterator[bytes]:
    """NDJSON bodies of every run finished since `since`; a pipeline's runs stay in one body, in order, so
    bodies may be sent concurrently."""
    import json

    lines: list[str] = []
    for p in pipelines:
        rng = random.Random(p.number)
        lines.extend(json.dumps(p.event(t, ok, rng)) for t, ok in p.runs if t >= since)
        if len(lines) >= batch:
            yield "\n".join(lines).encode()
            lines = []
    if lines:
        yield "\n".join(lines).encode()


def send_all(post: callable, bodies: Iterator[bytes], connections: int = 4) -> int:
    """POST every body (NDJSON); the number of runs accepted."""
    with ThreadPoolExecutor(connections) as pool:
        return sum(pool.map(post, bodies))


# ---- the live exposition, the history to generate -----------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")


@dataclass
class Series:
    name: str
    labels: str  # the exporter's label pairs without braces
    value: float  # at the end of the history
    counter: bool
    pipeline: str | None
    status: str | None


def live_series(body: str, families: set[str]) -> list[Series]:
    """The series of `families` in a text-format /metrics body. A histogram family stands for its _bucket,
    _count and _sum series; its counters and `counter` families' are cumulative, the rest gauges."""
    kinds = dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, re.M))
    wanted: dict[str, bool] = {}
    for family, kind in kinds.items():
        names = [family + s for s in ("_bucket", "_count", "_sum")] if kind == "histogram" else [family]
        for name in names:
            if name in families or family in families:
                wanted[name] = kind in ("counter", "histogram")
    out = []
    for line in body.splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) not in wanted:
            continue
        labels = (match.group(2) or "{}")[1:-1]
        pipeline = re.search(r'pipeline="((?:[^"\\]|\\.)*)"', labels)
        status = re.search(r'status="([^"]*)"', labels)
        out.append(Series(match.group(1), labels, float(match.group(3)), wanted[match.group(1)],
                          pipeline.group(1) if pipeline else None, status.group(1) if status else None))
    return out


def _cumulative(series: Series, runs: list[tuple[float, bool]], times: list[float]) -> list[float]:
    """A counter's value at each time: exact for runs by status, else the end value scaled by the share of
    the pipeline's runs finished by then (counters of everything a run adds: records, histogram)."""
    relevant = [t for t, ok in runs if series.status is None or ok == (series.status == "success")]
    if not relevant:
        return [series.value] * len(times)
    values, done = [], 0
    for t in times:
        while done < len(relevant) and relevant[done] <= t:
            done += 1
        if series.status is not None:
            values.append(float(series.value - (len(relevant) - done)))
        else:
            values.append(series.value * done / len(relevant))
    return values


def write_history(series: list[Series], pipelines: list[Pipeline], start: float, end: float, step: float,
                  extra_labels: str, directory: Path) -> list[Path]:
    """OpenMetrics files, one per 2-hour block, sampling every series every `step` seconds in [start, end).
    Gauges hold their end value throughout (the rules read only counters over long windows today)."""
    runs = {p.name: p.runs for p in pipelines}
    times = [start + k * step for k in range(int((end - start) // step)) if start + k * step < end - 1]
    by_block: dict[int, list[int]] = {}
    for index, t in enumerate(times):
        by_block.setdefault(int(t // BLOCK), []).append(index)
    handles = {b: open(directory / f"history-{b}.om", "w") for b in by_block}  # noqa: SIM115
    try:
        for name in sorted({s.name for s in series}):
            for h in handles.values():
                h.write(f"# TYPE {name} gauge\n")
            for s in (s for s in series if s.name == name):
                values = _cumulative(s, runs.get(s.pipeline, []), times) if s.counter else [s.value] * len(times)
                prefix = f"{s.name}{{{s.labels},{extra_labels}}} " if s.labels else f"{s.name}{{{extra_labels}}} "
                for block, indexes in by_block.items():
                    handles[block].write("".join(f"{prefix}{_fmt(values[i])} {times[i]:.3f}\n" for i in indexes))
        for h in handles.values():
            h.write("# EOF\n")
    finally:
        for h in handles.values():
            h.close()
    return [directory / f"history-{b}.om" for b in sorted(by_block)]


def _fmt(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def create_blocks(files: list[Path], data_dir: Path, promtool: str = "promtool") -> None:
    """One block per file (the files are removed once converted: a day for 20,000 pipelines is gigabytes)."""
    for path in files:
        subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "--quiet", str(path), str(data_dir)],
                       check=True, capture_output=True)
        path.unlink()
