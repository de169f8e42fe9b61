"""Rule files for bench/prometheus_cost.py: where they come from, what history they read, their groups.

The history a rule set needs is found in the rule files themselves (range selectors such as `x[1d]` and
subqueries such as `(...)[1d:5m]`), so a new rule that reads a long window is backfilled without changing the
benchmark. A recorded series read over a long window needs its own history, which in turn needs the history
of what its rule reads: `history_plan` returns the raw series to generate and the recording rules to
backfill, in dependency order.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RULE_FILES = ("pipemon.rules.yml", "pipemon.alerts.yml")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# Words that are never metric names in PromQL (operators, modifiers, literals).
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan", "start", "end"}


def seconds(duration: str) -> float:
    """A Prometheus duration ("90s", "1h30m", "1d") in seconds."""
    parts = _DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass
class RuleSet:
    label: str  # how the report names it
    directory: Path  # holds RULE_FILES
    exporter_path: Path | None = None  # PYTHONPATH of the exporter to run; None: the working tree's
    groups: list[dict] = field(default_factory=list)

    def files(self) -> list[Path]:
        return [self.directory / name for name in RULE_FILES if (self.directory / name).exists()]

    def load(self) -> RuleSet:
        self.groups = [g for f in self.files() for g in (yaml.safe_load(f.read_text()) or {}).get("groups", [])]
        if not self.groups:
            raise ValueError(f"no rule groups in {self.directory}")
        return self

    def group_names(self) -> list[str]:
        return [g["name"] for g in self.groups]

    def interval(self, group: dict, default: str = "1m") -> float:
        return seconds(str(group.get("interval", default)))


def from_directory(directory: Path) -> RuleSet:
    return RuleSet(f"working tree ({directory})", directory).load()


def from_revision(repo: Path, rev: str, into: Path) -> RuleSet:
    """The rule files and the exporter as committed at `rev`, extracted under `into`: the landed rules run
    against the landed exporter, so series per pipeline and RSS are today's."""
    short = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], capture_output=True, text=True,
                           check=True).stdout.strip()
    rules = into / "rules"
    rules.mkdir(parents=True)
    for name in RULE_FILES:
        shown = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:rules/{name}"], capture_output=True)
        if shown.returncode == 0:
            (rules / name).write_bytes(shown.stdout)
    return RuleSet(f"landed ({short})", rules, exporter_path=exporter_at(repo, rev, into)).load()


def exporter_at(repo: Path, rev: str, into: Path) -> Path:
    """The exporter package as committed at `rev`, extracted under `into`; its PYTHONPATH entry. With it
    rules/config.yaml where the revision has it: the package links to it (pipemon/rules_config.yaml)."""
    into.mkdir(parents=True, exist_ok=True)
    paths = ["exporter"]
    listed = subprocess.run(["git", "-C", str(repo), "ls-tree", "--name-only", rev, "rules/config.yaml"],
                            capture_output=True, text=True, check=True).stdout
    if listed.strip():
        paths.append("rules/config.yaml")
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, *paths], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "exporter"


def same_files(a: RuleSet, b: RuleSet) -> bool:
    return [f.name for f in a.files()] == [f.name for f in b.files()] and all(
        x.read_bytes() == y.read_bytes() for x, y in zip(a.files(), b.files(), strict=True))


