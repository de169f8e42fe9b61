"""The aiohttp application: routes, request handling, and the wiring of registry, recorder and renderer."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from pipemon import __version__
from pipemon.auth import Principal, Tokens
from pipemon.config import ServeConfig
from pipemon.events import Finish, Forget, RunFinished, RunStarted, Start, finished_record, started_record
from pipemon.exposition import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, MetricsRenderer
from pipemon.ingest import Admission, Rejection, decode_batch, decode_item, split_items, to_record
from pipemon.lineage import LineageConverter, RunEvent
from pipemon.openapi import openapi_spec
from pipemon.recorder import Recorder, RecorderSettings, state_path
from pipemon.registry import Registry, RegistryError, load_registry, parse_registry
from pipemon.selfmetrics import ExporterMetrics
from pipemon.state import SUCCESS_WINDOWS, PipelineState, parse_buckets, set_duration_buckets
from pipemon.storage import Storage, StorageError
from pipemon.webconfig import WebConfig

log = logging.getLogger("pipemon")
EXPORTER_KEY = web.AppKey("exporter", "Exporter")
EMPTY_REGISTRY = "teams: {}\n"
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson")
# Wire event -> record; None means "valid, nothing to record".
Converter = Callable[[Any], Start | Finish | None]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def error_response(rejection: Rejection) -> web.Response:
    return json_response(rejection.body(), rejection.status)


class Exporter:
    """One running exporter: its registry, tokens, state and renderer."""

    def __init__(self, config: ServeConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.tokens: Tokens | None = None
        set_duration_buckets(parse_buckets(config.duration_buckets))  # before the recorder restores any state
        self.metrics = ExporterMetrics(lambda: len(self.recorder.pipelines))
        settings = RecorderSettings(baseline_size=config.baseline_size, dedup_window=config.dedup_window,
                                    history_size=config.history_size,
                                    abandon_after_factor=config.abandon_after_factor,
                                    sweep_interval=config.sweep_interval)
        storage = Storage(state_path(config.state_dir), config.storage_sync)
        self.recorder = Recorder(self.load_registry(), storage, self.metrics, settings, clock)
        self.renderer = MetricsRenderer(lambda: self.recorder.pipelines, self.metrics.registry)

    @property
    def registry(self) -> Registry:
        """The registry in force; the recorder holds it, so a reload changes it in one place."""
        return self.recorder.registry

    def load_registry(self) -> Registry:
        if self.config.registry is None:
            return parse_registry(EMPTY_REGISTRY, "<no registry>")
        return load_registry(self.config.registry)

    def reload_registry(self) -> Registry:
        """Load the registry file again; on error the running one stays and RegistryError is raised."""
        registry = self.load_registry()
        self.recorder.set_registry(registry)
        log.info("registry reloaded from %s: %d teams, %d pipelines by name", registry.path,
                 len(registry.teams), len(registry.registered_specs()))
        return registry

    # ---- ingest --------------------------------------------------------------------------------------

    def principal(self, request: web.Request) -> Principal | None:
        """The caller's token; raises a 401 rejection when tokens are configured and it is missing/wrong."""
        if self.tokens is None:
            return None
        principal = self.tokens.identify(request.headers.get("Authorization"))
        if principal is None:
            raise Rejection(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer …)")
        return principal

    async def ingest(self, request: web.Request, endpoint: str, wire_type: type,
                     convert: Converter) -> web.Response:
        try:
            principal = self.principal(request)
            body = await request.read()
            items, batch = split_items(body, request.content_type in NDJSON_TYPES)
        except web.HTTPRequestEntityTooLarge:
            self.metrics.received.labels(endpoint).inc()
            self.metrics.reject("too_large")
            return error_response(Rejection(413, "too_large", f"the body is larger than"
                                            f" {self.config.max_body_bytes} bytes (--max-body-bytes)"))
        except Rejection as rejection:
            self.metrics.received.labels(endpoint).inc()
            self.metrics.reject(rejection.reason)
            return error_response(rejection)
        self.metrics.received.labels(endpoint).inc(len(items))
        results = await self._ingest_items(items, wire_type, convert, principal)
        if isinstance(results, Rejection):
            return error_response(results)
        if not batch:
            result = results[0]
            return json_response(result, result.get("code", 200))
        summary = dict.fromkeys(("accepted", "duplicate", "rejected"), 0)
        for result in results:
            summary[result["status"]] += 1
        return json_response({**summary, "results": results})

    async def _ingest_items(self, items: list, wire_type: type, convert: Converter,
                            principal: Principal | None) -> list[dict[str, Any]] | Rejection:
        admission = Admission(self.registry, self.recorder.pipelines, principal, self.config.max_pipelines)
        results: list[dict[str, Any]] = []
        records: list[Start | Finish] = []
        slots: list[int] = []
        decoded = decode_batch(items, wire_type) if len(items) > 1 else None
        for index, raw in enumerate(items):
            try:
                event = decode_item(raw, wire_type) if decoded is None else decoded[index]
                record = to_record(event, convert)
                if record is None:  # valid, and nothing to record (OpenLineage RUNNING/OTHER)
                    results.append({"status": "accepted"})
                    continue
                team = admission.team_of(record.pipeline, record.team)
                admission.admit(record.pipeline, isinstance(record, Start))
            except Rejection as rejection:
                self.metrics.reject(rejection.reason)
                results.append(rejection.body())
                continue
            result = {"status": "duplicate", "pipeline": record.pipeline, "run_id": record.run_id}
            results.append(result)
            if not admission.is_retry(record):
                records.append(record if record.team == team else msgspec.structs.replace(record, team=team))
                slots.append(len(results) - 1)
        if records:
            try:
                outcomes = await self.recorder.submit(records)
            except StorageError:
                self.metrics.reject("storage_unavailable", len(records))
                return Rejection(503, "storage_unavailable", "pipemon cannot store events right now; nothing"
                                 " of this request was kept: retry later")
            for slot, outcome in zip(slots, outcomes, strict=True):
                results[slot]["status"] = outcome
        self.metrics.duplicates.inc(sum(1 for r in results if r["status"] == "duplicate"))
        return results

    def finished(self, event: RunFinished) -> Finish:
        return finished_record(event, self.clock(), self.config.max_clock_skew)

    def started(self, event: RunStarted) -> Start:
        return started_record(event, self.clock(), self.config.max_clock_skew)

    def lineage_converter(self) -> LineageConverter:
        """A converter for the OpenLineage events of one request."""
        return LineageConverter(self.registry, self.recorder.pipelines, self.config.lineage_pipeline_name,
                                self.clock, self.config.max_clock_skew)


