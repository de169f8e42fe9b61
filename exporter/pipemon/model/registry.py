"""The pipeline ownership registry (`pipelines.yaml`): which team owns a pipeline, and what to expect of it.

Pipelines are matched by exact name first, then by glob pattern in file order (first match wins).
Errors name the file and line of the offending entry.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from pipemon.model import schedule as cron
from pipemon.model.durations import parse_duration

UNOWNED_TEAM = "unowned"
SCHEDULE_REFERENCE = 1704067200.0  # Monday 2024-01-01 00:00 UTC: where a schedule's "every N" is read
# `(?![\s\S])` ends the string for good: `$` would also match before a final newline ("abc\n").
TEAM_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}(?![\s\S])"
# Printable text without control characters; label values stay readable and bounded.
PIPELINE_NAME_PATTERN = r"^[^\x00-\x1f\x7f]+(?![\s\S])"
PIPELINE_NAME_MAX = 200

TeamName = Annotated[str, msgspec.Meta(pattern=TEAM_NAME_PATTERN)]
Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
Duration = str | int | float
Url = Annotated[str, msgspec.Meta(pattern=r"^https?://\S+$")]


class ThresholdOverrides(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Per-pipeline alert thresholds; each field overrides the default of the same name in `rules/config.yaml`."""

    success_ratio_medium: Ratio | None = None
    success_ratio_high: Ratio | None = None
    duration_zscore_medium: PositiveFloat | None = None
    duration_zscore_high: PositiveFloat | None = None
    duration_ratio_min: Annotated[float, msgspec.Meta(ge=1)] | None = None
    duration_ratio_high: Annotated[float, msgspec.Meta(ge=1)] | None = None
    throughput_ratio_high: Ratio | None = None
    throughput_zscore_high: PositiveFloat | None = None
    volume_zscore_high: PositiveFloat | None = None
    volume_ratio_high: Ratio | None = None
    failed_runs_low: Count | None = None
    consecutive_failures_critical: Count | None = None
    failing_seconds_critical: PositiveFloat | None = None
    min_runs: Count | None = None
    min_baseline_samples: Count | None = None
    stale_grace_factor: Annotated[float, msgspec.Meta(ge=1)] | None = None

    def items(self) -> dict[str, float]:
        return {name: float(value) for name, value in msgspec.structs.asdict(self).items() if value is not None}


THRESHOLD_NAMES: tuple[str, ...] = ThresholdOverrides.__struct_fields__


class Team(msgspec.Struct, forbid_unknown_fields=True):
    """A team and where its alerts go. Secrets are never in this file: only paths to files that hold them."""

    description: str = ""
    slack_channel: str | None = None
    slack_webhook_url_file: str | None = None
    pagerduty_routing_key_file: str | None = None
    webhook_url: Url | None = None


class Defaults(msgspec.Struct, forbid_unknown_fields=True):
    tier: str = "standard"
    # Until pipemon has learned a pipeline's interval from its own runs (entries without `expected_interval`
    # or `schedule`), it expects this one.
    expected_interval: Duration = "1d"
    max_runtime: Duration = "2h"
    schedule_grace: Duration = "15m"
    runbook_url: Url | None = None

    def __post_init__(self) -> None:
        parse_duration(self.expected_interval)
        parse_duration(self.max_runtime)
        parse_duration(self.schedule_grace)


