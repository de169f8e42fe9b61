"""Render `/metrics` from the pipeline state, in the Prometheus text format or OpenMetrics.

Each pipeline's sample lines are rendered once per change and cached as bytes, one block per metric
family, so a scrape where few pipelines changed is mostly a join. The sample lines are the same in both
formats; only the family headers differ (OpenMetrics names counters without `_total` and ends with EOF).
The exporter's own `pipemon_*` metrics come from prometheus-client's exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_exposition
from prometheus_client.openmetrics import exposition as om_exposition

from pipemon.model import state as state_module
from pipemon.model.state import HIGH_CONFIRM_RUNS, JUDGED_RUNS, SUCCESS_WINDOWS, PipelineState, least_unusual

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
RERENDER_CHUNK = 100  # pipelines re-rendered between two yields to the event loop (~5 ms)
SEGMENT = 250  # pipelines per cached segment of the body
JOIN_IN_THREAD = 1 << 20  # bodies at least this large are joined in a thread
GZIP_LEVEL = 1  # about ten times cheaper than 9 on these bodies, and most of the gain
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"  # deflate, no name, no mtime, fastest, any OS
DEFLATE_END = b"\x03\x00"  # an empty final block: ends the concatenated pieces


@dataclass(frozen=True)
class Family:
    name: str
    type: str  # counter, gauge or histogram
    help: str

    def header(self, openmetrics: bool) -> bytes:
        name = self.name.removesuffix("_total") if openmetrics and self.type == "counter" else self.name
        return f"# HELP {name} {self.help}\n# TYPE {name} {self.type}\n".encode()


FAMILIES: tuple[Family, ...] = (
    Family("pipeline_info", "gauge", "Registry facts about a pipeline; always 1."),
    Family("pipeline_expected_interval_seconds", "gauge", "Longest expected gap between successful runs."),
    Family("pipeline_max_runtime_seconds", "gauge", "Longest a run may stay in progress before it is stuck."),
    Family("pipeline_alert_threshold", "gauge", "Per-pipeline alert threshold overrides from the registry."),
    Family("pipeline_runs_total", "counter", "Finished runs, by status; an abandoned run is a failure, also"
           " when its finish replaces the abandonment later (see pipeline_runs_abandonment_reverted_total)."),
    Family("pipeline_runs_abandonment_reverted_total", "counter", "Abandoned runs whose finish arrived after"
           " all and replaced the abandonment: their failure stays in pipeline_runs_total, their finish counts"
           " too."),
    Family("pipeline_run_duration_seconds", "histogram", "Duration of finished runs."),
    Family("pipeline_records_processed_total", "counter", "Records processed by finished runs."),
    Family("pipeline_last_run_timestamp_seconds", "gauge", "When the latest run finished; 0 if never."),
    Family("pipeline_last_success_timestamp_seconds", "gauge", "When the latest successful run finished; 0 if"
           " never."),
    Family("pipeline_last_run_success", "gauge", "1 if the latest run succeeded, else 0."),
    Family("pipeline_last_run_duration_seconds", "gauge", "Duration of the latest run; NaN if unknown."),
    Family("pipeline_last_run_records", "gauge", "Records processed by the latest run; NaN if not reported."),
    Family("pipeline_consecutive_failures", "gauge", "Failed runs since the last success."),
    Family("pipeline_runs_in_progress", "gauge", "Runs started and not finished."),
    Family("pipeline_oldest_run_start_timestamp_seconds", "gauge", "Start of the oldest run in progress; 0 if"
           " none."),
    Family("pipeline_oldest_run_baseline_seconds", "gauge", "Median duration of the runs the oldest run in"
           " progress will be judged against (its seasonal slot); NaN if none."),
    Family("pipeline_oldest_run_baseline_spread", "gauge", "Log-space σ of that baseline: its age's z-score is"
           " ln(age / baseline) / spread; NaN if none."),
    Family("pipeline_last_failure_timestamp_seconds", "gauge", "When the latest failed run finished; 0 if"
           " never."),
    Family("pipeline_next_run_due_timestamp_seconds", "gauge", "When the next run is due: the schedule's next"
           " fire after the latest start, else the latest start plus the expected interval."),
    Family("pipeline_schedule_grace_seconds", "gauge", "How late a scheduled run may show up; only for"
           " pipelines with a schedule."),
    Family("pipeline_recent_runs_success_ratio", "gauge", "Share of successes among the latest `runs` runs"
           " (fewer if fewer ran)."),
    # Each successful run is judged against the runs before it; these give the least unusual of the latest
    # `runs` judged runs, so that "each of the latest k runs was slow" is one series compared with a threshold.
    Family("pipeline_recent_runs_min_duration_zscore", "gauge", "Lowest robust log-space z-score of the"
           " durations of the latest `runs` successful runs, each against the runs before it."),
    Family("pipeline_recent_runs_min_duration_ratio", "gauge", "Lowest duration over its baseline's median"
           " among the latest `runs` successful runs."),
    Family("pipeline_recent_runs_max_records_zscore", "gauge", "Highest robust log-space z-score of the"
           " records of the latest `runs` successful runs, each against the runs before it."),
    Family("pipeline_recent_runs_max_records_ratio", "gauge", "Highest records over its baseline's median"
           " among the latest `runs` successful runs."),
    Family("pipeline_recent_runs_max_throughput_ratio", "gauge", "Highest records per second over the"
           " baseline's (records ratio over duration ratio) among the latest `runs` successful runs."),
    Family("pipeline_recent_runs_max_throughput_zscore", "gauge", "Highest robust log-space z-score of the"
           " records per second of the latest `runs` successful runs, each against the runs before it."),
    Family("pipeline_duration_baseline_seconds", "gauge", "Median duration the latest successful run was"
           " judged against (of its seasonal slot)."),
    Family("pipeline_records_baseline", "gauge", "Median records the latest successful run was judged"
           " against."),
    Family("pipeline_baseline_samples", "gauge", "Runs in the latest successful run's duration baseline."),
)


@functools.lru_cache(maxsize=4)
def _bucket_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*(f"{float(b)!r}" for b in bounds), "+Inf")


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _recent_runs(metric: str, labels: str, values: list[float], runs: int, lowest: bool) -> str:
    """One sample per k in 1..runs: the least unusual figure of the latest k runs (`values`: latest first)."""
    return "".join(f'{metric}{{{labels},runs="{k}"}} {format_value(least_unusual(values[:k], lowest))}\n'
                   for k in range(1, runs + 1))


def pipeline_blocks(state: PipelineState) -> tuple[bytes, ...]:
    """The sample lines of one pipeline, one block per family in FAMILIES order."""
    labels = f'pipeline="{escape_label_value(state.name)}",team="{escape_label_value(state.team)}"'
    spec, v = state.spec, format_value
    thresholds = "".join(
        f'pipeline_alert_threshold{{{labels},threshold="{name}"}} {v(value)}\n'
        for name, value in spec.thresholds.items()
    )
    cumulative, buckets = 0, []
    for le, count in zip(_bucket_labels(state_module.DURATION_BUCKETS), state.bucket_counts, strict=True):
        cumulative += count
        buckets.append(f'pipeline_run_duration_seconds_bucket{{{labels},le="{le}"}} {cumulative}\n')
    histogram = "".join(buckets) + (
        f"pipeline_run_duration_seconds_sum{{{labels}}} {v(state.duration_sum)}\n"
        f"pipeline_run_duration_seconds_count{{{labels}}} {state.duration_count}\n"
    )
    judged = state.judgements()
    latest = judged.duration[0]
    running = state.running_baseline()
    grace = (f"pipeline_schedule_grace_seconds{{{labels}}} {v(spec.schedule_grace_seconds)}\n"
             if spec.schedule else "")
    blocks = (
        f'pipeline_info{{{labels},tier="{escape_label_value(spec.tier)}"}} 1\n',
        f"pipeline_expected_interval_seconds{{{labels}}} {v(state.expected_interval())}\n",
        f"pipeline_max_runtime_seconds{{{labels}}} {v(spec.max_runtime_seconds)}\n",
        thresholds,
        f'pipeline_runs_total{{{labels},status="success"}} {state.runs_success}\n'
        f'pipeline_runs_total{{{labels},status="failure"}} {state.runs_failure + state.runs_reverted}\n',
        f"pipeline_runs_abandonment_reverted_total{{{labels}}} {state.runs_reverted}\n",
        histogram,
        f"pipeline_records_processed_total{{{labels}}} {state.records_total}\n",
        f"pipeline_last_run_timestamp_seconds{{{labels}}} {v(state.last_run_ts)}\n",
        f"pipeline_last_success_timestamp_seconds{{{labels}}} {v(state.last_success_ts)}\n",
        f"pipeline_last_run_success{{{labels}}} {int(state.last_run_success)}\n",
        f"pipeline_last_run_duration_seconds{{{labels}}} {v(state.last_run_duration)}\n",
        f"pipeline_last_run_records{{{labels}}} {v(state.last_run_records)}\n",
        f"pipeline_consecutive_failures{{{labels}}} {state.consecutive_failures}\n",
        f"pipeline_runs_in_progress{{{labels}}} {len(state.in_progress)}\n",
        f"pipeline_oldest_run_start_timestamp_seconds{{{labels}}} {v(state.oldest_start())}\n",
        f"pipeline_oldest_run_baseline_seconds{{{labels}}} {v(running.expected)}\n",
        f"pipeline_oldest_run_baseline_spread{{{labels}}} {v(running.spread)}\n",
        f"pipeline_last_failure_timestamp_seconds{{{labels}}} {v(state.last_failure_ts)}\n",
        f"pipeline_next_run_due_timestamp_seconds{{{labels}}} {v(state.next_run_due())}\n",
        grace,
        "".join(f'pipeline_recent_runs_success_ratio{{{labels},runs="{n}"}} {v(state.success_ratio(n))}\n'
                for n in SUCCESS_WINDOWS),
        _recent_runs("pipeline_recent_runs_min_duration_zscore", labels, [j.zscore for j in judged.duration],
                     JUDGED_RUNS, lowest=True),
        _recent_runs("pipeline_recent_runs_min_duration_ratio", labels, [j.ratio for j in judged.duration],
                     JUDGED_RUNS, lowest=True),
        _recent_runs("pipeline_recent_runs_max_records_zscore", labels, [j.zscore for j in judged.records],
                     HIGH_CONFIRM_RUNS, lowest=False),
        _recent_runs("pipeline_recent_runs_max_records_ratio", labels, [j.ratio for j in judged.records],
                     HIGH_CONFIRM_RUNS, lowest=False),
        _recent_runs("pipeline_recent_runs_max_throughput_ratio", labels, judged.throughput_ratios(),
                     HIGH_CONFIRM_RUNS, lowest=False),
        _recent_runs("pipeline_recent_runs_max_throughput_zscore", labels, [j.zscore for j in judged.throughput],
                     HIGH_CONFIRM_RUNS, lowest=False),
        f"pipeline_duration_baseline_seconds{{{labels}}} {v(latest.expected)}\n",
        f"pipeline_records_baseline{{{labels}}} {v(judged.records[0].expected)}\n",
        f"pipeline_baseline_samples{{{labels}}} {latest.samples}\n",
    )
    return tuple(block.encode() for block in blocks)


def deflate_piece(data: bytes) -> bytes:
    """Raw deflate of `data`, flushed to a byte boundary and not final. Pieces compressed separately
    concatenate into one valid deflate stream (no piece refers back into another)."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


