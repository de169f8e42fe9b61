"""A model of Alertmanager's dispatcher (0.25) driven by the alert episodes: route tree, aggregation groups with
group_wait / group_interval / repeat_interval, inhibition at flush time, the notification log's dedup rules
(notify/notify.go needsUpdate) and which receivers send resolved notifications.

Simplifications: Prometheus' sends arrive at the instant an alert fires or resolves; one notification per
receiver per flush (a receiver with Slack and a webhook counts once); silences do not exist.
"""

from __future__ import annotations

import bisect
import heapq
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from detection.prom import Episode, parse_duration

MATCHER = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"?(.*?)"?\s*$')
DEFAULT_SEND_RESOLVED = {"slack_configs": False, "webhook_configs": True, "pagerduty_configs": True,
                         "email_configs": False, "opsgenie_configs": True, "victorops_configs": True,
                         "pushover_configs": True, "wechat_configs": False, "telegram_configs": True,
                         "sns_configs": True, "webex_configs": True, "discord_configs": True,
                         "msteams_configs": True}
MAINTENANCE = 30.0  # the dispatcher removes empty groups every 30 s


@dataclass
class Matcher:
    name: str
    op: str
    value: str

    def matches(self, labels: dict[str, str]) -> bool:
        v = labels.get(self.name, "")
        if self.op == "=":
            return v == self.value
        if self.op == "!=":
            return v != self.value
        hit = re.fullmatch(self.value, v) is not None
        return hit if self.op == "=~" else not hit


def parse_matchers(route: dict, prefix: str = "") -> list[Matcher]:
    out = []
    for text in route.get(f"{prefix}matchers", []) or []:
        m = MATCHER.match(text)
        if not m:
            raise ValueError(f"cannot parse matcher {text!r}")
        out.append(Matcher(m.group(1), m.group(2), m.group(3).replace('\\"', '"')))
    out += [Matcher(k, "=", str(v)) for k, v in (route.get(f"{prefix}match") or {}).items()]
    out += [Matcher(k, "=~", str(v)) for k, v in (route.get(f"{prefix}match_re") or {}).items()]
    return out


@dataclass
class Route:
    id: str
    receiver: str
    matchers: list[Matcher]
    group_by: list[str] | None  # None: `...`, every label
    group_wait: float
    group_interval: float
    repeat_interval: float
    cont: bool
    children: list[Route] = field(default_factory=list)

    def match(self, labels: dict[str, str]) -> list[Route]:
        if not all(m.matches(labels) for m in self.matchers):
            return []
        found: list[Route] = []
        for child in self.children:
            hits = child.match(labels)
            found += hits
            if hits and not child.cont:
                break
        return found or [self]


def build_route(node: dict, parent: Route | None, path: str) -> Route:
    def inherit(key: str, default: float) -> float:
        if key in node:
            return parse_duration(node[key])
        return getattr(parent, key) if parent else default

    group_by = node.get("group_by", parent.group_by if parent else [])
    if group_by is not None and "..." in group_by:
        group_by = None
    route = Route(path, node.get("receiver") or (parent.receiver if parent else ""), parse_matchers(node),
                  group_by, inherit("group_wait", 30), inherit("group_interval", 300),
                  inherit("repeat_interval", 4 * 3600), bool(node.get("continue", False)))
    route.children = [build_route(child, route, f"{path}/{i}") for i, child in enumerate(node.get("routes") or [])]
    return route


@dataclass
class InhibitRule:
    source: list[Matcher]
    target: list[Matcher]
    equal: list[str]


@dataclass
class Config:
    root: Route
    inhibit: list[InhibitRule]
    send_resolved: dict[str, bool]


def load_config(path: Path) -> Config:
    doc = yaml.safe_load(path.read_text())
    send_resolved = {}
    for receiver in doc.get("receivers", []):
        flags = [bool(cfg.get("send_resolved", DEFAULT_SEND_RESOLVED.get(kind, True)))
                 for kind, cfgs in receiver.items() if kind.endswith("_configs") for cfg in cfgs or []]
        send_resolved[receiver["name"]] = any(flags)
    inhibit = [InhibitRule(parse_matchers(r, "source_"), parse_matchers(r, "target_"), list(r.get("equal") or []))
               for r in doc.get("inhibit_rules") or []]
    return Config(build_route(doc["route"], None, "root"), inhibit, send_resolved)


# ---- the dispatcher ----------------------------------------------------------------------------------


@dataclass
class Notification:
    time: float
    receiver: str
    group: tuple
    firing: list[Episode]
    resolved: list[Episode]
    repeat: bool = False  # sent again only because repeat_interval passed (a reminder, nothing changed)

    @property
    def is_resolved(self) -> bool:
        return not self.firing


class _Timeline:
    """When each alert (label set) fires: sorted episodes, for "is it firing at t" lookups."""

    def __init__(self, episodes: list[Episode]) -> None:
        self.by_key: dict[tuple, list[Episode]] = {}
        for ep in sorted(episodes, key=lambda e: e.start):
            self.by_key.setdefault(ep.key(), []).append(ep)
        self.starts = {k: [e.start for e in eps] for k, eps in self.by_key.items()}

    def at(self, key: tuple, t: float) -> Episode | None:
        """The episode of this alert that is firing at t, else the latest one that ended before t."""
        i = bisect.bisect_right(self.starts[key], t) - 1
        return self.by_key[key][i] if i >= 0 else None