class PipelineEntry(msgspec.Struct, forbid_unknown_fields=True):
    match: Annotated[str, msgspec.Meta(min_length=1, max_length=PIPELINE_NAME_MAX, pattern=PIPELINE_NAME_PATTERN)]
    team: TeamName
    tier: str | None = None
    expected_interval: Duration | None = None
    schedule: str | None = None  # cron, 5 fields, UTC: a run is due at each fire time
    schedule_grace: Duration | None = None  # how late a scheduled run may show up before PipelineStale
    max_runtime: Duration | None = None
    runbook_url: Url | None = None
    thresholds: ThresholdOverrides | None = None
    # OpenLineage: the child jobs of this pipeline's runs (a DAG's tasks, dbt models, Dagster steps) become
    # pipelines of their own instead of being folded into its runs.
    track_children: bool = False

    def __post_init__(self) -> None:
        for value in (self.expected_interval, self.max_runtime):
            if value is not None and parse_duration(value) <= 0:
                raise ValueError("expected_interval and max_runtime must be longer than zero")
        if self.schedule_grace is not None:
            parse_duration(self.schedule_grace)
        if self.schedule is not None:
            cron.check(self.schedule)

    @property
    def is_pattern(self) -> bool:
        return any(ch in self.match for ch in "*?[")


class RegistryFile(msgspec.Struct, forbid_unknown_fields=True):
    teams: dict[str, Team]  # names checked in _check_references, for an error that names the team
    pipelines: list[PipelineEntry] = []
    defaults: Defaults = msgspec.field(default_factory=Defaults)
    # accept: tracked as `unowned` (or the team their events name); ignore: answered 200 `ignored` and counted in
    # pipemon_events_ignored_total; reject: answered 422 and counted in pipemon_events_rejected_total.
    unknown_pipelines: Literal["accept", "ignore", "reject"] = "accept"


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """What the registry says about one concrete pipeline."""

    name: str
    team: str
    tier: str
    expected_interval_seconds: float  # the registry's, the schedule's, or the fallback until one is learned
    max_runtime_seconds: float
    runbook_url: str | None
    thresholds: dict[str, float] = field(default_factory=dict)
    registered: bool = True
    expected_interval_explicit: bool = False  # False: pipemon learns the interval from the pipeline's runs
    schedule: str | None = None
    schedule_grace_seconds: float = 900.0
    track_children: bool = False
    entry: str = ""  # the `match` of the registry entry this spec comes from ("" for unknown pipelines)


class RegistryError(ValueError):
    """An invalid registry file; the message names the file and line."""


class Registry:
    """A loaded registry: resolves pipeline names to their spec."""

    def __init__(self, source: RegistryFile, path: str = "<registry>") -> None:
        self.path = path
        self.source = source
        self.teams: dict[str, Team] = dict(source.teams)
        self._exact: dict[str, PipelineEntry] = {}
        self._patterns: list[tuple[re.Pattern[str], PipelineEntry]] = []
        for entry in source.pipelines:
            if entry.is_pattern:
                self._patterns.append((re.compile(fnmatch.translate(entry.match)), entry))
            else:
                self._exact[entry.match] = entry
        self._cache: dict[str, PipelineSpec | None] = {}

    @property
    def accepts_unknown(self) -> bool:
        return self.source.unknown_pipelines == "accept"

    @property
    def ignores_unknown(self) -> bool:
        return self.source.unknown_pipelines == "ignore"

    def registered_specs(self) -> list[PipelineSpec]:
        """Specs of the pipelines named exactly: their series exist before their first run."""
        return [self._spec(name, entry) for name, entry in self._exact.items()]

    def lookup(self, name: str) -> PipelineSpec | None:
        """The spec of a pipeline, `unowned` for an unknown one, or None when unknown ones are ignored or
        rejected."""
        try:
            return self._cache[name]
        except KeyError:
            pass
        entry = self._exact.get(name) or next((e for rx, e in self._patterns if rx.match(name)), None)
        if entry is not None:
            spec: PipelineSpec | None = self._spec(name, entry)
        elif self.accepts_unknown:
            spec = self.default_spec(name)
        else:
            spec = None
        if len(self._cache) < 100_000:
            self._cache[name] = spec
        return spec

    def _spec(self, name: str, entry: PipelineEntry) -> PipelineSpec:
        d = self.source.defaults
        if entry.expected_interval is not None:
            interval = parse_duration(entry.expected_interval)
        elif entry.schedule is not None:
            interval = cron.typical_interval(entry.schedule, SCHEDULE_REFERENCE)
        else:
            interval = parse_duration(d.expected_interval)
        return PipelineSpec(
            name=name,
            team=entry.team,
            tier=entry.tier or d.tier,
            expected_interval_seconds=interval,
            max_runtime_seconds=parse_duration(entry.max_runtime or d.max_runtime),
            runbook_url=entry.runbook_url or d.runbook_url,
            thresholds=entry.thresholds.items() if entry.thresholds else {},
            expected_interval_explicit=entry.expected_interval is not None or entry.schedule is not None,
            schedule=entry.schedule,
            schedule_grace_seconds=parse_duration(entry.schedule_grace or d.schedule_grace),
            track_children=entry.track_children,
            entry=entry.match,
        )

    def default_spec(self, name: str, team: str = UNOWNED_TEAM) -> PipelineSpec:
        """The spec of a pipeline the registry does not list."""
        d = self.source.defaults
        return PipelineSpec(
            name=name,
            team=team,
            tier=d.tier,
            expected_interval_seconds=parse_duration(d.expected_interval),
            max_runtime_seconds=parse_duration(d.max_runtime),
            runbook_url=d.runbook_url,
            registered=False,
        )


