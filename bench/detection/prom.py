"""Rules evaluated by the real Prometheus tools: backfill the scraped samples with promtool, serve them with a real
Prometheus, materialise the recording rules with `promtool tsdb create-blocks-from rules` (one pass per dependency
level), then evaluate each alerting rule's expr with query_range and apply `for:` / `keep_firing_for:` as the
rule manager does.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.procs import free_port, running

TOKEN = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
RANGE = re.compile(r"\[\s*([0-9smhdwy]+)\s*(?::\s*[0-9smhdwy]*\s*)?\]")
OFFSET = re.compile(r"\boffset\s+(-?[0-9smhdwy]+)")
DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
DENSITY_FUNCTIONS = re.compile(r"\b(avg|count|sum|quantile|stddev|stdvar)_over_time\b|\b(irate|idelta|deriv|"
                               r"predict_linear|holt_winters)\s*\(")
MAX_POINTS = 10_000  # Prometheus refuses query_range with more than 11,000 points per series


def parse_duration(text: str | None) -> float:
    if not text:
        return 0.0
    return sum(int(n) * UNITS[u] for n, u in DURATION_PART.findall(str(text)))


@dataclass
class Rule:
    group: str
    interval: float
    body: dict  # the rule as written
    level: int = 0

    @property
    def name(self) -> str:
        return self.body.get("record") or self.body["alert"]

    @property
    def is_alert(self) -> bool:
        return "alert" in self.body

    def tokens(self) -> set[str]:
        return set(TOKEN.findall(self.body["expr"]))

    def lookback(self) -> float:
        """The longest range or offset the expr reads back, plus the 5 min lookback of instant selectors."""
        expr = self.body["expr"]
        ranges = [parse_duration(m) for m in RANGE.findall(expr)] + [parse_duration(m) for m in OFFSET.findall(expr)]
        return max(ranges, default=0.0) + 300


@dataclass
class RuleSet:
    rules: list[Rule]
    files: list[str] = field(default_factory=list)

    @property
    def recording(self) -> list[Rule]:
        return [r for r in self.rules if not r.is_alert]

    @property
    def alerting(self) -> list[Rule]:
        return [r for r in self.rules if r.is_alert]

    def for_alerts(self) -> RuleSet:
        """The alerting rules and the recording rules they read, directly or through other recording rules
        (dashboard-only rules change no alert, and their long windows would cost days of extra scrapes)."""
        producers: dict[str, list[Rule]] = {}
        for rule in self.recording:
            producers.setdefault(rule.name, []).append(rule)
        needed: list[Rule] = []
        todo = list(self.alerting)
        while todo:
            rule = todo.pop()
            if any(rule is r for r in needed):
                continue
            needed.append(rule)
            todo += [p for name in rule.tokens() & producers.keys() for p in producers[name]]
        return RuleSet([r for r in self.rules if any(r is n for n in needed)], self.files)

    def sample_density_matters(self) -> bool:
        """Whether an expr aggregates samples over time in a way that depends on how many were scraped (then
        every scrape is written, not only changes plus a snapshot every few minutes)."""
        return any(DENSITY_FUNCTIONS.search(r.body["expr"]) for r in self.rules)

    def referenced_names(self) -> set[str]:
        names: set[str] = set()
        for rule in self.rules:
            names |= rule.tokens()
        return names


def load_rules(rules_dir: Path, default_interval: float = 60.0) -> RuleSet:
    """Every rule file of a directory (files with `groups:`), groups in file order; recording rules get their
    dependency level (0: reads only scraped series)."""
    rules: list[Rule] = []
    files = []
    for path in sorted(rules_dir.glob("*.y*ml")):
        doc = yaml.safe_load(path.read_text())
        if not isinstance(doc, dict) or "groups" not in doc:
            continue
        files.append(path.name)
        for group in doc["groups"]:
            interval = parse_duration(group.get("interval")) or default_interval
            rules += [Rule(group["name"], interval, body) for body in group.get("rules", [])]
    _set_levels(rules)
    return RuleSet(rules, files)


def _set_levels(rules: list[Rule]) -> None:
    producers: dict[str, list[Rule]] = {}
    for rule in rules:
        if not rule.is_alert:
            producers.setdefault(rule.name, []).append(rule)
    for _ in range(len(rules) + 1):
        changed = False
        for rule in rules:
            deps = [p for name in rule.tokens() & producers.keys() for p in producers[name] if p is not rule]
            level = 1 + max((p.level for p in deps), default=-1)
            if level != rule.level:
                rule.level, changed = level, True
        if not changed:
            return
    raise ValueError("recording rules depend on each other in a cycle")


def needed_starts(rules: RuleSet, alert_start: float) -> tuple[dict[int, float], float]:
    """From when each level of recording rules must exist, and from when scraped samples must exist, for the
    alerting rules to be evaluated from `alert_start` on."""
    levels = sorted({r.level for r in rules.recording}, reverse=True)
    consumers = rules.alerting
    start_of = {id(r): alert_start for r in consumers}
    by_level: dict[int, float] = {}
    for level in levels:
        produced = [r for r in rules.recording if r.level == level]
        names = {r.name for r in produced}
        need = min((start_of[id(c)] - c.lookback() for c in consumers if c.tokens() & names), default=alert_start)
        by_level[level] = need
        for r in produced:
            start_of[id(r)] = need
        consumers = consumers + produced
    raw = min((start_of[id(r)] - r.lookback() for r in rules.rules), default=alert_start)
    return by_level, raw


# ---- Prometheus ---------------------------------------------------------------------------------------


class Prometheus:
    """A real Prometheus on 127.0.0.1 serving the blocks of `data` (restarted to pick up new blocks)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.data = work / "prom-data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = work / "prometheus.yml"
        self.config.write_text("global:\n  evaluation_interval: 1m\nscrape_configs: []\n")
        self.port = 0

    @contextlib.contextmanager
    def serving(self) -> Iterator[Prometheus]:
        self.port = free_port()
        cmd = ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={self.data}",
               "--storage.tsdb.retention.time=3650d", f"--web.listen-address=127.0.0.1:{self.port}",
               "--query.max-samples=200000000", "--log.level=warn"]
        with running(cmd, f"{self.url}/-/ready", self.work / "prometheus.log", timeout=120):
            yield self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_blocks(self, directory: Path) -> int:
        moved = 0
        for block in directory.iterdir():
            if block.is_dir() and (block / "meta.json").exists():
                shutil.move(str(block), self.data / block.name)
                moved += 1
        return moved

    def query_range(self, expr: str, start: float, end: float, step: float) -> dict[tuple, dict[float, float]]:
        """label set (sorted items, without __name__) -> {timestamp: value}, in chunks Prometheus accepts."""
        out: dict[tuple, dict[float, float]] = {}
        t = start
        while t <= end:
            chunk_end = min(end, t + step * (MAX_POINTS - 1))
            data = urllib.parse.urlencode({"query": expr, "start": t, "end": chunk_end, "step": step}).encode()
            with urllib.request.urlopen(f"{self.url}/api/v1/query_range", data, timeout=600) as resp:
                body = json.loads(resp.read())
            if body.get("status") != "success":
                raise RuntimeError(f"query_range failed: {body}")
            for series in body["data"]["result"]:
                labels = tuple(sorted((k, v) for k, v in series["metric"].items() if k != "__name__"))
                points = out.setdefault(labels, {})
                for ts, value in series["values"]:
                    points[float(ts)] = float(value)
            t = chunk_end + step
        return out