def _firing(ep: Episode | None, t: float) -> bool:
    return ep is not None and ep.start <= t and (ep.open or t < ep.end)


class Dispatcher:
    def __init__(self, config: Config, episodes: list[Episode]) -> None:
        self.config = config
        self.timeline = _Timeline(episodes)
        self.episodes = episodes
        self.labels = {ep.key(): ep.labels for ep in episodes}
        self.nflog: dict[tuple, tuple] = {}  # (group key, receiver) -> (firing keys, resolved keys, time)
        # inhibition sources by rule: equal-label values -> alert keys matching the source side
        self.sources: list[dict[tuple, list[tuple]]] = []
        for rule in config.inhibit:
            index: dict[tuple, list[tuple]] = {}
            for key, labels in self.labels.items():
                if all(m.matches(labels) for m in rule.source):
                    index.setdefault(tuple(labels.get(n, "") for n in rule.equal), []).append(key)
            self.sources.append(index)

    def inhibited(self, key: tuple, t: float) -> bool:
        labels = self.labels[key]
        for rule, index in zip(self.config.inhibit, self.sources, strict=True):
            if not all(m.matches(labels) for m in rule.target):
                continue
            two_sided = all(m.matches(labels) for m in rule.source)
            for source in index.get(tuple(labels.get(n, "") for n in rule.equal), []):
                if source == key or (two_sided and all(m.matches(self.labels[source]) for m in rule.target)):
                    continue
                if _firing(self.timeline.at(source, t), t):
                    return True
        return False

    def run(self, end: float) -> list[Notification]:
        # (time, order, kind, payload): payload is an alert key for "arrive", the _Group for "flush"
        queue: list[tuple[float, int, str, object]] = [
            (ep.start, i, "arrive", ep.key()) for i, ep in enumerate(sorted(self.episodes, key=lambda e: e.start))]
        heapq.heapify(queue)
        order = len(queue)
        groups: dict[tuple, _Group] = {}
        out: list[Notification] = []
        while queue:
            t, _, kind, payload = heapq.heappop(queue)
            if t > end:
                break
            if kind == "arrive":
                for route in self.config.root.match(self.labels[payload]):
                    gkey = (route.id, self._group_labels(route, self.labels[payload]))
                    group = groups.get(gkey)
                    if group is None or group.dead(t):
                        group = groups[gkey] = _Group(route, gkey)
                        heapq.heappush(queue, (t + route.group_wait, order, "flush", group))
                        order += 1
                    group.alerts.add(payload)
                    group.empty_since = None
                continue
            group = payload
            if groups.get(group.key) is not group or group.dead(t):
                continue  # removed by the maintenance; a newer group has its own timer
            note = self._flush(group, t)
            if note is not None:
                out.append(note)
            if not group.alerts and group.empty_since is None:
                group.empty_since = t
            heapq.heappush(queue, (t + group.route.group_interval, order, "flush", group))
            order += 1
        return out

    @staticmethod
    def _group_labels(route: Route, labels: dict[str, str]) -> tuple:
        if route.group_by is None:
            return tuple(sorted(labels.items()))
        return tuple((n, labels.get(n, "")) for n in route.group_by)

    def _flush(self, group: _Group, t: float) -> Notification | None:
        firing, resolved = [], []
        for key in sorted(group.alerts):
            ep = self.timeline.at(key, t)
            if ep is None or self.inhibited(key, t):
                continue
            (firing if _firing(ep, t) else resolved).append(ep)
        # resolved alerts leave the group after the flush, muted or not
        group.alerts = {k for k in group.alerts if _firing(self.timeline.at(k, t), t)}
        f_keys = {e.key() for e in firing}
        r_keys = {e.key() for e in resolved}
        receiver = group.route.receiver
        log_key = (group.key, receiver)
        entry = self.nflog.get(log_key)
        if not self._needs_update(entry, receiver, group.route, f_keys, r_keys, t):
            return None
        repeat = entry is not None and bool(firing) and not self._needs_update(
            entry, receiver, replace(group.route, repeat_interval=math.inf), f_keys, r_keys, t)
        self.nflog[log_key] = (f_keys, r_keys, t)
        if not firing and not self.config.send_resolved.get(receiver, False):
            return None  # logged as notified, nothing sent
        return Notification(t, receiver, group.key, firing, resolved, repeat)

    def _needs_update(self, entry: tuple | None, receiver: str, route: Route, firing: set, resolved: set,
                      t: float) -> bool:
        if entry is None:
            return bool(firing)
        last_firing, last_resolved, last_t = entry
        if not firing <= last_firing:
            return True
        if not firing:
            return bool(last_firing)
        if self.config.send_resolved.get(receiver, False) and not resolved <= last_resolved:
            return True
        return last_t < t - route.repeat_interval


@dataclass
class _Group:
    route: Route
    key: tuple
    alerts: set = field(default_factory=set)
    empty_since: float | None = None

    def dead(self, t: float) -> bool:
        """Removed by the dispatcher's maintenance: empty for a maintenance period."""
        return not self.alerts and self.empty_since is not None and t >= self.empty_since + MAINTENANCE