def load_registry(path: str | Path) -> Registry:
    """Load and validate a registry file; raises RegistryError with `file:line: message`."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read registry: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{path}: the registry is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return parse_registry(text, path)


def parse_registry(text: str, path: str = "<registry>") -> Registry:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RegistryError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{path}:1: the registry must be a mapping with at least a `teams:` key")
    try:
        source = msgspec.convert(data, RegistryFile)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).rpartition(" - at `")
        if not message:
            message, where = str(exc), ""
        where = where.rstrip("`")
        raise RegistryError(f"{path}:{_line_of(root, where)}: {message} (at {where or '$'})") from exc
    _check_references(source, root, path)
    return Registry(source, path)


def _check_references(source: RegistryFile, root: yaml.Node, path: str) -> None:
    for team in source.teams:
        if not re.match(TEAM_NAME_PATTERN, team):
            raise RegistryError(f"{path}:{_line_of(root, f'$.teams.{team}')}: team name {team!r} must be lower-case"
                                " letters, digits, '-' or '_' (it becomes part of receiver names)")
    seen: set[str] = set()
    for i, entry in enumerate(source.pipelines):
        where = f"$.pipelines[{i}]"
        if entry.team == UNOWNED_TEAM:
            raise RegistryError(f"{path}:{_line_of(root, where)}: team `{UNOWNED_TEAM}` is reserved for unknown"
                                " pipelines")
        if entry.team not in source.teams:
            raise RegistryError(
                f"{path}:{_line_of(root, where + '.team')}: pipeline `{entry.match}` names team `{entry.team}`,"
                f" which is not under `teams:` (known: {', '.join(sorted(source.teams)) or 'none'})"
            )
        if entry.match in seen:
            raise RegistryError(f"{path}:{_line_of(root, where)}: pipeline `{entry.match}` is listed twice")
        seen.add(entry.match)
    if UNOWNED_TEAM in source.teams:
        raise RegistryError(f"{path}:{_line_of(root, '$.teams')}: team `{UNOWNED_TEAM}` is reserved for unknown"
                            " pipelines")


def _line_of(root: yaml.Node | None, where: str) -> int:
    """The 1-based line of the YAML node at a msgspec error path such as `$.pipelines[3].team`."""
    node: Any = root
    line = 1
    for key in re.findall(r"\.([^.\[]+)|\[(\d+)\]", where.removeprefix("$")):
        name, index = key
        child = None
        if isinstance(node, yaml.MappingNode) and name:
            child = next((v for k, v in node.value if getattr(k, "value", None) == name), None)
        elif isinstance(node, yaml.SequenceNode) and index and int(index) < len(node.value):
            child = node.value[int(index)]
        if child is None:
            break
        node = child
        line = node.start_mark.line + 1
    if node is root and root is not None:
        line = root.start_mark.line + 1
    return line
