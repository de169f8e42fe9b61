"""The overview (`/`): every pipeline the caller may read, worst first, filtered and paged on the server."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from pipemon.model.health import LABELS, RANK, STATES, Health, HealthJudge
from pipemon.model.state import PipelineState
from pipemon.web.alerts import AlertView
from pipemon.web.html import duration, e, percent, query, url_path, when

PER_PAGE = 50
MAX_PER_PAGE = 500
MAX_QUERY = 200


class FilterError(ValueError):
    """A filter the overview cannot apply; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Filters:
    team: str = ""
    tier: str = ""
    state: str = ""
    q: str = ""
    page: int = 1
    per: int = PER_PAGE

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Filters:
        state = params.get("state", "")
        if state and state not in RANK:
            raise FilterError(f"state must be one of {', '.join(STATES)} (got {state!r})")
        q = params.get("q", "").strip()
        if len(q) > MAX_QUERY:
            raise FilterError(f"the search is longer than {MAX_QUERY} characters")
        return cls(params.get("team", ""), params.get("tier", ""), state, q,
                   _whole(params, "page", 1, 1_000_000), _whole(params, "per", PER_PAGE, MAX_PER_PAGE))

    def params(self, **changes: str | int) -> dict[str, str | int | None]:
        f = replace(self, **changes)
        return {"team": f.team, "tier": f.tier, "state": f.state, "q": f.q,
                "page": None if f.page == 1 else f.page, "per": None if f.per == PER_PAGE else f.per}


def _whole(params: Mapping[str, str], name: str, default: int, most: int) -> int:
    raw = params.get(name, "")
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise FilterError(f"{name} must be a whole number from 1 to {most} (got {raw!r})")
    return int(raw)


@dataclass(frozen=True, slots=True)
class Row:
    state: PipelineState
    health: Health


@dataclass(frozen=True, slots=True)
class Overview:
    rows: list[Row]  # this page's
    matched: int
    counts: dict[str, Counter]  # team -> state -> pipelines (of every pipeline visible, before filters)
    teams: list[str]
    tiers: list[str]


def build(states: Iterable[PipelineState], judge: HealthJudge, filters: Filters, now: float) -> Overview:
    """Judge every visible pipeline (for the counts), then filter, sort worst first and cut the page."""
    counts: dict[str, Counter] = {}
    tiers: set[str] = set()
    matched: list[Row] = []
    needle = filters.q.casefold()
    for state in states:
        health = judge.judge(state, now)
        team_counts = counts.get(state.team)
        if team_counts is None:
            team_counts = counts[state.team] = Counter()
        team_counts[health.state] += 1
        tiers.add(state.spec.tier)
        if ((filters.team and state.team != filters.team) or (filters.tier and state.spec.tier != filters.tier)
                or (filters.state and health.state != filters.state)  # the worst state, as the counts
                or (needle and needle not in state.name.casefold())):
            continue
        matched.append(Row(state, health))
    matched.sort(key=lambda r: (r.health.rank, -r.health.failures, r.state.name))
    start = (filters.page - 1) * filters.per
    return Overview(matched[start:start + filters.per], len(matched), counts, sorted(counts), sorted(tiers))


# ---- rendering -----------------------------------------------------------------------------------------


def render(view: Overview, filters: Filters, judge: HealthJudge, alerts: AlertView) -> str:
    return "\n".join((
        _alert_notice(alerts), _counts(view), _filters(view, filters), _table(view, judge, alerts),
        _pager(view, filters),
    ))


def badge(state: str, failures: int = 0) -> str:
    text = LABELS[state] + (f" ×{failures}" if state == "failing" and failures else "")
    return f'<span class="badge s-{e(state)}" data-state="{e(state)}">{e(text)}</span>'


def _alert_notice(alerts: AlertView) -> str:
    return "".join(f'<p class="notice" role="status">{e(error)}</p>' for error in alerts.errors)


