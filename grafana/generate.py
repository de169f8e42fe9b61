"""Render pipemon's Grafana dashboards from code into grafana/dashboards/*.json.

    python grafana/generate.py          # write the JSON files
    python grafana/generate.py --check  # exit 1 if a committed file differs from the generator's output

Built with grafana-foundation-sdk (Grafana's own dashboards-as-code library, pinned in pyproject's `test` extra).
Every query goes through the `${datasource}` template variable, prefers the recording rules of
rules/pipemon.rules.yml and uses `$__rate_interval` in every rate() and increase().
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableHide,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from pipemon.render.rules import load_config

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
RULES_CONFIG = Path(__file__).resolve().parent.parent / "rules" / "config.yaml"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'job="pipemon"'
RULE = 'pipeline="$pipeline",team="$team"'  # recording rules carry no job label
PIPELINE = f"{JOB},{RULE}"
TAGS = ["pipemon"]
REF_IDS = "ABCDEFGHIJ"

# ---- building blocks ---------------------------------------------------------------------------------


@functools.cache
def _threshold_defaults() -> dict[str, float]:
    return load_config(RULES_CONFIG).thresholds  # validated, as the rules renderer reads it; read once


def threshold(*names: str) -> str:
    """The alert thresholds `names` in force for the dashboard's pipeline, one series each labelled
    `threshold`: the registry's override (`pipeline_alert_threshold`, a series only where one is set), else the
    default of rules/config.yaml, as the rules compare them (no recording holds them per pipeline)."""
    defaults = _threshold_defaults()
    matcher = f'threshold="{names[0]}"' if len(names) == 1 else f'threshold=~"{"|".join(names)}"'
    fallbacks = " or ".join(f'label_replace(vector({defaults[n]:g}), "threshold", "{n}", "", "")' for n in names)
    return f"(max by (threshold) (pipeline_alert_threshold{{{PIPELINE},{matcher}}}) or {fallbacks})"



def query(expr: str, legend: str = "", instant: bool = False, table_format: bool = False) -> prometheus.Dataquery:
    """One PromQL target against the `${datasource}` variable."""
    target = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    if legend:
        target = target.legend_format(legend)
    target = target.instant() if instant else target.range()
    if table_format:
        target = target.format(PromQueryFormat.TABLE)
    return target


def with_targets(panel: Any, targets: list[prometheus.Dataquery]) -> Any:
    """Attach targets with stable refIds A, B, C..."""
    return panel.targets([target.ref_id(ref) for ref, target in zip(REF_IDS, targets, strict=False)])


def steps(*pairs: tuple[float | None, str]) -> Builder:
    """Absolute thresholds: steps((None, "green"), (0.8, "red"))."""
    return dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=value, color=color) for value, color in pairs])


def graph(title: str, description: str, unit: str, targets: list[prometheus.Dataquery], span: int = 12,
          bars: bool = False, stacked: bool = False) -> timeseries.Panel:
    """A time series panel; `bars` for counts per interval, `stacked` to stack series."""
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(span).height(8).fill_opacity(10 if not bars else 80)
             .legend(common_builders.VizLegendOptions().show_legend(True)
                     .display_mode(common.LegendDisplayMode.LIST).placement(common.LegendPlacement.BOTTOM)))
    if bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS)
    if stacked:
        panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    return with_targets(panel, targets)


def single(title: str, description: str, unit: str, target: prometheus.Dataquery, span: int = 4,
           thresholds: Builder | None = None, mappings: list[ValueMap] | None = None) -> stat.Panel:
    """A stat panel showing the latest value of one instant query."""
    panel = (stat.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(span).height(4).color_mode(common.BigValueColorMode.BACKGROUND)
             .graph_mode(common.BigValueGraphMode.NONE)
             .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if thresholds is not None:
        panel = panel.thresholds(thresholds)
    if mappings:
        panel = panel.mappings(list(mappings))
    return with_targets(panel, [target])


def listing(title: str, description: str, unit: str, target: prometheus.Dataquery, span: int = 12,
            thresholds: Builder | None = None) -> table.Panel:
    """A table of one instant query, one row per series, without the time column."""
    panel = (table.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .span(span).height(8)
             .with_transformation(organize_excluding(["Time", "__name__", "job", "instance"])))
    if thresholds is not None:
        panel = panel.thresholds(thresholds)
    return with_targets(panel, [target])


def organize_excluding(fields: list[str]) -> DataTransformerConfig:
    return DataTransformerConfig(id_val="organize", options={"excludeByName": dict.fromkeys(fields, True)})


def fixed_colors(panel: timeseries.Panel, colors: dict[str, str]) -> timeseries.Panel:
    for name, color in colors.items():
        panel = panel.override_by_name(name, [DynamicConfigValue(id_val="color",
                                                                 value={"mode": "fixed", "fixedColor": color})])
    return panel


def datasource_variable() -> dash.DatasourceVariable:
    return dash.DatasourceVariable("datasource").label("Data source").type("prometheus")


def query_variable(name: str, label: str, expr: str) -> dash.QueryVariable:
    return (dash.QueryVariable(name).label(label).datasource(DATASOURCE)
            .query(expr)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC))


def base(uid: str, title: str, description: str) -> dash.Dashboard:
    return (dash.Dashboard(title).uid(uid).description(description).tags(TAGS).refresh("1m")
            .time("now-6h", "now").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
            .with_variable(datasource_variable())
            .link(dash.DashboardLink("pipemon").type("dashboards").tags(TAGS).as_dropdown(True)
                  .include_vars(False).keep_time(True)))


# ---- pipemon-overview ----------------------------------------------------------------------------------

OVERDUE = ("pipeline_team:pipeline_next_run:overdue_seconds > bool on (pipeline, team)"
           " pipeline_team:pipeline_next_run:grace_seconds")


def overview() -> dash.Dashboard:
    bad_when_positive = steps((None, "green"), (1, "red"))
    board = base("pipemon-overview", "pipemon / Overview",
                 "Every pipeline at a glance: firing alerts, success ratios, stale and failing pipelines.")
    board = (board
             .with_row(dash.Row("Now"))
             .with_panel(single("Firing alerts", "Alerts firing now, from Prometheus' ALERTS series.", "none",
                                query('count(ALERTS{alertstate="firing"}) or vector(0)', instant=True), span=6,
                                thresholds=bad_when_positive))
             .with_panel(single("Failing pipelines", "Pipelines whose latest run failed "
                                "(team:pipelines_failing:count).", "none",
                                query("sum(team:pipelines_failing:count)", instant=True), span=6,
                                thresholds=bad_when_positive))
             .with_panel(single("Stale pipelines", "Pipelines whose next run is overdue by more than its grace "
                                "(what PipelineStale alerts on, before runs in progress are left out).", "none",
                                query(f"sum({OVERDUE})", instant=True), span=6,
                                thresholds=bad_when_positive))
             .with_panel(single("Pipelines", "Pipelines with runs or listed in the registry (team:pipelines:count).",
                                "none", query("sum(team:pipelines:count)", instant=True), span=6,
                                thresholds=steps((None, "blue"))))
             .with_panel(listing("Firing alerts by team", "Firing alerts counted by team and severity.", "none",
                                 query('count by (team, severity, alertname) (ALERTS{alertstate="firing"})',
                                       instant=True, table_format=True), span=12))
             .with_panel(graph("Firing alerts by team", "Firing alerts over time, by the team that owns them.",
                               "none", [query('count by (team) (ALERTS{alertstate="firing"})', "{{team}}")],
                               bars=True, stacked=True)))
    return (board
            .with_row(dash.Row("Success"))
            .with_panel(graph("Success ratio by team (1h)", "Share of runs that succeeded over the last hour "
                              "(team:pipeline_runs:ratio_rate1h).", "percentunit",
                              [query("team:pipeline_runs:ratio_rate1h", "{{team}}")]).min(0).max(1))
            .with_panel(graph("Success ratio by pipeline (1h)", "Per pipeline "
                              "(pipeline_team:pipeline_runs:ratio_rate1h).", "percentunit",
                              [query("pipeline_team:pipeline_runs:ratio_rate1h", "{{pipeline}} ({{team}})")])
                        .min(0).max(1))
            .with_panel(graph("Runs per minute by status", "Finished runs per minute, every pipeline.", "none",
                              [query(f"sum by (status) (rate(pipeline_runs_total{{{JOB}}}[$__rate_interval])) * 60",
                                     "{{status}}")], stacked=True, span=24)
                        .override_by_name("success", [DynamicConfigValue(
                            id_val="color", value={"mode": "fixed", "fixedColor": "green"})])
                        .override_by_name("failure", [DynamicConfigValue(
                            id_val="color", value={"mode": "fixed", "fixedColor": "red"})]))
            .with_row(dash.Row("Stale and failing"))
            .with_panel(listing("Failing pipelines", "Pipelines whose latest runs failed, with the failure streak.",
                                "none", query(f"sort_desc(max by (pipeline, team) "
                                              f"(pipeline_consecutive_failures{{{JOB}}}) > 0)",
                                              instant=True, table_format=True),
                                thresholds=steps((None, "orange"), (3, "red"))))
            .with_panel(listing("Overdue runs, in grace periods", "How long each pipeline's next run is overdue, "
                                "divided by its grace (the schedule's, or half the expected interval; below 0: "
                                "not due yet); PipelineStale fires above 1.", "none",
                                query("sort_desc(pipeline_team:pipeline_next_run:overdue_seconds / on (pipeline, team)"
                                      " pipeline_team:pipeline_next_run:grace_seconds)",
                                      instant=True, table_format=True),
                                thresholds=steps((None, "green"), (0.5, "orange"), (1, "red")))))


# ---- pipemon-pipeline --------------------------------------------------------------------------------


def duration_panel() -> timeseries.Panel:
    return fixed_colors(graph(
        "Duration against its baseline", "Duration of the latest run, with the median of the recent successful runs "
        "it was judged against (of its seasonal slot) and 1.5× that: a run must be this slow, and beyond 2σ/3σ in "
        "log space, for PipelineDurationAnomaly.", "s", [
            query(f"pipeline_last_run_duration_seconds{{{PIPELINE}}}", "latest run"),
            query(f"pipeline_duration_baseline_seconds{{{PIPELINE}}}", "baseline median"),
            query(f"pipeline_duration_baseline_seconds{{{PIPELINE}}} * on () group_left () "
                  f"{threshold('duration_ratio_min')}", "smallest change alerted"),
        ]).fill_opacity(0), {"latest run": "blue", "baseline median": "text", "smallest change alerted": "orange"})


def zscore_panel() -> timeseries.Panel:
    return fixed_colors(graph(
        "Duration z-score", "How many (log-space, robust) standard deviations the latest successful run's duration "
        "lies from its baseline (pipeline_recent_runs_min_duration_zscore{runs=\"1\"}), against this pipeline's alert "
        "thresholds.", "none", [
            query(f'pipeline_recent_runs_min_duration_zscore{{{PIPELINE},runs="1"}}', "z-score"),
            query(threshold("duration_zscore_medium", "duration_zscore_high"), "{{threshold}}"),
        ]), {"z-score": "blue", "duration_zscore_medium": "orange", "duration_zscore_high": "red"})


def throughput_panel() -> timeseries.Panel:
    return fixed_colors(graph(
        "Records against their baseline", "Records of the latest run, with the median of the recent successful runs "
        "(PipelineVolumeLow fires far below it).", "none", [
            query(f"pipeline_last_run_records{{{PIPELINE}}}", "latest run"),
            query(f"pipeline_records_baseline{{{PIPELINE}}}", "baseline median"),
        ]).fill_opacity(0), {"latest run": "blue", "baseline median": "text"})


def throughput_ratio_panel() -> timeseries.Panel:
    return fixed_colors(graph(
        "Throughput / baseline", "The latest run's records per second as a share of its baseline's (records ratio "
        "over duration ratio); PipelineThroughputDrop fires below the threshold.", "percentunit", [
            query(f'pipeline_recent_runs_max_throughput_ratio{{{PIPELINE},runs="1"}}', "throughput ratio"),
            query(threshold("throughput_ratio_high"), "alert threshold"),
        ]), {"throughput ratio": "blue", "alert threshold": "red"}).min(0)


def pipeline_stats() -> list[stat.Panel]:
    outcome = [ValueMap(options={"1": ValueMappingResult(text="success", color="green"),
                                 "0": ValueMappingResult(text="failure", color="red")})]
    return [
        single("Latest run", "Outcome of the latest finished run.", "none",
               query(f"pipeline_last_run_success{{{PIPELINE}}}", instant=True), span=4, mappings=outcome),
        single("Failures in a row", "Failed runs since the last success.", "none",
               query(f"pipeline_consecutive_failures{{{PIPELINE}}}", instant=True), span=4,
               thresholds=steps((None, "green"), (1, "orange"), (3, "red"))),
        single("Success ratio (1d)", "pipeline_team:pipeline_runs:ratio_rate1d", "percentunit",
               query(f"pipeline_team:pipeline_runs:ratio_rate1d{{{RULE}}}", instant=True), span=4,
               thresholds=steps((None, "red"), (0.5, "orange"), (0.8, "green"))),
        single("Since last success", "Seconds since the latest successful run finished (none: it never"
               " succeeded).", "s",
               query(f"time() - max(pipeline_last_success_timestamp_seconds{{{PIPELINE}}} > 0)", instant=True), span=4,
               thresholds=steps((None, "blue"))),
        single("Runs in progress", "Runs started and not finished.", "none",
               query(f"pipeline_runs_in_progress{{{PIPELINE}}}", instant=True), span=4,
               thresholds=steps((None, "blue"))),
        single("Oldest run in progress", "Age of the oldest unfinished run; PipelineRunStuck fires above the "
               "pipeline's max runtime.", "s",
               query(f"pipeline_team:pipeline_oldest_run:age_seconds{{{RULE}}}", instant=True), span=4,
               thresholds=steps((None, "blue"))),
    ]


def pipeline() -> dash.Dashboard:
    board = (base("pipemon-pipeline", "pipemon / Pipeline",
                  "One pipeline in depth: duration and throughput against their baselines, records, outcomes.")
             .with_variable(query_variable("pipeline", "Pipeline", "label_values(pipeline_info, pipeline)"))
             .with_variable(query_variable("team", "Team", 'label_values(pipeline_info{pipeline="$pipeline"}, team)')
                            .hide(VariableHide.DONT_HIDE))
             .with_row(dash.Row("$pipeline ($team)")))
    for panel in pipeline_stats():
        board = board.with_panel(panel)
    return (board
            .with_panel(listing("Firing alerts", "Alerts firing now for this pipeline.", "none",
                                query(f'ALERTS{{alertstate="firing",{RULE}}}', instant=True, table_format=True),
                                span=24))
            .with_row(dash.Row("Duration"))
            .with_panel(duration_panel())
            .with_panel(zscore_panel())
            .with_row(dash.Row("Throughput and records"))
            .with_panel(throughput_panel())
            .with_panel(throughput_ratio_panel())
            .with_panel(graph("Records", "Records processed by the latest run, and by all runs per interval.",
                              "short", [
                                  query(f"pipeline_last_run_records{{{PIPELINE}}}", "latest run"),
                                  query(f"sum(increase(pipeline_records_processed_total{{{PIPELINE}}}"
                                        "[$__rate_interval]))", "processed per interval"),
                              ], span=24))
            .with_row(dash.Row("Runs"))
            .with_panel(fixed_colors(graph(
                "Run outcomes", "Finished runs per interval by status.", "none",
                [query(f"sum by (status) (increase(pipeline_runs_total{{{PIPELINE}}}[$__rate_interval]))",
                       "{{status}}")], bars=True, stacked=True), {"success": "green", "failure": "red"}))
            .with_panel(graph("Success ratio", "Share of successful runs over the last hour and day.",
                              "percentunit", [
                                  query(f"pipeline_team:pipeline_runs:ratio_rate1h{{{RULE}}}", "1h"),
                                  query(f"pipeline_team:pipeline_runs:ratio_rate1d{{{RULE}}}", "1d"),
                              ]).min(0).max(1)))


# ---- pipemon-exporter --------------------------------------------------------------------------------


def latency(metric: str, title: str, description: str) -> timeseries.Panel:
    bucket = f"sum by (le) (rate({metric}_bucket{{{JOB}}}[$__rate_interval]))"
    return graph(title, description, "s", [
        query(f"histogram_quantile(0.5, {bucket})", "p50"),
        query(f"histogram_quantile(0.99, {bucket})", "p99"),
        query(f"sum(rate({metric}_sum{{{JOB}}}[$__rate_interval])) / sum(rate({metric}_count{{{JOB}}}"
              "[$__rate_interval]))", "mean"),
    ])


def exporter() -> dash.Dashboard:
    up_mapping = [ValueMap(options={"1": ValueMappingResult(text="up", color="green"),
                                    "0": ValueMappingResult(text="down", color="red")})]
    return (base("pipemon-exporter", "pipemon / Exporter", "Health of the pipemon exporter itself.")
            .with_row(dash.Row("Status"))
            .with_panel(single("Up", "Whether Prometheus can scrape the exporter.", "none",
                               query(f"up{{{JOB}}}", instant=True), span=6, mappings=up_mapping))
            .with_panel(single("Pipelines tracked", "pipemon_pipelines", "none",
                               query(f"sum(pipemon_pipelines{{{JOB}}})", instant=True), span=6,
                               thresholds=steps((None, "blue"))))
            .with_panel(single("Storage errors (interval)", "Failed writes to the state database.", "none",
                               query(f"sum(increase(pipemon_storage_errors_total{{{JOB}}}[$__rate_interval]))",
                                     instant=True), span=6, thresholds=steps((None, "green"), (1, "red"))))
            .with_panel(single("Resident memory", "process_resident_memory_bytes", "bytes",
                               query(f"sum(process_resident_memory_bytes{{{JOB}}})", instant=True), span=6,
                               thresholds=steps((None, "blue"))))
            .with_row(dash.Row("Ingest"))
            .with_panel(graph("Events received", "Events per second by ingest endpoint.", "reqps", [
                query(f"sum by (endpoint) (rate(pipemon_events_received_total{{{JOB}}}[$__rate_interval]))",
                      "{{endpoint}}")], stacked=True))
            .with_panel(graph("Events rejected by reason", "Rejected events per second, by reason (reasons with no "
                              "rejections are hidden).", "reqps", [
                query(f"sum by (reason) (rate(pipemon_events_rejected_total{{{JOB}}}[$__rate_interval])) > 0",
                      "{{reason}}")], stacked=True))
            .with_panel(graph("Pipelines tracked", "pipemon_pipelines over time.", "none",
                              [query(f"pipemon_pipelines{{{JOB}}}", "pipelines")]))
            .with_panel(graph("Up", "Scrape success (1) or failure (0).", "none",
                              [query(f"up{{{JOB}}}", "{{instance}}")]).min(0).max(1))
            .with_row(dash.Row("Internals"))
            .with_panel(latency("pipemon_metrics_render_duration_seconds", "/metrics render time",
                                "Time to render /metrics (pipemon_metrics_render_duration_seconds)."))
            .with_panel(latency("pipemon_storage_commit_duration_seconds", "Storage commit time",
                                "Time to commit a group of records to SQLite "
                                "(pipemon_storage_commit_duration_seconds)."))
            .with_panel(graph("Storage errors", "Failed writes to the state database per second.", "reqps", [
                query(f"sum(rate(pipemon_storage_errors_total{{{JOB}}}[$__rate_interval]))", "storage errors")]))
            .with_panel(graph("CPU", "Exporter CPU use, in cores.", "none", [
                query(f"sum(rate(process_cpu_seconds_total{{{JOB}}}[$__rate_interval]))", "cpu")])))


# ---- rendering --------------------------------------------------------------------------------------

DASHBOARDS: dict[str, Callable[[], Builder]] = {
    "pipemon-overview": overview,
    "pipemon-pipeline": pipeline,
    "pipemon-exporter": exporter,
}


def number_panels(model: dict[str, Any]) -> dict[str, Any]:
    """Give every panel (rows included) a stable id, in layout order."""
    for number, panel in enumerate(model["panels"], start=1):
        panel["id"] = number
    return model


def render(uid: str) -> dict[str, Any]:
    """The dashboard `uid` as a JSON-ready dict."""
    model = json.loads(json.dumps(DASHBOARDS[uid]().build(), cls=JSONEncoder))
    return number_panels(model)


def render_text(uid: str) -> str:
    return json.dumps(render(uid), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_all() -> dict[str, str]:
    """File name → rendered JSON text, for every dashboard."""
    return {f"{uid}.json": render_text(uid) for uid in DASHBOARDS}


def write_all(directory: Path = DASHBOARDS_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_files(directory: Path = DASHBOARDS_DIR) -> list[str]:
    """Names of dashboard files that are missing or differ from the generator's output."""
    return [name for name, text in render_all().items()
            if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"out of date: grafana/dashboards/{name} (run python grafana/generate.py)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_all():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