def backfill_openmetrics(om_file: Path, blocks: Path) -> None:
    blocks.mkdir(parents=True, exist_ok=True)
    _run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "--max-block-duration=1000h", "-q",
          str(om_file), str(blocks)])


def _block_duration(rules: list[Rule]) -> str:
    """The largest block duration promtool may use so that one block's query_range stays under Prometheus'
    11,000-point limit (promtool queries each block's span in one go; block sizes are 2h x powers of 3)."""
    shortest = min(r.interval for r in rules)
    hours = 2
    while hours * 3 * 3600 / shortest < MAX_POINTS:
        hours *= 3
    return f"{hours}h"


def materialise_level(prom: Prometheus, rules: RuleSet, level: int, start: float, end: float, work: Path) -> int:
    """Backfill one dependency level of recording rules; returns the blocks written (Prometheus must restart)."""
    chosen = [r for r in rules.recording if r.level == level]
    groups: dict[str, dict] = {}
    for rule in chosen:
        groups.setdefault(rule.group, {"name": rule.group, "interval": f"{int(rule.interval)}s", "rules": []})
        groups[rule.group]["rules"].append(rule.body)
    rule_file = work / f"level{level}.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": list(groups.values())}, sort_keys=False))
    out = work / f"level{level}-blocks"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    _run(["promtool", "tsdb", "create-blocks-from", "rules", f"--url={prom.url}", f"--start={int(start)}",
          f"--end={int(end)}", f"--output-dir={out}", f"--max-block-duration={_block_duration(chosen)}", "-q",
          str(rule_file)])
    return sum(1 for b in out.iterdir() if b.is_dir())


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({out.returncode}):\n{out.stdout[-2000:]}\n"
                           f"{out.stderr[-3000:]}")


