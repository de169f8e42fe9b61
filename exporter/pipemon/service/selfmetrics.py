"""The exporter's own metrics (`pipemon_*`), instrumented directly with prometheus-client."""

from __future__ import annotations

import platform
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipemon import __version__

prometheus_client.disable_created_metrics()

ENDPOINTS = ("runs", "runs_start", "lineage")
REJECT_REASONS = (
    "malformed", "invalid_field", "future_timestamp", "unknown_pipeline", "unknown_team", "team_mismatch",
    "unauthorized", "forbidden", "too_large", "pipeline_cap", "in_progress_cap", "storage_unavailable",
)

IGNORE_REASONS = ("child_run", "unknown_pipeline")


class ExporterMetrics:
    def __init__(self, pipelines_count: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        r = self.registry
        self.received = Counter("pipemon_events_received", "Events received, by ingest endpoint.",
                                ["endpoint"], registry=r)
        self.rejected = Counter("pipemon_events_rejected", "Events rejected, by reason.", ["reason"], registry=r)
        self.ignored = Counter("pipemon_events_ignored", "Valid events left aside on purpose, by reason: child"
                               " runs folded into their root run, unknown pipelines the registry ignores.",
                               ["reason"], registry=r)
        self.duplicates = Counter("pipemon_events_duplicate", "Events acknowledged as retries of ones already"
                                  " counted.", registry=r)
        self.storage_errors = Counter("pipemon_storage_errors", "Failed writes to the state database.",
                                      registry=r)
        self.abandoned = Counter("pipemon_runs_abandoned", "Runs that started and never finished within their"
                                 " allowance; each is also counted as a failed run.", registry=r)
        self.abandonment_reverted = Counter("pipemon_runs_abandonment_reverted", "Abandoned runs whose finish"
                                            " arrived after all and replaced the abandonment.", registry=r)
        self.render_seconds = Histogram("pipemon_metrics_render_duration_seconds", "Time to render /metrics.",
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.commit_seconds = Histogram("pipemon_storage_commit_duration_seconds",
                                        "Time to commit a group of records to the state database.",
                                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
                                        registry=r)
        Gauge("pipemon_pipelines", "Pipelines tracked.", registry=r).set_function(pipelines_count)
        Gauge("pipemon_build_info", "Build information; always 1.", ["version", "python_version"],
              registry=r).labels(__version__, platform.python_version()).set(1)
        for endpoint in ENDPOINTS:
            self.received.labels(endpoint)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for reason in IGNORE_REASONS:
            self.ignored.labels(reason)

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected.labels(reason).inc(count)