def _counts(view: Overview) -> str:
    head = "".join(f"<th scope=col>{e(LABELS[s])}</th>" for s in STATES)
    rows = []
    for team in view.teams:
        cells = []
        for s in STATES:
            n = view.counts[team][s]
            link = query({"team": team, "state": s})
            cells.append(f'<td class="num"><a href="{e(link)}">{n}</a></td>' if n else '<td class="num muted">·</td>')
        rows.append(f'<tr data-team="{e(team)}"><th scope=row><a href="{e(query({"team": team}))}">{e(team)}'
                    f"</a></th>{''.join(cells)}</tr>")
    return (f'<section aria-label="Pipelines per team and state"><h1>Pipelines</h1><div class="scroll">'
            f'<table class="counts"><thead><tr><th scope=col>team</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div></section>")


def _options(values: list[str], chosen: str, labels: Mapping[str, str] | None = None) -> str:
    out = ['<option value="">all</option>']
    for value in values:
        sel = " selected" if value == chosen else ""
        out.append(f'<option value="{e(value)}"{sel}>{e((labels or {}).get(value, value))}</option>')
    return "".join(out)


def _filters(view: Overview, f: Filters) -> str:
    return f"""<form class="filters" method="get" action="/" role="search">
<label>Search <input type="search" name="q" value="{e(f.q)}" placeholder="pipeline name" autocomplete="off"></label>
<label>Team <select name="team">{_options(view.teams, f.team)}</select></label>
<label>Tier <select name="tier">{_options(view.tiers, f.tier)}</select></label>
<label>State <select name="state">{_options(list(STATES), f.state, LABELS)}</select></label>
<button type="submit">Apply</button> <a href="/">Clear</a>
</form>"""


def _table(view: Overview, judge: HealthJudge, alerts: AlertView) -> str:
    if not view.rows:
        return '<p class="empty" id="no-pipelines">No pipeline matches.</p>'
    body = "".join(_row(row, judge, alerts) for row in view.rows)
    return f"""<div class="scroll"><table class="pipelines" id="pipelines">
<thead><tr><th scope=col>state</th><th scope=col>pipeline</th><th scope=col>team</th><th scope=col>tier</th>
<th scope=col>last run</th><th scope=col>last success</th><th scope=col>last duration (baseline)</th>
<th scope=col>success</th><th scope=col>alerts</th></tr></thead>
<tbody>{body}</tbody></table></div>"""


def _row(row: Row, judge: HealthJudge, alerts: AlertView) -> str:
    s, h = row.state, row.health
    extra = "".join(badge(c) for c in h.conditions if c != h.state)
    if s.last_run_ts:
        outcome = "success" if s.last_run_success else "failure"
        last = f'{when(s.last_run_ts)} <span class="o-{outcome}">{outcome}</span>'
    else:
        last = when(0)
    if s.in_progress:
        last += f' <span class="running">{len(s.in_progress)} running</span>'
    baseline = s.judgements().duration[0].expected
    vs = f" ({duration(baseline)})" if not math.isnan(baseline) else ""
    window = judge.success_window(s)
    ratio = s.success_ratio(window)
    mine = alerts.for_pipeline(s.name)
    marks = "".join(f'<span class="alert a-{e(a.state)}" title="{e(a.name)}">{e(a.short)}</span>' for a in mine)
    return (f'<tr data-pipeline="{e(s.name)}" data-state="{e(h.state)}">'
            f"<td>{badge(h.state, h.failures)}{extra}</td>"
            f'<td class="name"><a href="/pipelines/{url_path(s.name)}">{e(s.name)}</a></td>'
            f"<td>{e(s.team)}</td><td>{e(s.spec.tier)}</td><td>{last}</td><td>{when(s.last_success_ts)}</td>"
            f'<td class="num">{duration(s.last_run_duration)}{vs}</td>'
            f'<td class="num" title="of the latest {window} runs">{percent(ratio)}</td><td>{marks}</td></tr>')


def _pager(view: Overview, f: Filters) -> str:
    pages = max(1, math.ceil(view.matched / f.per))
    first = (f.page - 1) * f.per + 1 if view.matched else 0
    last = min(view.matched, f.page * f.per)
    links = []
    if f.page > 1:
        links.append(f'<a rel="prev" href="{e(query(f.params(page=f.page - 1)))}">← previous</a>')
    if f.page < pages:
        links.append(f'<a rel="next" href="{e(query(f.params(page=f.page + 1)))}">next →</a>')
    return (f'<nav class="pager" aria-label="pages"><span id="matched" data-matched="{view.matched}">'
            f"{first}–{last} of {view.matched}</span> {' '.join(links)}</nav>")