# ---- alerting rules --------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One alert from firing to resolved (or still firing at the end: `open`)."""

    alertname: str
    labels: dict[str, str]
    active_at: float
    start: float  # fired
    end: float  # resolved (Prometheus' ResolvedAt), or the end of the evaluation when `open`
    open: bool = False
    incident: int | None = None  # index of the incident it belongs to, None: false alert

    @property
    def severity(self) -> str:
        return self.labels.get("severity", "")

    @property
    def pipeline(self) -> str | None:
        return self.labels.get("pipeline")

    def key(self) -> tuple:
        return tuple(sorted(self.labels.items()))


def evaluate_alert(prom: Prometheus, rule: Rule, start: float, end: float) -> list[Episode]:
    step = rule.interval
    grid_start = math.floor(start / step) * step + 30 if step >= 60 else math.floor(start / step) * step
    result = prom.query_range(rule.body["expr"], grid_start, end, step)
    extra = {k: str(v) for k, v in (rule.body.get("labels") or {}).items()}
    hold = parse_duration(rule.body.get("for"))
    keep = parse_duration(rule.body.get("keep_firing_for"))
    grid = [grid_start + k * step for k in range(int((end - grid_start) // step) + 1)]
    episodes = []
    for labels, points in result.items():
        alert_labels = dict(labels) | extra | {"alertname": rule.name}
        episodes += apply_for(rule.name, alert_labels, points, grid, hold, keep)
    return episodes


def apply_for(name: str, labels: dict[str, str], points: dict[float, float], grid: list[float], hold: float,
              keep: float) -> list[Episode]:
    """Prometheus' alert state machine (rules/alerting.go, 2.42) over one series' presence on the grid."""
    episodes: list[Episode] = []
    active_at: float | None = None
    fired_at: float | None = None
    keep_since: float | None = None
    for ts in grid:
        if ts in points:
            keep_since = None
            if active_at is None:
                active_at = ts
            if fired_at is None and ts - active_at >= hold:
                fired_at = ts
            continue
        if active_at is None:
            continue
        if fired_at is not None and keep > 0:
            keep_since = ts if keep_since is None else keep_since
            if ts - keep_since < keep:
                continue
        if fired_at is not None:
            episodes.append(Episode(name, labels, active_at, fired_at, ts))
        active_at = fired_at = keep_since = None
    if fired_at is not None and active_at is not None:
        episodes.append(Episode(name, labels, active_at, fired_at, grid[-1], open=True))
    return episodes
