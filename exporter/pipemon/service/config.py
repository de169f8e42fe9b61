"""Settings of `pipemon serve`: command-line flags, each backed by a `PIPEMON_*` environment variable."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipemon.backends import is_postgres_url
from pipemon.model.state import DEFAULT_DURATION_BUCKETS, format_buckets, parse_buckets
from pipemon.openlineage.converter import check_name_template


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 9464
    registry: Path | None = None
    state_dir: Path = Path("pipemon-state")
    state: str = ""  # a postgresql:// URL: state in PostgreSQL, shared by replicas (else SQLite in state_dir)
    tokens: Path | None = None
    web_config: Path | None = None
    log_level: str = "info"
    max_pipelines: int = 20_000
    max_body_bytes: int = 10 * 1024 * 1024
    max_clock_skew: float = 300.0
    storage_sync: str = "normal"
    enable_lifecycle: bool = False
    access_log: bool = False
    baseline_size: int = 30
    history_size: int = 336
    dedup_window: int = 1000
    recent_runs: int = 50
    abandon_after_factor: float = 3.0
    sweep_interval: float = 30.0
    lineage_pipeline_name: str = "{name}"
    # the web UI (issue 15)
    rules_config: Path | None = None  # thresholds' defaults; None: the copy shipped with the package
    alertmanager_urls: tuple[str, ...] = ()
    prometheus_url: str | None = None
    protect_reads: bool = False
    duration_buckets: str = format_buckets(DEFAULT_DURATION_BUCKETS)


# flag, env var, config field, type, help
_OPTIONS: tuple[tuple[str, str, str, type, str], ...] = (
    ("--listen", "PIPEMON_LISTEN", "listen", str, "host:port to listen on"),
    ("--registry", "PIPEMON_REGISTRY", "registry", Path, "ownership registry (pipelines.yaml)"),
    ("--state-dir", "PIPEMON_STATE_DIR", "state_dir", Path, "directory of the SQLite state"),
    ("--state", "PIPEMON_STATE", "state", str,
     "postgresql://user@host:port/db: keep the state in PostgreSQL (replicas may share it) instead of --state-dir"),
    ("--tokens", "PIPEMON_TOKENS", "tokens", Path, "tokens file; without one, writes are open to anyone"),
    ("--web-config", "PIPEMON_WEB_CONFIG", "web_config", Path,
     "exporter-toolkit web config: TLS (tls_server_config) and basic auth on /metrics (basic_auth_users)"),
    ("--log-level", "PIPEMON_LOG_LEVEL", "log_level", str, "debug, info, warning or error"),
    ("--max-pipelines", "PIPEMON_MAX_PIPELINES", "max_pipelines", int, "cap on tracked pipelines"),
    ("--max-body-bytes", "PIPEMON_MAX_BODY_BYTES", "max_body_bytes", int, "largest request body accepted"),
    ("--max-clock-skew", "PIPEMON_MAX_CLOCK_SKEW", "max_clock_skew", float,
     "seconds an event's timestamp may lie in the future"),
    ("--storage-sync", "PIPEMON_STORAGE_SYNC", "storage_sync", str,
     "normal: acknowledged events survive a crash of pipemon; full: also a power loss (slower)"),
    ("--baseline-size", "PIPEMON_BASELINE_SIZE", "baseline_size", int,
     "successful runs (of the same seasonal slot) a run is judged against"),
    ("--history-size", "PIPEMON_HISTORY_SIZE", "history_size", int,
     "successful runs kept per pipeline to learn baselines and seasonality from"),
    ("--dedup-window", "PIPEMON_DEDUP_WINDOW", "dedup_window", int,
     "run ids remembered per pipeline to recognise retries"),
    ("--recent-runs", "PIPEMON_RECENT_RUNS", "recent_runs", int,
     "runs of any outcome kept per pipeline for the web UI and GET /api/v1/pipelines/NAME/runs"),
    ("--abandon-after-factor", "PIPEMON_ABANDON_AFTER_FACTOR", "abandon_after_factor", float,
     "a run in progress for this many max runtimes is abandoned and counted as failed"),
    ("--sweep-interval", "PIPEMON_SWEEP_INTERVAL", "sweep_interval", float,
     "seconds between two looks for abandoned runs"),
    ("--rules-config", "PIPEMON_RULES_CONFIG", "rules_config", Path,
     "rules config whose thresholds and schedule classes the web UI judges pipelines by (default: the copy of"
     " rules/config.yaml shipped with pipemon)"),
    ("--prometheus-url", "PIPEMON_PROMETHEUS_URL", "prometheus_url", str,
     "Prometheus the web UI links to for a pipeline's graphs"),
    ("--lineage-pipeline-name", "PIPEMON_LINEAGE_PIPELINE_NAME", "lineage_pipeline_name", str,
     "pipeline name of an OpenLineage job, from {name} and {namespace}, e.g. '{namespace}/{name}'"),
    ("--duration-buckets", "PIPEMON_DURATION_BUCKETS", "duration_buckets", str,
     "upper bounds (seconds, comma-separated) of pipeline_run_duration_seconds, e.g. 60,300,900,3600,10800;"
     " each is a series per pipeline; none: only +Inf, _sum and _count"),
)
_SWITCHES = (
    ("--enable-lifecycle", "PIPEMON_ENABLE_LIFECYCLE", "enable_lifecycle", "allow POST /-/reload"),
    ("--access-log", "PIPEMON_ACCESS_LOG", "access_log", "log every request"),
    ("--protect-reads", "PIPEMON_PROTECT_READS", "protect_reads",
     "every read (web UI, /api/v1/pipelines*, /metrics) needs a token of --tokens; a team's token reads only"
     " its team's pipelines"),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeConfig()
    for flag, env, field, _type, help_text in _OPTIONS:
        default = f"{defaults.host}:{defaults.port}" if field == "listen" else getattr(defaults, field)
        parser.add_argument(flag, dest=field, default=os.environ.get(env, default),
                            help=f"{help_text} (env {env}; default {default})")
    for flag, env, field, help_text in _SWITCHES:
        parser.add_argument(flag, dest=field, action="store_true",
                            default=os.environ.get(env, "").lower() in ("1", "true", "yes"),
                            help=f"{help_text} (env {env}=true)")
    parser.add_argument("--alertmanager-url", dest="alertmanager_urls", action="append",
                        default=None, help="Alertmanager whose alerts the web UI shows, repeatable (env"
                        " PIPEMON_ALERTMANAGER_URLS, comma-separated)")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Build the config; raises ValueError with the flag's name when a value is off."""
    values, defaults = {}, ServeConfig()
    for flag, env, field, type_, _help in _OPTIONS:
        raw = getattr(args, field)
        if field == "listen":
            host, sep, port = str(raw).rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError(f"{flag} / {env}: expected host:port, got {raw!r}")
            values["host"], values["port"] = host.strip("[]") or "0.0.0.0", int(port)
            continue
        try:
            # an empty flag or variable means the default, as if it were not set
            values[field] = getattr(defaults, field) if raw in (None, "") else type_(raw)
        except ValueError as exc:
            raise ValueError(f"{flag} / {env}: {exc}") from exc
    for _flag, _env, field, _help in _SWITCHES:
        values[field] = bool(getattr(args, field))
    urls = getattr(args, "alertmanager_urls", None) or [
        u for u in os.environ.get("PIPEMON_ALERTMANAGER_URLS", "").split(",") if u.strip()]
    for url in urls:
        if not re.match(r"^https?://[^\s/]+", url.strip()):
            raise ValueError(f"--alertmanager-url / PIPEMON_ALERTMANAGER_URLS: expected http(s)://host:port,"
                             f" got {url!r}")
    values["alertmanager_urls"] = tuple(u.strip() for u in urls)
    config = ServeConfig(**values)
    try:
        check_name_template(config.lineage_pipeline_name)
    except ValueError as exc:
        raise ValueError(f"--lineage-pipeline-name / PIPEMON_LINEAGE_PIPELINE_NAME: {exc}") from exc
    if config.protect_reads and config.tokens is None:
        raise ValueError("--protect-reads / PIPEMON_PROTECT_READS needs --tokens: reads are checked against them")
    if not 0 <= config.recent_runs <= 10_000:
        raise ValueError(f"--recent-runs / PIPEMON_RECENT_RUNS: expected 0 to 10000, got {config.recent_runs}")
    try:
        parse_buckets(config.duration_buckets)
    except ValueError as exc:
        raise ValueError(f"--duration-buckets / PIPEMON_DURATION_BUCKETS: {exc}") from exc
    if config.storage_sync not in ("normal", "full"):
        raise ValueError(f"--storage-sync / PIPEMON_STORAGE_SYNC: expected normal or full, got {config.storage_sync!r}")
    if config.state and not is_postgres_url(config.state):
        raise ValueError(f"--state / PIPEMON_STATE: expected a postgresql:// URL, got {config.state!r}"
                         " (for SQLite use --state-dir)")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError(f"--log-level / PIPEMON_LOG_LEVEL: expected debug, info, warning or error, got"
                         f" {config.log_level!r}")
    return config
