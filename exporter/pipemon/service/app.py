"""The aiohttp application: routes, request handling, and the wiring of registry, recorder and renderer."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from pipemon.backends import StorageError, open_backend
from pipemon.model.events import (
    Finish,
    Forget,
    Record,
    RunFinished,
    RunStarted,
    Start,
    finished_record,
    started_record,
)
from pipemon.model.health import HealthJudge
from pipemon.model.registry import Registry, RegistryError, load_registry, parse_registry
from pipemon.model.state import SUCCESS_WINDOWS, PipelineState, parse_buckets, set_duration_buckets
from pipemon.openlineage.converter import LineageConverter, RunEvent
from pipemon.openlineage.folding import Folds, FoldSession
from pipemon.service.auth import Principal, Tokens
from pipemon.service.config import ServeConfig
from pipemon.service.exposition import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, MetricsRenderer
from pipemon.service.ingest import Admission, Ignored, Rejection, decode_batch, decode_item, split_items, to_record
from pipemon.service.openapi import openapi_spec
from pipemon.service.recorder import Recorder, RecorderSettings
from pipemon.service.selfmetrics import ExporterMetrics
from pipemon.service.sharding import ShardError, parse_shard, shard_filter
from pipemon.web import Ui, install
from pipemon.web.access import Sessions, may_read, reader
from pipemon.web.alerts import AlertSource
from pipemon.web.config import WebConfig
from pipemon.web.pipeline import Links

log = logging.getLogger("pipemon")
EXPORTER_KEY = web.AppKey("exporter", "Exporter")
EMPTY_REGISTRY = "teams: {}\n"
MAX_SHARD_RENDERERS = 64
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson")
# Wire event -> record; None means "valid, nothing to record"; a tuple is the event's record followed by records
# it implies (child runs closed with their root run). Raises Ignored for an event left aside on purpose.
Converter = Callable[[Any], Record | tuple[Record, ...] | None]


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
                                    history_size=config.history_size, recent_runs=config.recent_runs,
                                    abandon_after_factor=config.abandon_after_factor,
                                    sweep_interval=config.sweep_interval)
        storage = open_backend(config.state or config.state_dir, config.storage_sync)
        self.recorder = Recorder(self.load_registry(), storage, self.metrics, settings, clock)
        self.renderer = MetricsRenderer(lambda: self.recorder.pipelines, self.metrics.registry)
        self.folds = Folds()  # OpenLineage child runs, folded into their root runs in progress
        self._shard_renderers: dict[tuple[int, int], MetricsRenderer] = {}

    def renderer_for(self, shard: tuple[int, int] | None) -> MetricsRenderer:
        """The renderer of the whole exposition, or of one shard (each keeps its own cache of rendered
        pipelines; all share one thread). The exporter's own metrics go with shard 0."""
        if shard is None:
            return self.renderer
        renderer = self._shard_renderers.get(shard)
        if renderer is None:
            if len(self._shard_renderers) >= MAX_SHARD_RENDERERS:  # someone walks through shard counts
                self._shard_renderers.clear()
            renderer = self._shard_renderers[shard] = MetricsRenderer(
                shard_filter(lambda: self.recorder.pipelines, *shard),
                self.metrics.registry if shard[0] == 0 else None, self.renderer.threads)
        return renderer

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
                     converter_for: Callable[[Admission], Converter]) -> web.Response:
        """Decode, convert, admit and store the events of one request; `converter_for` makes the request's
        converter, which may consult the request's admission (the caller's token, the caps)."""
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
        admission = Admission(self.registry, self.recorder.pipelines, principal, self.config.max_pipelines)
        results = await self._ingest_items(items, wire_type, converter_for(admission), admission)
        if isinstance(results, Rejection):
            return error_response(results)
        if not batch:
            result = results[0]
            return json_response(result, result.get("code", 200))
        summary = dict.fromkeys(("accepted", "duplicate", "ignored", "rejected"), 0)
        for result in results:
            summary[result["status"]] += 1
        return json_response({**summary, "results": results})

    async def _ingest_items(self, items: list, wire_type: type, convert: Converter,
                            admission: Admission) -> list[dict[str, Any]] | Rejection:
        # OpenLineage child runs folded by this request reach the shared folds only once its records are stored
        folds = convert.folds if isinstance(convert, LineageConverter) else None
        results: list[dict[str, Any]] = []
        records: list[Record] = []
        slots: list[int | None] = []  # the result each record answers (None: implied by another event)
        decoded = decode_batch(items, wire_type) if len(items) > 1 else None
        for index, raw in enumerate(items):
            savepoint = folds.savepoint() if folds is not None else 0
            try:
                event = decode_item(raw, wire_type) if decoded is None else decoded[index]
                produced = to_record(event, convert)
                if produced is None:  # valid, and nothing to record (OpenLineage RUNNING/OTHER)
                    results.append({"status": "accepted"})
                    continue
                record, *implied = produced if isinstance(produced, tuple) else (produced,)
                team = admission.team_of(record.pipeline, getattr(record, "team", None))
                admission.admit(record.pipeline, isinstance(record, Start))
            except Rejection as rejection:
                if folds is not None:
                    folds.rollback(savepoint)  # a refused root finish keeps its children's fold for its retry
                self.metrics.reject(rejection.reason)
                results.append(rejection.body())
                continue
            except Ignored as ignored:  # a child run: its fold stands
                self.metrics.ignored.labels(ignored.reason).inc()
                results.append(ignored.body())
                continue
            result = {"status": "duplicate", "pipeline": record.pipeline, "run_id": record.run_id}
            results.append(result)
            if not admission.is_retry(record):
                if getattr(record, "team", team) != team:
                    record = msgspec.structs.replace(record, team=team)
                records.append(record)
                slots.append(len(results) - 1)
            for extra in implied:  # children tracked as pipelines, closed with their root
                if self._admits_implied(admission, extra):
                    records.append(extra)
                    slots.append(None)
        if records:
            try:
                outcomes = await self.recorder.submit(records)
            except StorageError:
                self.metrics.reject("storage_unavailable", len(records))
                return Rejection(503, "storage_unavailable", "pipemon cannot store events right now; nothing"
                                 " of this request was kept: retry later")
            for slot, outcome in zip(slots, outcomes, strict=True):
                if slot is not None:
                    results[slot]["status"] = outcome
        if folds is not None:
            folds.commit()
        self.metrics.duplicates.inc(sum(1 for r in results if r["status"] == "duplicate"))
        return results

    def _admits_implied(self, admission: Admission, record: Record) -> bool:
        """A record implied by another event (a child closed with its root) passes the same checks as the
        caller's own: another team's pipeline, or one over the caps, is not written through a root's finish."""
        try:
            admission.team_of(record.pipeline, getattr(record, "team", None))
            admission.admit(record.pipeline, False)
        except (Rejection, Ignored):
            return False
        return not admission.is_retry(record)

    def finished(self, event: RunFinished) -> Finish:
        return finished_record(event, self.clock(), self.config.max_clock_skew)

    def started(self, event: RunStarted) -> Start:
        return started_record(event, self.clock(), self.config.max_clock_skew)

    def lineage_converter(self, admission: Admission) -> LineageConverter:
        """A converter for the OpenLineage events of one request."""
        return LineageConverter(self.registry, self.recorder.pipelines, self.config.lineage_pipeline_name,
                                self.clock, self.config.max_clock_skew, FoldSession(self.folds),
                                admission.may_fold)


