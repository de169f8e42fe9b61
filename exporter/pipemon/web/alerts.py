"""Alerts in context: the pipeline alerts of one or more Alertmanagers (`--alertmanager-url`), and links.

Fetched at most every CACHE_SECONDS for all pipelines at once (one request per Alertmanager), with a short
timeout: a slow or dead Alertmanager makes the page say so, never makes it wait or fail.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import quote, urlencode

import aiohttp

CACHE_SECONDS = 10.0
TIMEOUT_SECONDS = 2.0
SEVERITY_SHORT = {"critical": "crit", "high": "high", "medium": "med", "low": "low"}


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    severity: str
    state: str  # "firing", "silenced" or "inhibited" (Alertmanager's "suppressed" by a silence or an inhibition)
    since: float
    receivers: tuple[str, ...]
    pipeline: str
    source: str  # the Alertmanager it came from

    @property
    def short(self) -> str:
        short = SEVERITY_SHORT.get(self.severity, self.severity)
        return short if self.state == "firing" else f"{short} ({self.state})"


@dataclass(slots=True)
class AlertView:
    by_pipeline: dict[str, list[Alert]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    configured: bool = False

    def for_pipeline(self, name: str) -> list[Alert]:
        return self.by_pipeline.get(name, [])


def silence_url(alertmanager: str, pipeline: str) -> str:
    """Alertmanager's new-silence form, prefilled with a matcher on the pipeline."""
    matcher = '{pipeline="' + pipeline.replace("\\", "\\\\").replace('"', '\\"') + '"}'
    return f"{alertmanager.rstrip('/')}/#/silences/new?{urlencode({'filter': matcher}, quote_via=quote)}"


def prometheus_graph_url(prometheus: str, pipeline: str) -> str:
    selector = 'pipeline="' + pipeline.replace("\\", "\\\\").replace('"', '\\"') + '"'
    exprs = {"g0.expr": f"pipeline_last_run_duration_seconds{{{selector}}}", "g0.tab": "0",
             "g1.expr": f"pipeline_consecutive_failures{{{selector}}}", "g1.tab": "0"}
    return f"{prometheus.rstrip('/')}/graph?{urlencode(exprs, quote_via=quote)}"


class AlertSource:
    def __init__(self, urls: tuple[str, ...]) -> None:
        self.urls = tuple(u.rstrip("/") for u in urls)
        self._cached: tuple[float, AlertView] | None = None
        self._lock = asyncio.Lock()

    async def view(self) -> AlertView:
        if not self.urls:
            return AlertView()
        async with self._lock:  # one fetch for concurrent page loads
            if self._cached is not None and time.monotonic() - self._cached[0] < CACHE_SECONDS:
                return self._cached[1]
            view = await self._fetch()
            self._cached = (time.monotonic(), view)
            return view

    async def _fetch(self) -> AlertView:
        view = AlertView(configured=True)
        seen: set[str] = set()  # clustered Alertmanagers hold the same alerts: one per fingerprint
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            results = await asyncio.gather(*(self._one(session, url) for url in self.urls), return_exceptions=True)
        for url, result in zip(self.urls, results, strict=True):
            if isinstance(result, BaseException):
                view.errors.append(f"Alertmanager {url} is unreachable ({type(result).__name__}): alerts may be"
                                   " missing from this page.")
                continue
            if not isinstance(result, list):
                view.errors.append(f"Alertmanager {url} answered something other than a list of alerts.")
                continue
            for raw in result:
                alert = _parse(raw, url)
                if alert is None or raw.get("fingerprint", id(raw)) in seen:
                    continue
                seen.add(raw.get("fingerprint", id(raw)))
                view.by_pipeline.setdefault(alert.pipeline, []).append(alert)
        if len(view.errors) == len(self.urls):
            view.errors = [f"No Alertmanager answered ({', '.join(self.urls)}): alerts are not shown."]
        return view

    @staticmethod
    async def _one(session: aiohttp.ClientSession, url: str) -> list[dict]:
        async with session.get(f"{url}/api/v2/alerts", params={"active": "true", "silenced": "true",
                                                                  "inhibited": "true"}) as resp:
            resp.raise_for_status()
            body = await resp.json()
        if not isinstance(body, list):
            raise ValueError("not a list of alerts")
        return body


def _parse(raw: object, source: str) -> Alert | None:
    if not isinstance(raw, dict):
        return None  # not an alert: an Alertmanager answer pipemon cannot read is no reason for a 500
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict):
        return None
    status = raw.get("status") or {}
    if not isinstance(status, dict):
        status = {}
    pipeline = labels.get("pipeline")
    if not isinstance(pipeline, str):
        return None  # the exporter's own alerts concern no pipeline
    if status.get("state", "active") == "active":
        state = "firing"
    else:
        state = "silenced" if status.get("silencedBy") else "inhibited"
    try:
        since = datetime.fromisoformat(str(raw.get("startsAt", "")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        since = 0.0
    receivers = tuple(r.get("name", "") for r in raw.get("receivers") or [] if isinstance(r, dict))
    return Alert(str(labels.get("alertname", "")), str(labels.get("severity", "")),
                 state, since, receivers, pipeline, source)
