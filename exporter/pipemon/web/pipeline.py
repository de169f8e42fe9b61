"""The pipeline page (`/pipelines/NAME`): registry facts, thresholds in force, runs in progress, alerts,
recent runs and their charts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipemon.model.baseline import log_duration, log_records
from pipemon.model.health import Health, HealthJudge
from pipemon.model.recent import Run
from pipemon.model.registry import THRESHOLD_NAMES
from pipemon.model.state import PipelineState
from pipemon.web.alerts import AlertView, prometheus_graph_url, silence_url
from pipemon.web.html import duration, e, number, url_path, when
from pipemon.web.overview import badge
from pipemon.web.svg import Bands, bands_of, line_chart, outcome_strip


@dataclass(frozen=True, slots=True)
class Links:
    alertmanagers: tuple[str, ...] = ()
    grafana_dashboard: str | None = None  # rules config links.dashboard; ?var-pipeline=NAME is added
    prometheus: str | None = None


def render(state: PipelineState, health: Health, judge: HealthJudge, alerts: AlertView, links: Links,
           now: float) -> str:
    runs = state.recent.latest_first()
    chronological = runs[::-1]
    conditions = "".join(badge(c, health.failures if c == "failing" else 0) for c in health.conditions)
    if not health.conditions:
        conditions = badge(health.state)
    return "\n".join((
        '<p><a href="/">← all pipelines</a></p>',
        f'<h1 class="name" id="pipeline-name">{e(state.name)}</h1><p id="health">{conditions}</p>',
        _links(state, links),
        _facts(state, judge),
        _alerts(state, alerts, links),
        _in_progress(state, now),
        _charts(state, chronological),
        _runs_table(runs, state.recent.capacity),
        _thresholds(state, judge),
    ))


def _links(state: PipelineState, links: Links) -> str:
    out = []
    if links.grafana_dashboard:
        out.append(f'<a id="grafana-link" href="{e(links.grafana_dashboard)}?var-pipeline={e(url_path(state.name))}">'
                   "Grafana dashboard</a>")
    if links.prometheus:
        out.append(f'<a id="prometheus-link" href="{e(prometheus_graph_url(links.prometheus, state.name))}">'
                   "Prometheus graph</a>")
    for index, am in enumerate(links.alertmanagers):
        out.append(f'<a class="silence-link" id="silence-link-{index}" href="{e(silence_url(am, state.name))}">'
                   f"Silence in Alertmanager{f' {index + 1}' if len(links.alertmanagers) > 1 else ''}</a>")
    if state.spec.runbook_url:
        out.append(f'<a href="{e(state.spec.runbook_url)}">Runbook</a>')
    return f'<p class="links">{" · ".join(out)}</p>' if out else ""


def _facts(state: PipelineState, judge: HealthJudge) -> str:
    spec = state.spec
    interval = state.expected_interval()
    source = "registry" if spec.expected_interval_explicit else (
        "learned from its runs" if interval != spec.expected_interval_seconds else "registry default")
    if spec.schedule:
        source = f"schedule {spec.schedule}"
    rows = [
        ("team", e(state.team)), ("tier", e(spec.tier)),
        ("in the registry", "yes" if spec.registered else "no (unknown pipeline)"),
        ("expected interval", f"{duration(interval)} <span class=muted>({e(source)})</span>"),
        ("schedule", e(spec.schedule or "–")), ("next run due", when(state.next_run_due(), "–")),
        ("max runtime", duration(spec.max_runtime_seconds)),
        ("runs", f"{state.runs_success} succeeded, {state.runs_failure} failed"),
        ("failed in a row", str(state.consecutive_failures)),
        ("last success", when(state.last_success_ts)),
        (f"success of the latest {judge.success_window(state)}",
         _pct(state.success_ratio(judge.success_window(state)))),
    ]
    body = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return f'<section aria-labelledby="facts-h"><h2 id="facts-h">Facts</h2><dl class="facts">{body}</dl></section>'


def _pct(ratio: float) -> str:
    return "–" if math.isnan(ratio) else f"{ratio * 100:.0f}%"


def _alerts(state: PipelineState, alerts: AlertView, links: Links) -> str:
    if not links.alertmanagers:
        return ""
    notice = "".join(f'<p class="notice" role="status">{e(m)}</p>' for m in alerts.errors)
    mine = alerts.for_pipeline(state.name)
    if not mine:
        return f'<section id="alerts"><h2>Alerts</h2>{notice}<p class="muted">No alert.</p></section>'
    rows = "".join(
        f'<tr data-alert="{e(a.name)}" data-state="{e(a.state)}"><td>{e(a.name)}</td><td>{e(a.severity)}</td>'
        f"<td>{e(a.state)}</td><td>{when(a.since)}</td><td>{e(', '.join(a.receivers))}</td></tr>"
        for a in mine)
    return (f'<section id="alerts"><h2>Alerts</h2>{notice}<div class="scroll"><table><thead><tr><th>alert</th>'
            f"<th>severity</th><th>state</th><th>since</th><th>receiver</th></tr></thead><tbody>{rows}</tbody>"
            "</table></div></section>")


def _in_progress(state: PipelineState, now: float) -> str:
    if not state.in_progress:
        return '<section id="in-progress"><h2>In progress</h2><p class="muted">No run in progress.</p></section>'
    rows = "".join(
        f'<tr data-run="{e(run_id)}"><td class="name">{e(run_id)}</td><td>{when(started, absolute=True)}</td>'
        f'<td class="num{" late" if now - started > state.spec.max_runtime_seconds else ""}">'
        f"{duration(now - started)}</td></tr>"
        for run_id, started in sorted(state.in_progress.items(), key=lambda item: item[1]))
    return (f'<section id="in-progress"><h2>In progress</h2><table><thead><tr><th>run id</th><th>started</th>'
            f"<th>age</th></tr></thead><tbody>{rows}</tbody></table></section>")


def _bands(state: PipelineState, column: str) -> Bands | None:
    """The baseline the latest successful run was judged against: its centre and the σ of its z-score."""
    judgements = state.judgements()
    latest = judgements.duration[0] if column == "duration" else judgements.records[0]
    if not latest.samples or math.isnan(latest.spread):
        return None
    to_log, from_log = (log_duration, math.exp) if column == "duration" else (log_records, math.expm1)
    return bands_of(to_log(latest.expected), latest.spread, from_log, latest.samples)


def _charts(state: PipelineState, runs: list[Run]) -> str:
    if not runs:
        return ""
    d_bands, r_bands = _bands(state, "duration"), _bands(state, "records")
    throughput_base = None
    if d_bands is not None and r_bands is not None and d_bands.median > 0:
        throughput_base = r_bands.median / d_bands.median  # what PipelineThroughputDrop compares against
    return f"""<section id="charts"><h2>Recent runs, charted</h2>