def with_interval(rule_set: RuleSet, interval: str, into: Path) -> RuleSet:
    """A copy of the rule set whose groups all evaluate every `interval` (short runs for the smoke test)."""
    into.mkdir(parents=True)
    for path in rule_set.files():
        doc = yaml.safe_load(path.read_text())
        for group in doc.get("groups", []):
            group["interval"] = interval
        (into / path.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return RuleSet(rule_set.label, into, rule_set.exporter_path).load()


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL fragment: identifiers that are not functions, keywords or label names."""
    expr = re.sub(r"\{[^}]*\}", "", _strip_strings(expr))
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        rest = expr[match.end():].lstrip()
        if match.group(0).lower() not in _KEYWORDS and not rest.startswith("(") and not _is_number(expr, match):
            names.add(match.group(0))
    return names


def _is_number(expr: str, match: re.Match[str]) -> bool:
    return match.start() > 0 and (expr[match.start() - 1].isdigit() or expr[match.start() - 1] == ".")


def _matching_open(expr: str, close: int) -> int:
    depth = 0
    for i in range(close, -1, -1):
        depth += {")": 1, "(": -1}.get(expr[i], 0)
        if depth == 0:
            return i
    return 0


def ranges_read(expr: str) -> dict[str, float]:
    """Each metric read over a range in `expr` and the longest range it is read over, in seconds.
    (A subquery `(...)[1d:5m]` reads every metric inside it over a day.)"""
    expr = _strip_strings(expr)
    found: dict[str, float] = {}
    for match in re.finditer(r"\[\s*([0-9a-z]+)\s*(:[^\]]*)?\]", expr):
        window = seconds(match.group(1))
        before = expr[:match.start()].rstrip()
        if before.endswith(")"):
            names = _metric_names(before[_matching_open(before, len(before) - 1):])
        else:
            before = re.sub(r"\{[^}]*\}$", "", before).rstrip()
            selector = re.search(r"[a-zA-Z_:][a-zA-Z0-9_:]*$", before)
            names = {selector.group(0)} if selector else set()
        for name in names:
            found[name] = max(found.get(name, 0.0), window)
    return found


@dataclass
class HistoryPlan:
    raw: set[str]  # exporter series to generate a history for
    recorded_levels: list[list[dict]]  # recording rules to backfill, level by level (each level reads only earlier)
    long_reads: dict[str, float]  # what the rules read over windows of at least the threshold
    short_reads: dict[str, float] = field(default_factory=dict)  # raw series the backfilled recordings read


def history_plan(rule_set: RuleSet, threshold: float) -> HistoryPlan:
    rules = [(g, r) for g in rule_set.groups for r in g.get("rules", [])]
    recording = {r["record"]: (g, r) for g, r in rules if "record" in r}
    long_reads: dict[str, float] = {}
    for _, rule in rules:
        for name, window in ranges_read(str(rule["expr"])).items():
            if window >= threshold:
                long_reads[name] = max(long_reads.get(name, 0.0), window)
    raw, needed, todo = set(), set(), list(long_reads)
    short_reads: dict[str, float] = {}
    while todo:  # what the backfilled recordings read needs history too, at any range
        name = todo.pop()
        if name not in recording:
            raw.add(name)
        elif name not in needed:
            needed.add(name)
            expr = str(recording[name][1]["expr"])
            todo.extend(_metric_names(expr))
            for read, window in ranges_read(expr).items():
                if read not in recording:
                    short_reads[read] = min(short_reads.get(read, window), window)
    return HistoryPlan(raw, _levels(needed, recording), long_reads, short_reads)


def _levels(needed: set[str], recording: dict[str, tuple[dict, dict]]) -> list[list[dict]]:
    """Recording rules grouped so that each level reads only raw series and earlier levels (as groups
    with their interval, ready for `promtool tsdb create-blocks-from rules`)."""
    levels: list[list[dict]] = []
    done: set[str] = set()
    while needed - done:
        ready = {n for n in needed - done if not (_metric_names(str(recording[n][1]["expr"])) & (needed - done - {n}))}
        if not ready:
            raise ValueError(f"recording rules read each other in a cycle: {sorted(needed - done)}")
        groups: dict[str, dict] = {}
        for name in sorted(ready):
            group, _ = recording[name]
            out = groups.setdefault(group["name"], {"name": group["name"], "interval": group.get("interval", "1m"),
                                                    "rules": []})
            out["rules"].extend(r for r in group["rules"] if r.get("record") == name)
        levels.append(list(groups.values()))
        done |= ready
    return levels
