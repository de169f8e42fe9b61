"""Scoring: alert episodes and notifications against the labelled incidents and traps; tables and targets."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from detection.fleet import DAY, HOUR, RECORDS_INCIDENTS, Fleet, Label, Pipeline, _hour, _weekday
from detection.notify import Notification
from detection.prom import Episode

SEVERITY_RANK = {"info": 0, "low": 1, "warning": 2, "medium": 2, "high": 3, "critical": 4}
MONTH = 30 * DAY

# Which alerts detect which incident (any of them, for the incident's pipeline, severity ≥ medium, starting
# during the incident or within one expected interval, at most 1 h, after its end). PipelineVolumeLow is the
# alert issue 11 adds: rule files without it miss volume drops and zero-record runs, and should.
EXPECTED: dict[str, tuple[str, ...]] = {
    "outage": ("PipelineConsecutiveFailures", "PipelineSuccessRateLow"),
    "degradation": ("PipelineSuccessRateLow", "PipelineConsecutiveFailures"),
    "slowdown": ("PipelineDurationAnomaly",),
    "throughput_drop": ("PipelineThroughputDrop", "PipelineDurationAnomaly"),
    "volume_drop": ("PipelineVolumeLow",),
    "zero_records": ("PipelineVolumeLow",),
    "stopped": ("PipelineStale",),
    "missed_run": ("PipelineStale",),
    "stuck": ("PipelineRunStuck",),
}


def allowance(label: Label) -> float:
    """How long after an incident (or trap) its alerts may still start, and may still be firing: one expected
    interval, at most an hour."""
    return min(label.interval, HOUR)


def rank(ep: Episode) -> int:
    return SEVERITY_RANK.get(ep.severity, 2)


def attribute(episodes: list[Episode], incidents: list[Label]) -> None:
    """An alert belongs to the incident of its pipeline during which (or within the allowance after which) it
    started firing; any other alert is false."""
    by_pipeline: dict[str, list[tuple[int, Label]]] = defaultdict(list)
    for i, inc in enumerate(incidents):
        by_pipeline[inc.pipeline].append((i, inc))
    for ep in episodes:
        ep.incident = next((i for i, inc in by_pipeline.get(ep.pipeline or "", [])
                            if inc.start <= ep.start <= inc.end + allowance(inc)), None)


def notification_incidents(note: Notification) -> set[int | None]:
    return {ep.incident for ep in (note.firing or note.resolved)}


def _q(values: list[float], fn: str) -> float | None:
    if not values:
        return None
    return statistics.median(values) if fn == "median" else max(values)


@dataclass
class IncidentResult:
    label: Label
    detected: bool
    any_alert: bool
    delay: float | None
    alerts: list[str]
    notifications: int  # firing notifications, reminders included
    reminders: int  # of those, re-sent only because repeat_interval passed
    resolved_notifications: int
    linger: float | None
    on_idle_pipeline: bool = False  # its pipeline has idle runs (zero records are usual for it)


@dataclass
class Report:
    incidents: list[IncidentResult]
    false_by_alert: Counter
    false_by_class: dict[str, Counter]
    pipeline_months: float
    class_months: dict[str, float]
    false_notifications: Counter
    false_by_trap: Counter
    level_shift: list[dict]
    unlabelled_alerts: Counter
    targets: list[tuple[str, str, bool]] = field(default_factory=list)


def score(fleet: Fleet, episodes: list[Episode], notes: list[Notification],
          expected: dict[str, tuple[str, ...]]) -> Report:
    attribute(episodes, fleet.incidents)
    counted = [ep for ep in episodes if ep.start >= fleet.eval_start]
    pipelines = {p.name: p for p in fleet.pipelines}
    results = [_incident_result(i, inc, counted, notes, expected, fleet.end) for i, inc in enumerate(fleet.incidents)]
    for r in results:
        r.on_idle_pipeline = pipelines[r.label.pipeline].has_idle_runs
    false = [ep for ep in counted if ep.incident is None and ep.pipeline is not None]
    months = len(fleet.pipelines) * (fleet.end - fleet.eval_start) / MONTH
    class_months = Counter()
    for p in fleet.pipelines:
        class_months[p.klass] += (fleet.end - fleet.eval_start) / MONTH
    by_class: dict[str, Counter] = defaultdict(Counter)
    for ep in false:
        by_class[pipelines[ep.pipeline].klass if ep.pipeline in pipelines else "?"][
            "medium+" if rank(ep) >= 2 else "low"] += 1
    false_notes = Counter()
    for note in notes:
        if note.time < fleet.eval_start or notification_incidents(note) != {None}:
            continue
        eps = note.firing or note.resolved
        if not any(ep.pipeline for ep in eps):
            continue
        sev = "medium+" if max(rank(ep) for ep in eps) >= 2 else "low"
        false_notes[f"{sev} {'resolved' if note.is_resolved else 'firing'}"] += 1
    return Report(
        incidents=results,
        false_by_alert=Counter((ep.alertname, ep.severity) for ep in false),
        false_by_class=dict(by_class), pipeline_months=months, class_months=dict(class_months),
        false_notifications=false_notes,
        false_by_trap=Counter(_trap_of(ep, fleet, pipelines) for ep in false if rank(ep) >= 2),
        level_shift=_level_shift(fleet, false, notes),
        unlabelled_alerts=Counter((ep.alertname, ep.severity) for ep in counted if ep.pipeline is None),
    )


def _incident_result(i: int, inc: Label, episodes: list[Episode], notes: list[Notification],
                     expected: dict[str, tuple[str, ...]], end: float) -> IncidentResult:
    own = [ep for ep in episodes if ep.incident == i]
    hits = [ep for ep in own if ep.alertname in expected[inc.kind] and rank(ep) >= 2]
    first = min((ep.start for ep in hits), default=None)
    mine = [n for n in notes if i in notification_incidents(n)]
    linger = max((ep.end for ep in own), default=None)
    return IncidentResult(
        label=inc, detected=bool(hits), any_alert=any(rank(ep) >= 2 for ep in own),
        delay=None if first is None else first - inc.start,
        alerts=sorted({f"{ep.alertname}/{ep.severity}" for ep in own}),
        notifications=sum(1 for n in mine if not n.is_resolved),
        reminders=sum(1 for n in mine if n.repeat),
        resolved_notifications=sum(1 for n in mine if n.is_resolved),
        linger=None if linger is None else max(0.0, min(linger, end) - inc.end),
    )


# When several traps overlap a false alert, the most specific one explains it (a 5m pipeline has several late
# starts a day: they would otherwise take the blame for everything).
TRAP_PRIORITY = ("transient_failure", "failure_retried", "slow_once", "backfill", "idle_run", "level_shift", "holiday",
                 "late_start")


def _trap_of(ep: Episode, fleet: Fleet, pipelines: dict[str, Pipeline]) -> str:
    hits = {trap.kind for trap in fleet.traps if trap.pipeline == ep.pipeline
            and trap.start - allowance(trap) <= ep.start <= trap.end + allowance(trap)}
    for kind in TRAP_PRIORITY:
        if kind in hits:
            return kind
    p = pipelines.get(ep.pipeline or "")
    if p is None:
        return "unknown pipeline"
    if _weekday(ep.start) >= 5 or (_weekday(ep.start) == 0 and _hour(ep.start) < 12):
        return "weekend (or just after)"
    if p.hour_amp and min(abs(_hour(ep.start) - p.hour_peak), 24 - abs(_hour(ep.start) - p.hour_peak)) <= 4:
        return "hour-of-day peak"
    if p.registration == "learned":
        return "none (interval not registered)"
    return "none (healthy noise)"


def _level_shift(fleet: Fleet, false: list[Episode], notes: list[Notification]) -> list[dict]:
    out = []
    for trap in fleet.traps:
        if trap.kind != "level_shift":
            continue
        eps = [ep for ep in false if ep.pipeline == trap.pipeline and ep.start >= trap.start]
        after = [n for n in notes if n.time >= trap.start and not n.is_resolved
                 and any(ep in eps for ep in n.firing)]
        out.append({"pipeline": trap.pipeline, "since": trap.start, "alerts": len(eps),
                    "by_alert": dict(Counter(f"{ep.alertname}/{ep.severity}" for ep in eps)),
                    "notifications": len(after)})
    return out


# ---- tables ------------------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def incident_table(report: Report, types: list[str]) -> list[str]:
    lines = ["| incident | n | recall | any alert | delay min median / max | delay runs median / max |"
             " notifications median / max | of them reminders median / max | resolved notif. median |"
             " linger min median / max | linger > allowed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(t, [r for r in report.incidents if r.label.kind == t]) for t in types]
    rows += [(f"{t}, idle pipeline", [r for r in rs if r.on_idle_pipeline]) for t, rs in rows if t in RECORDS_INCIDENTS]
    rows.append(("all", report.incidents))
    for kind, rs in rows:
        if not rs:
            continue
        det = [r for r in rs if r.detected]
        mins = [r.delay / 60 for r in det]
        runs = [r.delay / r.label.interval for r in det]
        notes = [float(r.notifications) for r in rs]
        reminders = [float(r.reminders) for r in rs]
        linger = [r.linger / 60 for r in det if r.linger is not None]
        over = sum(1 for r in det if r.linger is not None and r.linger > allowance(r.label))
        lines.append(
            f"| {kind} | {len(rs)} | {len(det) / len(rs):.0%} | {sum(r.any_alert for r in rs) / len(rs):.0%} |"
            f" {_fmt(_q(mins, 'median'))} / {_fmt(_q(mins, 'max'))} | {_fmt(_q(runs, 'median'), 2)} /"
            f" {_fmt(_q(runs, 'max'), 2)} | {_fmt(_q(notes, 'median'), 0)} / {_fmt(_q(notes, 'max'), 0)} |"
            f" {_fmt(_q(reminders, 'median'), 0)} / {_fmt(_q(reminders, 'max'), 0)} |"
            f" {_fmt(_q([float(r.resolved_notifications) for r in rs], 'median'), 0)} |"
            f" {_fmt(_q(linger, 'median'), 0)} / {_fmt(_q(linger, 'max'), 0)} | {over} |")
    return lines


def false_table(report: Report) -> list[str]:
    pm = report.pipeline_months
    lines = [f"false alerts per pipeline-month ({pm:.1f} pipeline-months evaluated)", "",
             "| alert | severity | count | per pipeline-month |", "|---|---|---|---|"]
    for (name, sev), n in sorted(report.false_by_alert.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {sev} | {n} | {n / pm:.2f} |")
    medium = sum(n for (_, sev), n in report.false_by_alert.items() if SEVERITY_RANK.get(sev, 2) >= 2)
    low = sum(n for (_, sev), n in report.false_by_alert.items() if SEVERITY_RANK.get(sev, 2) < 2)
    lines += [f"| **all** | ≥ medium | {medium} | {medium / pm:.2f} |", f"| **all** | low | {low} | {low / pm:.2f} |",
              "", "| schedule class | pipeline-months | ≥ medium per pipeline-month | low per pipeline-month |",
              "|---|---|---|---|"]
    for klass, months in report.class_months.items():
        c = report.false_by_class.get(klass, Counter())
        lines.append(f"| {klass} | {months:.1f} | {c['medium+'] / months:.2f} | {c['low'] / months:.2f} |")
    lines += ["", "| false notifications | count | per pipeline-month |", "|---|---|---|"]
    for kind, n in sorted(report.false_notifications.items()):
        lines.append(f"| {kind} | {n} | {n / pm:.2f} |")
    lines += ["", "| false alerts ≥ medium, by what was going on | count |", "|---|---|"]
    lines += [f"| {trap} | {n} |" for trap, n in report.false_by_trap.most_common()]
    return lines


def level_shift_table(report: Report) -> list[str]:
    lines = ["| level shift (deploy, durations x1.3) | alerts after it | notifications | by alert |",
             "|---|---|---|---|"]
    for row in report.level_shift:
        by = ", ".join(f"{k} {v}" for k, v in sorted(row["by_alert"].items())) or "-"
        lines.append(f"| {row['pipeline']} | {row['alerts']} | {row['notifications']} | {by} |")
    return lines


def targets(report: Report) -> list[tuple[str, str, bool]]:
    rs = report.incidents
    det = [r for r in rs if r.detected]
    recall = len(det) / len(rs) if rs else 0.0
    runs = _q([r.delay / r.label.interval for r in det], "median")
    fast = _q([r.delay / 60 for r in det if r.label.interval <= HOUR], "median")
    medium = sum(n for (_, sev), n in report.false_by_alert.items() if SEVERITY_RANK.get(sev, 2) >= 2)
    false_rate = medium / report.pipeline_months
    notes = [float(r.notifications) for r in rs]
    # the issue wants persisting states re-sent at the one-hour cooldown: a daily pipeline stale for two days
    # is then ~48 reminders of one page, so the max is also shown without them
    distinct = [float(r.notifications - r.reminders) for r in rs]
    over = sum(1 for r in det if r.linger is not None and r.linger > allowance(r.label))
    out = [
        ("recall ≥ 95%", f"{recall:.0%}", recall >= 0.95),
        ("median detection delay ≤ 1 run", _fmt(runs, 2), runs is not None and runs <= 1),
        ("median delay ≤ 15 min (pipelines running at least hourly)", _fmt(fast), fast is not None and fast <= 15),
        ("false alerts ≥ medium ≤ 1 per pipeline-month", f"{false_rate:.2f}", false_rate <= 1),
        ("notifications per incident: median ≤ 3", _fmt(_q(notes, "median"), 0), (_q(notes, "median") or 0) <= 3),
        ("notifications per incident: max ≤ 10", _fmt(_q(notes, "max"), 0), (_q(notes, "max") or 0) <= 10),
        ("notifications per incident, hourly reminders not counted: max ≤ 10", _fmt(_q(distinct, "max"), 0),
         (_q(distinct, "max") or 0) <= 10),
        ("no alert firing > 1 interval (≤ 1 h) after its incident", f"{over} incidents", over == 0),
    ]
    report.targets = out
    return out


def targets_table(report: Report) -> list[str]:
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'pass' if ok else 'FAIL'} |" for name, value, ok in targets(report)]
    return lines


def to_json(report: Report) -> dict:
    return {
        "incidents": [{"pipeline": r.label.pipeline, "type": r.label.kind, "start": r.label.start,
                       "end": r.label.end, "interval": r.label.interval, "detail": r.label.detail,
                       "detected": r.detected, "any_alert": r.any_alert, "delay_seconds": r.delay,
                       "alerts": r.alerts, "notifications": r.notifications, "reminders": r.reminders,
                       "resolved_notifications": r.resolved_notifications, "linger_seconds": r.linger,
                       "on_idle_pipeline": r.on_idle_pipeline}
                      for r in report.incidents],
        "pipeline_months": report.pipeline_months,
        "false_alerts": [{"alert": a, "severity": s, "count": n} for (a, s), n in report.false_by_alert.items()],
        "false_by_class": {k: dict(v) for k, v in report.false_by_class.items()},
        "false_notifications": dict(report.false_notifications),
        "false_by_trap": dict(report.false_by_trap),
        "level_shift": report.level_shift,
        "alerts_without_pipeline": [{"alert": a, "severity": s, "count": n}
                                    for (a, s), n in report.unlabelled_alerts.items()],
        "targets": [{"target": t, "measured": v, "pass": ok} for t, v, ok in report.targets],
    }