<p class="muted">Oldest left. Bands: the baseline the latest successful run was judged against (log-space
median ± 2σ and 3σ, robust: MAD).</p>
<h3>Outcomes</h3>{outcome_strip(runs)}
<h3>Duration</h3>{line_chart("chart-duration", "duration per run", runs, [r.duration for r in runs], duration,
                             d_bands)}
<h3>Records</h3>{line_chart("chart-records", "records per run", runs, [r.records for r in runs], number, r_bands)}
<h3>Throughput (records/s)</h3>{line_chart("chart-throughput", "throughput per run", runs,
                                           [r.throughput for r in runs], number, baseline=throughput_base)}
</section>"""


def _runs_table(runs: list[Run], capacity: int) -> str:
    if not runs:
        return '<section><h2>Recent runs</h2><p class="muted">No run yet.</p></section>'
    rows = "".join(
        f'<tr data-run="{e(r.run_id)}" data-status="{e(r.status)}"><td><span class="o-{e(r.status)}">{e(r.status)}'
        f'</span></td><td class="name">{e(r.run_id)}</td><td>{when(r.started, "–", absolute=True)}</td>'
        f'<td>{when(r.finished, "–", absolute=True)}</td><td class="num">{duration(r.duration)}</td>'
        f'<td class="num">{number(r.records)}</td><td class="num">{number(r.throughput)}</td></tr>'
        for r in runs)
    return (f'<section><h2>Recent runs <span class="muted">(the last {capacity}, latest first)</span></h2>'
            f'<div class="scroll"><table id="runs"><thead><tr><th>status</th><th>run id</th><th>started</th>'
            f"<th>finished</th><th>duration</th><th>records</th><th>records/s</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div></section>")


def _thresholds(state: PipelineState, judge: HealthJudge) -> str:
    rows = []
    for name in THRESHOLD_NAMES:
        value, source = judge.threshold(state, name)
        rows.append(f'<tr data-threshold="{e(name)}"><td>{e(name)}</td><td class="num">{value:g}</td>'
                    f"<td>{e(source)}</td></tr>")
    return ('<section><h2>Thresholds in force</h2><div class="scroll"><table id="thresholds"><thead><tr>'
            "<th>threshold</th><th>value</th><th>from</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div></section>")