# ---- handlers ----------------------------------------------------------------------------------------


def _exporter(request: web.Request) -> Exporter:
    return request.app[EXPORTER_KEY]


async def post_runs(request: web.Request) -> web.Response:
    exp = _exporter(request)
    return await exp.ingest(request, "runs", RunFinished, lambda _: exp.finished)


async def post_runs_start(request: web.Request) -> web.Response:
    exp = _exporter(request)
    return await exp.ingest(request, "runs_start", RunStarted, lambda _: exp.started)


async def post_lineage(request: web.Request) -> web.Response:
    exp = _exporter(request)
    return await exp.ingest(request, "lineage", RunEvent, exp.lineage_converter)


async def get_metrics(request: web.Request) -> web.Response:
    exp = _exporter(request)
    try:
        renderer = exp.renderer_for(parse_shard(request.query))
    except ShardError as exc:
        return error_response(Rejection(400, "invalid_shard", str(exc), "shard"))
    openmetrics = "application/openmetrics-text" in request.headers.get("Accept", "")
    principal = reader(request)
    if principal is not None and principal.team is not None:  # a team's token: its pipelines only
        await exp.recorder.catch_up()  # as below: never less than an earlier scrape of another replica
        body = exp.renderer.render_team(openmetrics, principal.team)
        return web.Response(body=body, headers={"Content-Type": OPENMETRICS_CONTENT_TYPE if openmetrics
                                                else TEXT_CONTENT_TYPE})
    gzipped = "gzip" in request.headers.get("Accept-Encoding", "")
    started = time.perf_counter()
    # Replicas over one database: hold everything committed up to now before rendering, so no scrape of any
    # replica shows less than an earlier scrape of another. When the database is unreachable, the last state.
    await exp.recorder.catch_up()
    # Gzip (level 1) comes from the renderer's cache of compressed segments: only what changed is compressed.
    body = await (renderer.render_gzip(openmetrics) if gzipped else renderer.render(openmetrics))
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
    listed = [pipeline_summary(s) for s in exp.recorder.pipelines
              if (team is None or s.team == team) and may_read(request, s.team)]
    return json_response({"pipelines": sorted(listed, key=lambda p: p["pipeline"])})


