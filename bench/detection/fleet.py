"""A seeded fleet of pipelines and their run histories, with labelled incidents and labelled benign traps.

Everything here is plain data: the same seed and arguments give the same fleet, runs, incidents and traps.
Times are Unix seconds (UTC). A run's volume drives both its records and its duration (a bigger load takes
longer), on top of per-pipeline noise; weekly, hour-of-day, drift and holiday factors scale the volume.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

MINUTE, HOUR, DAY, WEEK = 60.0, 3600.0, 86400.0, 7 * 86400.0
CLASSES: dict[str, float] = {"5m": 300, "15m": 900, "30m": 1800, "1h": 3600, "6h": 21600, "1d": 86400}
# Order in which schedule classes are handed out: a small fleet still gets every class early.
CLASS_CYCLE = ("5m", "1h", "1d", "15m", "30m", "6h", "5m", "1d", "1h", "15m", "1d", "5m", "30m", "1h", "6h",
               "15m", "1d", "1h")
TEAMS = ("data-eng", "analytics", "ml-platform", "finance")
INCIDENT_TYPES = ("outage", "degradation", "slowdown", "throughput_drop", "volume_drop", "zero_records",
                  "stopped", "missed_run", "stuck")
RECORDS_INCIDENTS = {"throughput_drop", "volume_drop", "zero_records"}


@dataclass
class Pipeline:
    name: str
    team: str
    klass: str
    interval: float
    weekdays_only: bool
    registration: str  # "schedule" (cron), "interval" (expected_interval) or "learned" (neither)
    minute: int
    hour: int
    base_duration: float
    sigma: float  # log-space spread of a run's duration
    beta: float  # duration ~ volume ** beta
    base_records: float | None  # None: the pipeline does not report records
    weekend_factor: float
    hour_amp: float
    hour_peak: float
    drift: float  # volume growth per week
    fail_rate: float
    retries: bool
    grace: float  # schedule grace written to the registry
    max_runtime: float = 0.0  # set from the simulated history (an honest operator's setting)
    # Idle runs (a benign trap): an incremental load with nothing new finishes quickly with 0 records, at random
    # (this share of runs) or, for `idle_at_night`, most runs between 00:00 and 06:00. Set apart from the other
    # draws (simulate_fleet), so the fleet's other runs, incidents and traps are those of the same seed without.
    idle_share: float = 0.0
    idle_at_night: bool = False

    @property
    def has_idle_runs(self) -> bool:
        return bool(self.idle_share or self.idle_at_night)

    def cron(self) -> str:
        dow = "1-5" if self.weekdays_only else "*"
        m, h = self.minute, self.hour
        if self.klass in ("5m", "15m", "30m"):
            return f"{m}-59/{int(self.interval // 60)} * * * {dow}"
        if self.klass == "1h":
            return f"{m} * * * {dow}"
        if self.klass == "6h":
            return f"{m} {h}-23/6 * * {dow}"
        return f"{m} {h} * * {dow}"

    def longest_gap(self) -> float:
        """The longest regular gap between two runs (a weekday-only pipeline skips the weekend)."""
        return self.interval + (2 * DAY if self.weekdays_only else 0.0)

    def phase(self) -> float:
        return self.minute * MINUTE + (self.hour * HOUR if self.klass in ("6h", "1d") else 0.0)


@dataclass
class Run:
    pipeline: str
    run_id: str
    start: float
    end: float  # for a stuck run: when it is finally killed (reported as failed)
    success: bool
    records: int | None
    tag: str = ""  # incident or trap type that shaped this run


@dataclass
class Label:
    """An incident or a benign trap on one pipeline, from `start` to `end`."""

    pipeline: str
    kind: str
    start: float
    end: float
    interval: float
    detail: str = ""


@dataclass
class Fleet:
    pipelines: list[Pipeline]
    runs: list[Run]
    incidents: list[Label]
    traps: list[Label]
    start: float
    end: float
    eval_start: float
    holiday: tuple[float, float] | None = None
    holiday_teams: tuple[str, ...] = ()
    hour_peaks: dict[str, float] = field(default_factory=dict)


# ---- the fleet ---------------------------------------------------------------------------------------


def parse_end(text: str) -> float:
    """`--end` of the benches: a Unix time or an ISO 8601 time (UTC unless it says), not in the future."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a Unix time or an ISO 8601 time, got {text!r}") from exc
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    if at.timestamp() > time.time():
        raise argparse.ArgumentTypeError(f"{text!r} is in the future: the exporter refuses future events")
    return at.timestamp()