def gzip_from_pieces(raw: list[bytes], pieces: list[bytes]) -> bytes:
    """One gzip member from deflate pieces (deflate_piece) of the `raw` parts, in the same order."""
    crc, size = 0, 0
    for part in raw:
        crc = zlib.crc32(part, crc)
        size += len(part)
    return b"".join([GZIP_HEADER, *pieces, DEFLATE_END, struct.pack("<LL", crc, size & 0xFFFFFFFF)])


def _lower_priority() -> None:
    """In each render thread: a lower CPU priority (nice 10), so that when the event loop and the
    compression of a scrape both want the CPU, ingest wins. Best effort."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class _Segment:
    """Consecutive pipelines: the states and versions it was joined from, its sample lines per family, and
    (once a scrape asked for gzip) each family's lines as a deflate piece."""

    __slots__ = ("chunks", "deflated", "states", "versions")

    def __init__(self, states: list[PipelineState], versions: list[int], chunks: list[bytes]) -> None:
        self.states, self.versions, self.chunks = states, versions, chunks
        self.deflated: list[bytes] | None = None

    def deflate(self) -> None:
        self.deflated = [deflate_piece(chunk) for chunk in self.chunks]


class MetricsRenderer:
    """Renders `/metrics`, re-rendering only the pipelines whose state changed since they were cached.

    Pipelines are cut into segments of SEGMENT (in the order they are tracked); each segment keeps its
    blocks joined per family, so a scrape where few pipelines changed re-joins only their segments and
    then joins a few hundred parts. Gzip is cached the same way: each segment's families are compressed
    once as deflate pieces that concatenate into the body, so a scrape compresses only what changed.
    Every step that grows with the pipelines yields to the event loop between chunks, and the big joins
    and compression run in a thread (zlib and bytes.join release the GIL on large data), so a scrape
    never stalls ingest for long.
    """

    def __init__(self, pipelines: Callable[[], Iterable[PipelineState]], own_registry: CollectorRegistry | None,
                 threads: ThreadPoolExecutor | None = None) -> None:
        """`own_registry` None: no exporter metrics (the shards but the first); `threads`: share another
        renderer's thread (closing is then that renderer's business)."""
        self._pipelines = pipelines
        self._own_registry = own_registry
        self._cache: dict[str, tuple[PipelineState, int, tuple[bytes, ...]]] = {}
        self._segments: list[_Segment] = []
        self._owns_threads = threads is None
        self._threads = threads or ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipemon-render",
                                                      initializer=_lower_priority)
        self._deflated_headers = {openmetrics: [deflate_piece(f.header(openmetrics)) for f in FAMILIES]
                                  for openmetrics in (False, True)}

    @property
    def threads(self) -> ThreadPoolExecutor:
        return self._threads

    def close(self) -> None:
        if self._owns_threads:
            self._threads.shutdown(wait=True)

    def _own(self, openmetrics: bool) -> bytes:
        if self._own_registry is None:
            return b"# EOF\n" if openmetrics else b""
        if openmetrics:
            return om_exposition.generate_latest(self._own_registry)  # already ends with "# EOF"
        return text_exposition.generate_latest(self._own_registry)

    async def render(self, openmetrics: bool) -> bytes:
        segments = await self._current_segments()
        parts: list[bytes] = []
        for index, family in enumerate(FAMILIES):
            parts.append(family.header(openmetrics))
            parts.extend(segment.chunks[index] for segment in segments)
        parts.append(self._own(openmetrics))
        if sum(len(p) for p in parts) < JOIN_IN_THREAD:
            return b"".join(parts)
        return await asyncio.get_running_loop().run_in_executor(self._threads, b"".join, parts)

    def render_team(self, openmetrics: bool, team: str) -> bytes:
        """Only one team's pipeline series (a team's read token under --protect-reads): no exporter-wide
        pipemon_* metrics either, as those count every team's pipelines and events."""
        blocks = []
        for state in self._pipelines():
            if state.team != team:
                continue
            cached = self._cache.get(state.name)
            if cached is None or cached[0] is not state or cached[1] != state.version:
                cached = self._cache[state.name] = (state, state.version, pipeline_blocks(state))
            blocks.append(cached[2])
        parts: list[bytes] = []
        for index, family in enumerate(FAMILIES):
            parts.append(family.header(openmetrics))
            parts.extend(block[index] for block in blocks)
        if openmetrics:
            parts.append(b"# EOF\n")
        return b"".join(parts)

    async def render_gzip(self, openmetrics: bool) -> bytes:
        """The body gzip-compressed (one member), from the segments' cached deflate pieces."""
        segments = await self._current_segments()
        loop = asyncio.get_running_loop()
        for start in range(0, len(segments), 8):  # compress what changed, a few segments per thread hop
            todo = [segment for segment in segments[start:start + 8] if segment.deflated is None]
            if todo:
                await loop.run_in_executor(self._threads, lambda todo=todo: [segment.deflate() for segment in todo])
        raw: list[bytes] = []
        pieces: list[bytes] = []
        headers = self._deflated_headers[openmetrics]
        for index, family in enumerate(FAMILIES):
            raw.append(family.header(openmetrics))
            pieces.append(headers[index])
            for segment in segments:
                raw.append(segment.chunks[index])
                pieces.append(segment.deflated[index])  # type: ignore[index]  # deflated above
        own = self._own(openmetrics)
        raw.append(own)
        pieces.append(deflate_piece(own))
        return await loop.run_in_executor(self._threads, gzip_from_pieces, raw, pieces)

    async def _current_segments(self) -> list[_Segment]:
        """The segments of the current pipelines, re-joining those where a pipeline changed."""
        states = list(self._pipelines())
        versions = [state.version for state in states]
        old, fresh = self._segments, []
        rerendered = 0
        for number, start in enumerate(range(0, len(states), SEGMENT)):
            seg_states, seg_versions = states[start:start + SEGMENT], versions[start:start + SEGMENT]
            segment = old[number] if number < len(old) else None
            # Versions are read before rendering: a segment is at least as new as it claims to be.
            if segment is None or segment.versions != seg_versions or segment.states != seg_states:
                blocks = []
                for state in seg_states:
                    cached = self._cache.get(state.name)
                    if cached is None or cached[0] is not state or cached[1] != state.version:
                        cached = self._cache[state.name] = (state, state.version, pipeline_blocks(state))
                        rerendered += 1
                        if rerendered % RERENDER_CHUNK == 0:
                            await asyncio.sleep(0)  # a full re-render must not stall ingest
                    blocks.append(cached[2])
                segment = _Segment(seg_states, seg_versions,
                                   [b"".join([b[i] for b in blocks]) for i in range(len(FAMILIES))])
                await asyncio.sleep(0)
            fresh.append(segment)
        self._segments = fresh
        if len(self._cache) > len(states):  # drop pipelines that are gone
            names = {state.name for state in states}
            self._cache = {name: entry for name, entry in self._cache.items() if name in names}
        return fresh