def _readable(request: web.Request) -> PipelineState | None:
    """The named pipeline, if it exists and the caller may read it (another team's reads as absent)."""
    state = _exporter(request).recorder.pipelines.get(request.match_info["name"])
    return state if state is not None and may_read(request, state.team) else None


async def get_pipeline(request: web.Request) -> web.Response:
    state = _readable(request)
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
                     "throughput_records_per_second": _finite(state.last_run_throughput),
                     "failed_children": state.last_run_failed_children},
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


async def get_pipeline_runs(request: web.Request) -> web.Response:
    """The recent-runs ring of a pipeline, latest first (`?limit=N` for fewer)."""
    state = _readable(request)
    if state is None:
        return error_response(Rejection(404, "not_found", "no such pipeline", "pipeline"))
    raw = request.query.get("limit", "")
    if raw and not (raw.isascii() and raw.isdigit() and 0 < int(raw) <= 100_000):
        return error_response(Rejection(400, "invalid_limit", "limit must be a whole number from 1", "limit"))
    runs = state.recent.latest_first(int(raw) if raw else None)
    return json_response({"pipeline": state.name, "team": state.team, "capacity": state.recent.capacity,
                          "runs": [run.as_json() for run in runs]})


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
    caught_up = await exp.recorder.catch_up()  # a pipeline another replica created a moment ago is not a 404
    if exp.recorder.pipelines.get(name) is None:
        if not caught_up:
            return error_response(Rejection(503, "storage_unavailable", "cannot read the shared state; retry later"))
        return error_response(Rejection(404, "not_found", "no such pipeline", "pipeline"))
    try:
        await exp.recorder.submit([Forget(name)])  # a registered pipeline is re-created from zero as it applies
    except StorageError:
        return error_response(Rejection(503, "storage_unavailable", "cannot store the deletion; retry later"))
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


def _ui_of(exporter: Exporter, config: ServeConfig, tokens: Tokens | None, clock: Callable[[], float],
           web_config: WebConfig | None) -> Ui:
    if config.protect_reads and tokens is None:
        raise ValueError("--protect-reads needs tokens (--tokens)")
    judge = HealthJudge.from_path(config.rules_config, clock())
    links = Links(config.alertmanager_urls, judge.config.links.dashboard, config.prometheus_url)
    return Ui(lambda: exporter.recorder.pipelines, judge, AlertSource(config.alertmanager_urls), links, clock,
              Sessions(tokens) if config.protect_reads and tokens is not None else None,
              secure_cookie=web_config is not None and web_config.tls is not None)


def create_app(config: ServeConfig, tokens: Tokens | None = None, clock: Callable[[], float] = time.time,
               web_config: WebConfig | None = None) -> web.Application:
    exporter = Exporter(config, clock)
    exporter.tokens = tokens
    middlewares = [web_config.middleware()] if web_config is not None and web_config.users else []
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[EXPORTER_KEY] = exporter
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/-/healthy", get_healthy)
    app.router.add_get("/-/ready", get_healthy)
    app.router.add_post("/-/reload", post_reload)
    app.router.add_post("/api/v1/runs", post_runs)
    app.router.add_post("/api/v1/runs/start", post_runs_start)
    app.router.add_post("/api/v1/lineage", post_lineage)
    app.router.add_get("/api/v1/pipelines", get_pipelines)
    app.router.add_get("/api/v1/pipelines/{name}", get_pipeline)
    app.router.add_get("/api/v1/pipelines/{name}/runs", get_pipeline_runs)
    app.router.add_delete("/api/v1/pipelines/{name}", delete_pipeline)
    app.router.add_get("/api/v1/openapi.json", get_openapi)

    async def lifecycle(app: web.Application):
        await exporter.recorder.start()
        yield
        await exporter.recorder.close()
        exporter.renderer.close()

    app.cleanup_ctx.append(lifecycle)
    install(app, _ui_of(exporter, config, tokens, clock, web_config))  # after the lifecycle: warms up restored state
    return app