def make_pipelines(n: int, rng: random.Random) -> list[Pipeline]:
    return [_pipeline(i, rng) for i in range(n)]


def _pipeline(i: int, rng: random.Random) -> Pipeline:
    klass = CLASS_CYCLE[i % len(CLASS_CYCLE)]
    interval = CLASSES[klass]
    team = TEAMS[i % len(TEAMS)]
    weekdays_only = klass in ("1h", "1d") and rng.random() < 0.3
    registration = ("interval", "schedule", "learned")[i % 3]
    sigma = rng.uniform(0.05, 0.5)
    # Durations as a share of the interval: frequent jobs use more of theirs than daily ones.
    share = {"5m": (0.08, 0.3), "15m": (0.05, 0.3), "30m": (0.05, 0.25), "1h": (0.03, 0.2), "6h": (0.01, 0.1),
             "1d": (0.005, 0.06)}[klass]
    base_duration = max(8.0, interval * rng.uniform(*share))
    frequent = interval <= HOUR
    return Pipeline(
        name=f"{team.split('-')[0]}_{klass}_{i:02d}", team=team, klass=klass, interval=interval,
        weekdays_only=weekdays_only, registration=registration,
        minute=rng.randrange(int(min(interval, HOUR) // MINUTE)), hour=rng.randrange(6 if klass == "6h" else 24),
        base_duration=base_duration, sigma=sigma, beta=rng.uniform(0.6, 1.0),
        base_records=None if rng.random() < 0.15 else 10 ** rng.uniform(3, 7),
        weekend_factor=rng.uniform(0.5, 0.85) if rng.random() < 0.7 else 1.0,
        hour_amp=rng.uniform(0.3, 1.0) if frequent and rng.random() < 0.5 else 0.0,
        hour_peak=rng.choice((2.0, 3.0, 14.0)),
        drift=rng.uniform(0.05, 0.10) if rng.random() < 0.3 else 0.0,
        fail_rate=rng.uniform(0.01, 0.03), retries=rng.random() < 0.5,
        grace=min(30 * MINUTE, max(2 * MINUTE, 0.3 * interval)),
    )


def due_times(p: Pipeline, start: float, end: float) -> list[float]:
    first = math.floor(start / p.interval) * p.interval + p.phase() % p.interval
    if p.klass == "1d":
        first = math.floor(start / DAY) * DAY + p.phase()
    dues = []
    t = first
    while t < end:
        if t >= start and not (p.weekdays_only and _weekday(t) >= 5):
            dues.append(t)
        t += p.interval
    return dues


def _weekday(t: float) -> int:
    return int((t // DAY + 3) % 7)  # 1970-01-01 was a Thursday (3)


def _hour(t: float) -> float:
    return (t % DAY) / HOUR


# ---- one pipeline's history --------------------------------------------------------------------------


@dataclass
class _Plan:
    """Incidents and traps placed on one pipeline, by due index."""

    incidents: dict[int, tuple[str, int, dict]] = field(default_factory=dict)  # first index -> (type, n, extra)
    slow_once: set[int] = field(default_factory=set)
    shift_at: float | None = None
    backfill_after: int | None = None
    quiet: set[int] = field(default_factory=set)  # no transient failures or late starts here


class _History:
    def __init__(self, p: Pipeline, fleet_start: float, rng: random.Random, holiday: tuple[float, float] | None,
                 holiday_teams: tuple[str, ...], idle_rng: random.Random | None = None) -> None:
        self.p, self.rng, self.fleet_start = p, rng, fleet_start
        self.idle_rng = idle_rng or random.Random(0)  # its own stream: idle runs draw nothing from `rng`
        self.holiday = holiday if p.team in holiday_teams else None
        self.runs: list[Run] = []
        self.traps: list[Label] = []

    def volume(self, t: float) -> float:
        p = self.p
        v = 1.0
        if _weekday(t) >= 5:
            v *= p.weekend_factor
        if p.hour_amp:
            dist = min(abs(_hour(t) - p.hour_peak), 24 - abs(_hour(t) - p.hour_peak))
            v *= 1 + p.hour_amp * math.exp(-((dist / 2.0) ** 2))
        v *= (1 + p.drift) ** ((t - self.fleet_start) / WEEK)
        if self.holiday and self.holiday[0] <= t < self.holiday[1]:
            v *= 0.6
        return v

    def normal(self, due: float, run_id: str, duration_factor: float = 1.0, start: float | None = None) -> Run:
        p, rng = self.p, self.rng
        v = self.volume(due) * math.exp(rng.gauss(0, 0.6 * p.sigma))
        duration = p.base_duration * v ** p.beta * math.exp(rng.gauss(0, 0.8 * p.sigma)) * duration_factor
        start = due + rng.uniform(0, min(60.0, 0.05 * p.interval)) if start is None else start
        records = None if p.base_records is None else round(p.base_records * v * math.exp(rng.gauss(0, 0.03)))
        return Run(p.name, run_id, start, start + duration, True, records)

    def is_idle(self, due: float) -> bool:
        p = self.p
        if p.idle_at_night:
            return _hour(due) < 6 and self.idle_rng.random() < 0.8
        return self.idle_rng.random() < p.idle_share

    def failed(self, run: Run, tag: str) -> Run:
        run.end = run.start + (run.end - run.start) * self.rng.uniform(0.05, 0.9)
        run.success, run.records, run.tag = False, None, tag
        return run


def simulate_pipeline(p: Pipeline, plan: _Plan, start: float, end: float, rng: random.Random,
                      holiday: tuple[float, float] | None, holiday_teams: tuple[str, ...],
                      eval_start: float, idle_rng: random.Random | None = None
                      ) -> tuple[list[Run], list[Label], list[Label]]:
    h = _History(p, start, rng, holiday, holiday_teams, idle_rng)
    dues = due_times(p, start, end)
    incidents: list[Label] = []
    k = 0
    while k < len(dues):
        if k in plan.incidents:
            kind, n, extra = plan.incidents[k]
            incidents.append(_incident(h, kind, dues, k, n, extra, end))
            k = _resume_index(h, dues, k + n)
            continue
        _regular_run(h, plan, dues, k, eval_start)
        k += 1
    for inc in incidents:
        inc.end = _incident_end(inc, h.runs, end)
    return h.runs, incidents, h.traps


def _resume_index(h: _History, dues: list[float], k: int) -> int:
    """The first due index whose slot is free again (a stuck, blocked run holds its pipeline)."""
    last_end = max((r.end for r in h.runs[-3:] if r.tag == "stuck_blocking"), default=None)
    while last_end is not None and k < len(dues) and dues[k] < last_end:
        k += 1
    return k


def _regular_run(h: _History, plan: _Plan, dues: list[float], k: int, eval_start: float) -> None:
    p, rng, due = h.p, h.rng, dues[k]
    factor = 1.3 if plan.shift_at is not None and due >= plan.shift_at else 1.0
    quiet = k in plan.quiet
    start = None
    if not quiet and rng.random() < 0.02:
        start = due + rng.uniform(0.3, 0.8) * min(p.grace, 0.4 * p.interval)
    if k in plan.slow_once:
        factor *= rng.uniform(1.3, 1.6)
    run = h.normal(due, str(int(due)), factor, start)
    if start is not None and due >= eval_start:
        h.traps.append(Label(p.name, "late_start", due, run.end, p.interval, f"{start - due:.0f}s late"))
    if k in plan.slow_once:
        run.tag = "slow_once"
        h.traps.append(Label(p.name, "slow_once", run.start, run.end, p.interval))
    elif p.has_idle_runs and not quiet and h.is_idle(due):
        run.end = run.start + (run.end - run.start) * h.idle_rng.uniform(0.1, 0.3)
        run.records, run.tag = 0, "idle"
        if due >= eval_start:
            h.traps.append(Label(p.name, "idle_run", run.start, run.end, p.interval))
    if not quiet and rng.random() < p.fail_rate:
        h.failed(run, "transient")
        h.runs.append(run)
        if p.retries and rng.random() < 0.9:
            retry_start = run.end + rng.uniform(30, min(300, 0.3 * p.interval))
            retry = h.normal(due, f"{int(due)}-retry1", factor, retry_start)
            h.runs.append(retry)
            h.traps.append(Label(p.name, "failure_retried", run.start, retry.end, p.interval))
        else:
            h.traps.append(Label(p.name, "transient_failure", run.start, run.end, p.interval))
    else:
        h.runs.append(run)
    if plan.backfill_after == k:
        _backfill(h, run.end)


def _backfill(h: _History, at: float) -> None:
    """Re-running historical partitions: a burst of back-to-back runs of normal size."""
    t = at + h.rng.uniform(60, 600)
    first = t
    for i in range(h.rng.randint(12, 30)):
        run = h.normal(t, f"backfill-{int(first)}-{i}", start=t)
        run.tag = "backfill"
        h.runs.append(run)
        t = run.end + h.rng.uniform(5, 30)
    h.traps.append(Label(h.p.name, "backfill", first, t, h.p.interval))


def _incident(h: _History, kind: str, dues: list[float], k: int, n: int, extra: dict, end: float) -> Label:
    p, rng = h.p, h.rng
    label = Label(p.name, kind, dues[k], dues[k], p.interval)
    affected = dues[k:k + n]
    if kind in ("stopped", "missed_run"):
        label.detail = f"{len(affected)} runs not started"
        return label
    if kind == "stuck":
        run = h.normal(dues[k], str(int(dues[k])))
        run.end = min(run.start + 3 * extra["max_runtime"], end + DAY)
        run.success, run.records = False, None
        run.tag = "stuck_blocking" if extra["blocked"] else "stuck"
        label.start, label.end = run.start, run.end
        label.detail = "blocks its pipeline" if extra["blocked"] else "other runs continue"
        h.runs.append(run)
        return label
    factor = rng.uniform(*{"slowdown": (2, 5), "throughput_drop": (2.5, 4), "volume_drop": (3, 10),
                           "zero_records": (0.05, 0.4)}.get(kind, (1, 1)))
    fail_p = rng.uniform(0.3, 0.7)
    label.detail = {"degradation": f"{fail_p:.0%} of runs fail", "outage": f"{len(affected)} runs fail"}.get(
        kind, f"x{factor:.2f}" if kind != "volume_drop" else f"/{factor:.1f}")
    failures = 0
    for i, due in enumerate(affected):
        run = h.normal(due, str(int(due)))
        if kind == "outage" or (kind == "degradation" and (rng.random() < fail_p or (i == len(affected) - 1
                                                                                     and failures < 2))):
            h.failed(run, kind)
            failures += 1
        elif kind in ("slowdown", "throughput_drop"):
            run.end = run.start + (run.end - run.start) * factor
        elif kind == "volume_drop":
            run.end = run.start + (run.end - run.start) / factor
            run.records = max(1, round((run.records or 0) / factor))
        elif kind == "zero_records":
            run.end = run.start + (run.end - run.start) * factor
            run.records = 0
        run.tag = run.tag or kind
        h.runs.append(run)
        label.end = max(label.end, run.end)
    return label


def _incident_end(inc: Label, runs: list[Run], end: float) -> float:
    """When the incident's symptom is over, as seen from outside. Run-shaped incidents end with their last
    affected run (set by _incident); failing, missing and blocked runs end when a run succeeds again."""
    if inc.kind in ("outage", "stopped", "missed_run") or inc.detail == "blocks its pipeline":
        after = inc.end if inc.kind == "stuck" else inc.start
        return min((r.end for r in runs if r.start >= after and r.success), default=end)
    return inc.end


# ---- placing incidents and traps ---------------------------------------------------------------------


def _span(kind: str, p: Pipeline, rng: random.Random) -> int:
    iv = p.interval
    if kind == "outage":
        return min(36, max(rng.randint(2, 4), math.ceil(rng.uniform(1.5, 3) * HOUR / iv)))
    if kind == "degradation":
        return max(6, math.ceil(rng.uniform(4, 8) * HOUR / iv))
    if kind == "stopped":
        return 2 if p.klass == "1d" else max(3, math.ceil(rng.uniform(2, 6) * HOUR / iv))
    if kind == "missed_run":
        return rng.choice((1, 1, 2))
    if kind == "stuck":
        return 1
    return rng.randint(1, 2) if iv >= 6 * HOUR else min(12, max(2, math.ceil(rng.uniform(0.5, 2) * HOUR / iv)))


def _eligible(kind: str, p: Pipeline) -> bool:
    if kind in RECORDS_INCIDENTS and p.base_records is None:
        return False
    return not (kind == "degradation" and p.interval > HOUR)


def plan_fleet(pipelines: list[Pipeline], types: tuple[str, ...], per_type: int, start: float, end: float,
               eval_start: float, rng: random.Random) -> dict[str, _Plan]:
    plans = {p.name: _Plan() for p in pipelines}
    busy: dict[str, list[tuple[float, float]]] = {p.name: [] for p in pipelines}
    counts = dict.fromkeys(busy, 0)
    for round_ in range(per_type):
        for t_index, kind in enumerate(types):
            candidates = [p for p in pipelines if _eligible(kind, p)]
            if not candidates:
                continue
            # Rotate over schedule classes so every type meets fast and slow pipelines.
            offset = (round_ * len(types) + t_index) % len(candidates)
            ordered = sorted(candidates[offset:] + candidates[:offset], key=lambda p: counts[p.name])
            for p in ordered:
                if _place(kind, p, plans[p.name], busy[p.name], start, end, eval_start, rng):
                    counts[p.name] += 1
                    break
    _place_traps(pipelines, plans, busy, start, end, eval_start, rng)
    return plans


def _place(kind: str, p: Pipeline, plan: _Plan, busy: list[tuple[float, float]], start: float, end: float,
           eval_start: float, rng: random.Random) -> bool:
    dues = due_times(p, start, end)
    n = _span(kind, p, rng)
    margin = max(DAY, 3 * p.longest_gap())
    for _ in range(40):
        k = rng.randrange(len(dues))
        if dues[k] < eval_start + 2 * HOUR or k + n + 3 >= len(dues):
            continue
        lo, hi = dues[k], dues[k + n] + (4 * HOUR if kind == "stuck" else 0)
        if dues[k + n + 2] > end - max(6 * HOUR, 2 * p.interval):
            continue
        if any(lo - margin < b and a < hi + margin for a, b in busy):
            continue
        extra = {"max_runtime": 0.0, "blocked": rng.random() < 0.5} if kind == "stuck" else {}
        plan.incidents[k] = (kind, n, extra)
        plan.quiet.update(range(max(0, k - 2), k + n + 3))
        busy.append((lo, hi))
        return True
    return False


def _place_traps(pipelines: list[Pipeline], plans: dict[str, _Plan], busy: dict[str, list[tuple[float, float]]],
                 start: float, end: float, eval_start: float, rng: random.Random) -> None:
    for p in pipelines:
        dues = due_times(p, start, end)
        ks = [k for k, d in enumerate(dues) if d >= eval_start and not any(a - DAY < d < b + DAY
                                                                           for a, b in busy[p.name])]
        if ks and rng.random() < 0.35:
            plans[p.name].slow_once.add(rng.choice(ks))
    shifted = [p for p in pipelines if p.klass in ("15m", "1h", "6h")][: max(1, len(pipelines) // 25)]
    for p in shifted:
        plans[p.name].shift_at = eval_start + rng.uniform(0.1, 0.3) * (end - eval_start)
    backfilled = [p for p in pipelines if p.klass in ("1h", "6h") and p not in shifted][: max(1, len(pipelines) // 30)]
    for p in backfilled:
        plans[p.name].backfill_after = -1  # resolved to an index in simulate_fleet


def simulate_fleet(n_pipelines: int, days: float, warmup_days: float, seed: int, end: float,
                   types: tuple[str, ...] = INCIDENT_TYPES, per_type: int | None = None) -> Fleet:
    rng = random.Random(seed)
    start = end - days * DAY
    eval_start = start + warmup_days * DAY
    pipelines = make_pipelines(n_pipelines, rng)
    if per_type is None:
        per_type = max(1, round(n_pipelines * (days - warmup_days) / 140))
    plans = plan_fleet(pipelines, types, per_type, start, end, eval_start, rng)
    holiday, holiday_teams = _holiday(eval_start, end, rng)
    _set_max_runtimes(pipelines, start, end, seed)
    _set_idle(pipelines, random.Random(f"{seed}/idle"))
    runs, incidents, traps = [], [], []
    for p in pipelines:
        plan = plans[p.name]
        for k, (kind, n, extra) in plan.incidents.items():
            if kind == "stuck":
                extra["max_runtime"] = p.max_runtime
                plan.incidents[k] = (kind, n, extra)
        if plan.backfill_after == -1:
            dues = due_times(p, start, end)
            ks = [k for k, d in enumerate(dues) if eval_start + 0.4 * (end - eval_start) < d < end - DAY
                  and not any(abs(d - dues[j]) < 2 * DAY for j in plan.incidents)]
            plan.backfill_after = rng.choice(ks) if ks else None
        p_runs, p_incidents, p_traps = simulate_pipeline(p, plan, start, end, random.Random(f"{seed}/{p.name}"),
                                                         holiday, holiday_teams, eval_start,
                                                         random.Random(f"{seed}/{p.name}/idle"))
        runs += p_runs
        incidents += p_incidents
        traps += p_traps
        if plan.shift_at is not None:
            traps.append(Label(p.name, "level_shift", plan.shift_at, end, p.interval, "durations x1.3 from here"))
        if holiday and p.team in holiday_teams:
            traps.append(Label(p.name, "holiday", holiday[0], holiday[1], p.interval, "volume x0.6"))
    return Fleet(pipelines, runs, incidents, traps, start, end, eval_start, holiday, holiday_teams)


def _set_idle(pipelines: list[Pipeline], rng: random.Random) -> None:
    """A quarter of the pipelines that report records get idle runs: 3–12% of their runs at random, or
    (pipelines running at least hourly, half of them) most runs of the night. Zero records are then usual for
    them, and their records incidents (a real drop, a real stop of loading) must still be told apart from an
    idle run: a zero-records incident at night on a pipeline idle most nights may be undetectable."""
    for p in pipelines:
        if p.base_records is None or rng.random() >= 0.25:
            continue
        if p.interval <= HOUR and rng.random() < 0.5:
            p.idle_at_night = True
        else:
            p.idle_share = rng.uniform(0.03, 0.12)


def _holiday(eval_start: float, end: float, rng: random.Random) -> tuple[tuple[float, float] | None, tuple[str, ...]]:
    days = [d for d in range(math.ceil(eval_start / DAY), math.floor(end / DAY) - 1) if _weekday(d * DAY) < 5]
    if not days:
        return None, ()
    d = rng.choice(days) * DAY
    return (d, d + DAY), tuple(rng.sample(TEAMS, 2))


def _set_max_runtimes(pipelines: list[Pipeline], start: float, end: float, seed: int) -> None:
    """max_runtime as an operator would set it: 1.5 x the longest healthy run of a quiet rehearsal history,
    rounded up to a minute (runs of a slowdown may exceed it; healthy ones do not)."""
    for p in pipelines:
        h = _History(p, start, random.Random(f"{seed}/{p.name}/rehearsal"), None, ())
        longest = max(h.normal(d, "x").end - d for d in due_times(p, start, end))
        p.max_runtime = math.ceil(1.5 * longest / MINUTE) * MINUTE