# ---- handlers ----------------------------------------------------------------------------------------


def _exporter(request: web.Request) -> Exporter:
    return request.app[EXPORTER_KEY]


async def post_runs(request: web.Request) -> web.Response:
    exp = _exporter(request)
    return await exp.ingest(request, "runs", RunFinished, exp.finished)


async def post_runs_start(request: web.Request) -> web.Response:
    exp = _exporter(request)
    return await exp.ingest(request, "runs_start", RunStarted, exp.started)


async def post_lineage(request: web.Request) -> web.Response:
    exp = _exporter(request)
    return await exp.ingest(request, "lineage", RunEvent, exp.lineage_converter())


async def get_metrics(request: web.Request) -> web.Response:
    exp = _exporter(request)
    openmetrics = "application/openmetrics-text" in request.headers.get("Accept", "")
    gzipped = "gzip" in request.headers.get("Accept-Encoding", "")
    started = time.perf_counter()
    # Gzip (level 1) comes from the renderer's cache of compressed segments: only what changed is compressed.
    body = await (exp.renderer.render_gzip(openmetrics) if gzipped else exp.renderer.render(openmetrics))
    exp.metrics.render_seconds.observe(time.perf_counter() - started)
    headers = {"Content-Type": OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


def pipeline_summary(state: PipelineState) -> dict[str, Any]:
    return {
        "pipeline": state.name, "team": state.team, "tier": state.spec.tier, "registered": state.spec.registered,
        "runs_success": state.runs_success, "runs_failure": state.runs_failure,
        "last_run_timestamp": state.last_run_ts or None, "last_success_timestamp": state.last_success_ts or None,
        "consecutive_failures": state.consecutive_failures, "runs_in_progress": len(state.in_progress),
        "abandonments_reverted": state.runs_reverted,
    }


async def get_pipelines(request: web.Request) -> web.Response:
    exp = _exporter(request)
    team = request.query.get("team")
    listed = [pipeline_summary(s) for s in exp.recorder.pipelines if team is None or s.team == team]
    return json_response({"pipelines": sorted(listed, key=lambda p: p["pipeline"])})


async def get_pipeline(request: web.Request) -> web.Response:
    state = _exporter(request).recorder.pipelines.get(request.match_info["name"])
    if state is None:
        return error_response(Rejection(404, "not_found", "no such pipeline", "pipeline"))
    judged = state.judgements()
    detail = pipeline_summary(state) | {
        "expected_interval_seconds": state.expected_interval(),
        "expected_interval_learned": not state.spec.expected_interval_explicit,
        "schedule": state.spec.schedule, "next_run_due_timestamp": state.next_run_due() or None,
        "max_runtime_seconds": state.spec.max_runtime_seconds, "runbook_url": state.spec.runbook_url,
        "thresholds": state.spec.thresholds, "in_progress": state.in_progress,
        "last_run": {"duration_seconds": _finite(state.last_run_duration),
                     "records": _finite(state.last_run_records),
                     "throughput_records_per_second": _finite(state.last_run_throughput)},
        "recent_runs_success_ratio": {str(n): _finite(state.success_ratio(n)) for n in SUCCESS_WINDOWS},
        "baseline": {
            "history": len(state.history),
            "duration_seasonality": judged.duration_profile, "records_seasonality": judged.records_profile,
            "latest_successful_runs": [
                {"duration_zscore": _finite(d.zscore), "duration_ratio": _finite(d.ratio),
                 "duration_baseline_seconds": _finite(d.expected), "duration_baseline_samples": d.samples,
                 "records_zscore": _finite(r.zscore), "records_ratio": _finite(r.ratio),
                 "records_baseline": _finite(r.expected)}
                for d, r in zip(judged.duration, judged.records, strict=True)
            ],
        },
    }
    return json_response(detail)


def _finite(value: float) -> float | None:
    return None if value != value or value in (math.inf, -math.inf) else value


async def delete_pipeline(request: web.Request) -> web.Response:
    """Forget a pipeline's state (admin). A registered pipeline starts again from zero."""
    exp = _exporter(request)
    try:
        principal = exp.principal(request)
        if principal is None or not principal.admin:
            raise Rejection(403, "forbidden", "deleting pipelines needs an admin token (configure --tokens)")
    except Rejection as rejection:
        return error_response(rejection)
    name = request.match_info["name"]
    if exp.recorder.pipelines.get(name) is None:
        return error_response(Rejection(404, "not_found", "no such pipeline", "pipeline"))
    try:
        await exp.recorder.submit([Forget(name)])
    except StorageError:
        return error_response(Rejection(503, "storage_unavailable", "cannot store the deletion; retry later"))
    spec = exp.registry.lookup(name)
    if spec is not None and spec.registered:
        exp.recorder.pipelines.ensure(spec)
    return json_response({"status": "deleted", "pipeline": name})


async def post_reload(request: web.Request) -> web.Response:
    exp = _exporter(request)
    try:
        if not exp.config.enable_lifecycle:
            raise Rejection(403, "forbidden", "reload over HTTP is off: start with --enable-lifecycle")
        principal = exp.principal(request)
        if principal is not None and not principal.admin:
            raise Rejection(403, "forbidden", "reloading needs an admin token")
        registry = exp.reload_registry()
    except Rejection as rejection:
        return error_response(rejection)
    except RegistryError as exc:
        return error_response(Rejection(400, "invalid_registry", f"registry not reloaded: {exc}"))
    return json_response({"status": "reloaded", "teams": len(registry.teams),
                          "pipelines": len(registry.registered_specs())})


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(openapi_spec())


async def get_healthy(request: web.Request) -> web.Response:
    return web.Response(text="Healthy.\n")


LANDING_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>pipemon</title></head>
<body><h1>pipemon {version}</h1><p>Monitoring for data pipelines.</p>
<ul>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/api/v1/pipelines">/api/v1/pipelines</a>: tracked pipelines</li>
<li><a href="/api/v1/openapi.json">/api/v1/openapi.json</a>: API specification (OpenAPI 3)</li>
</ul></body></html>
"""


async def get_landing(request: web.Request) -> web.Response:
    return web.Response(text=LANDING_PAGE.format(version=__version__), content_type="text/html")


def create_app(config: ServeConfig, tokens: Tokens | None = None, clock: Callable[[], float] = time.time,
               web_config: WebConfig | None = None) -> web.Application:
    exporter = Exporter(config, clock)
    exporter.tokens = tokens
    middlewares = [web_config.middleware()] if web_config is not None and web_config.users else []
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[EXPORTER_KEY] = exporter
    app.router.add_get("/", get_landing)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/-/healthy", get_healthy)
    app.router.add_get("/-/ready", get_healthy)
    app.router.add_post("/-/reload", post_reload)
    app.router.add_post("/api/v1/runs", post_runs)
    app.router.add_post("/api/v1/runs/start", post_runs_start)
    app.router.add_post("/api/v1/lineage", post_lineage)
    app.router.add_get("/api/v1/pipelines", get_pipelines)
    app.router.add_get("/api/v1/pipelines/{name}", get_pipeline)
    app.router.add_delete("/api/v1/pipelines/{name}", delete_pipeline)
    app.router.add_get("/api/v1/openapi.json", get_openapi)

    async def lifecycle(app: web.Application):
        await exporter.recorder.start()
        yield
        await exporter.recorder.close()
        exporter.renderer.close()

    app.cleanup_ctx.append(lifecycle)
    return app
