"""`pipemon stack`: the whole stack on 127.0.0.1 without Docker.

Starts a notification sink, the exporter, two clustered Alertmanagers (with the configuration rendered from
the registry, every receiver pointed at the sink) and Prometheus (scraping the exporter, loading the rules
rendered from rules/config.yaml, sending to both Alertmanagers). State and logs go to one directory.
Ctrl-C (or SIGTERM) stops every child; children also get SIGTERM if this process dies.

`--ha` runs the high-availability set-up instead (docs/scaling.md): a local PostgreSQL, two exporter replicas
over it behind one address (pipemon.stack.balancer, what a load balancer does in production), and two Prometheus
servers with the same rules and `external_labels` replica a/b, both sending to the Alertmanager cluster with
the replica label dropped from their alerts, so each alert is notified once, and both remote-writing to one
VictoriaMetrics, the long-term store and global query view: the replica label is dropped from what they write
too, so the pair's samples land in the same series and VictoriaMetrics' deduplication keeps one per scrape
interval.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml

from pipemon.model.durations import format_duration, parse_duration
from pipemon.model.registry import RegistryError, load_registry
from pipemon.render import alertmanager as alertmanager_render
from pipemon.render import rules as rules_render
from pipemon.stack import demo, pglocal

PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
VICTORIAMETRICS = "/usr/bin/victoria-metrics"
INSTALL_HINT = "sudo apt-get update && sudo apt-get install -y prometheus prometheus-alertmanager"
VM_INSTALL_HINT = "sudo apt-get update && sudo apt-get install -y victoria-metrics  (or: make run-ha)"


@dataclass(frozen=True)
class StackPorts:
    exporter: int = 9464
    prometheus: int = 9090
    alertmanagers: tuple[int, int] = (9093, 9095)
    cluster: tuple[int, int] = (9094, 9096)
    sink: int = 9099


@dataclass(frozen=True)
class HAPorts:
    """The extra ports of `--ha`; the balancer listens on StackPorts.exporter."""

    replicas: tuple[int, int] = (9474, 9475)
    prometheus_b: int = 9092
    postgres: int = 5439
    victoriametrics: int = 8428


@dataclass
class Stack:
    """The child processes of a running stack, stopped in reverse order of start."""

    directory: Path
    processes: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], ready_url: str | Callable[[], bool], quiet: bool = True,
              timeout: float = 30, **popen: Any) -> None:
        """Start a child and wait until `ready_url` answers 200 (or the callable says it is ready)."""
        with open(self.directory / f"{name}.log", "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(cmd, stdout=log if quiet else None, stderr=log, stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_parent, cwd=self.directory, **popen)
        self.processes.append((name, proc))
        _wait_ready(name, ready_url, proc, self.directory / f"{name}.log", timeout)

    def stop(self) -> None:
        for _name, proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in reversed(self.processes):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def exited(self) -> str | None:
        """The name of a child that has exited, if any."""
        return next((name for name, proc in self.processes if proc.poll() is not None), None)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the stack process dies, even by kill -9 (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_ready(name: str, url: str | Callable[[], bool], proc: subprocess.Popen, log: Path,
                timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; its log ({log}) ends:\n"
                               + log.read_text(errors="replace")[-2000:])
        if callable(url):
            if url():
                return
        else:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not become ready at {url} within {timeout:.0f}s (log: {log})")


# ---- configuration files ------------------------------------------------------------------------------


def write_rules(config_path: Path, out_dir: Path, evaluation_interval: str, max_for: str | None) -> None:
    """Render the rules into `out_dir`, with the stack's evaluation interval and `for:` capped at max_for."""
    config = rules_render.load_config(config_path)
    config = msgspec.structs.replace(config, evaluation_interval=evaluation_interval)
    if max_for is not None:
        cap = parse_duration(max_for)
        durations = {name: format_duration(min(cap, parse_duration(value)))
                     for name, value in msgspec.structs.asdict(config.for_).items()}
        config = msgspec.structs.replace(config, for_=msgspec.structs.replace(config.for_, **durations))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rules_render.render(config).items():
        (out_dir / name).write_text(text)


def remote_write_config(url: str) -> list[dict]:
    """remote_write to VictoriaMetrics. The write relabelling runs after the external labels are added, so it
    drops `replica`: both servers of the pair then write the same series, which single-node VictoriaMetrics
    deduplicates (-dedup.minScrapeInterval) as it only merges samples of identical series."""
    return [{"url": f"{url}/api/v1/write", "write_relabel_configs": [{"action": "labeldrop", "regex": "replica"}]}]


def victoriametrics_command(binary: str, data: Path, listen: str, dedup_interval: str, retention: str,
                            *extra: str) -> list[str]:
    """VictoriaMetrics keeping `retention` (1y, 13 (months), 30d) and one sample per series per
    `dedup_interval`, the Prometheus pair's scrape interval."""
    return [binary, f"-storageDataPath={data}", f"-httpListenAddr={listen}",
            f"-dedup.minScrapeInterval={dedup_interval}", f"-retentionPeriod={retention}", *extra]


def prometheus_config(ports: StackPorts, rules_dir: Path, scrape_interval: str, evaluation_interval: str,
                      replica: str | None = None, own_port: int | None = None,
                      remote_write: str | None = None) -> dict:
    """One Prometheus; with `replica` (a, b) one of an HA pair: its external label tells the pair apart, and
    is dropped from the alerts so the Alertmanager cluster sees one alert, not two, and from what it writes to
    `remote_write` (a VictoriaMetrics URL) so the store sees one series, not two."""
    own = own_port or ports.prometheus
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": [str(rules_dir / "*.yml")],
        "scrape_configs": [
            {"job_name": "pipemon", "static_configs": [{"targets": [f"127.0.0.1:{ports.exporter}"]}]},
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{own}"]}]},
        ],
    }
    if replica is not None:
        config["global"]["external_labels"] = {"replica": replica}
    config.update(alertmanager_render.prometheus_alerting_config(
        [f"127.0.0.1:{port}" for port in ports.alertmanagers]))
    if replica is not None:
        config["alerting"]["alert_relabel_configs"] = [{"action": "labeldrop", "regex": "replica"}]
    if remote_write is not None:
        config["remote_write"] = remote_write_config(remote_write)
    return config


def write_alertmanager_config(registry_path: Path, directory: Path, sink_url: str, args: argparse.Namespace) -> Path:
    registry = load_registry(registry_path)
    config = alertmanager_render.render_alertmanager_config(
        registry, sink_url=sink_url, group_wait=args.group_wait, group_interval=args.group_interval,
        repeat_interval=args.repeat_interval)
    path = directory / "alertmanager.yml"
    path.write_text(alertmanager_render.dump_config(config, str(registry_path)))
    templates = directory / "templates"
    shutil.rmtree(templates, ignore_errors=True)
    shutil.copytree(args.templates, templates)
    return path


# ---- running ------------------------------------------------------------------------------------------


def start_stack(args: argparse.Namespace, ports: StackPorts, stack: Stack, registry: Path,
                ha: HAPorts | None = None) -> None:
    d = stack.directory
    py = sys.executable
    sink_url = f"http://127.0.0.1:{ports.sink}/alertmanager"
    stack.start("sink", [py, "-u", "-m", "pipemon.stack.sink", "--listen", f"127.0.0.1:{ports.sink}"],
                f"http://127.0.0.1:{ports.sink}/notifications", quiet=False)
    # the web UI shows the alerts of both Alertmanagers, judges by the stack's rules config, links to Prometheus
    ui = [arg for web in ports.alertmanagers for arg in ("--alertmanager-url", f"http://127.0.0.1:{web}")]
    ui += ["--rules-config", str(args.rules_config), "--prometheus-url", f"http://127.0.0.1:{ports.prometheus}"]
    if ha is None:
        stack.start("exporter", [py, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{ports.exporter}",
                                 "--registry", str(registry), "--state-dir", str(d / "exporter"), *ui],
                    f"http://127.0.0.1:{ports.exporter}/-/ready")
    else:
        start_replicas(stack, ports, ha, registry, ui)
    am_config = write_alertmanager_config(registry, d, sink_url, args)
    for i, (web, cluster) in enumerate(zip(ports.alertmanagers, ports.cluster, strict=True)):
        peer = ports.cluster[1 - i]
        cmd = alertmanager_render.alertmanager_command(
            ALERTMANAGER, str(am_config), str(d / f"alertmanager-{i + 1}"), f"127.0.0.1:{web}",
            f"127.0.0.1:{cluster}", [f"127.0.0.1:{peer}"])
        stack.start(f"alertmanager-{i + 1}", cmd, f"http://127.0.0.1:{web}/-/ready")
    write_rules(args.rules_config, d / "rules", args.evaluation_interval, args.max_for)
    pair = [(None, "prometheus", ports.prometheus)] if ha is None else [
        ("a", "prometheus-a", ports.prometheus), ("b", "prometheus-b", ha.prometheus_b)]
    remote_write = None if ha is None else start_victoriametrics(stack, args, ha)
    for replica, name, port in pair:
        start_prometheus(stack, args, ports, name, port, replica, remote_write)


def start_victoriametrics(stack: Stack, args: argparse.Namespace, ha: HAPorts) -> str:
    """The long-term store both Prometheus servers write to; returns its URL."""
    listen = f"127.0.0.1:{ha.victoriametrics}"
    cmd = victoriametrics_command(VICTORIAMETRICS, stack.directory / "victoriametrics", listen,
                                  args.scrape_interval, args.vm_retention)
    stack.start("victoriametrics", cmd, f"http://{listen}/health")
    return f"http://{listen}"


def start_prometheus(stack: Stack, args: argparse.Namespace, ports: StackPorts, name: str, port: int,
                     replica: str | None, remote_write: str | None = None) -> None:
    d = stack.directory
    config_file = d / f"{name}.yml"
    config_file.write_text(yaml.safe_dump(prometheus_config(ports, d / "rules", args.scrape_interval,
                                                            args.evaluation_interval, replica, port,
                                                            remote_write),
                                          sort_keys=False))
    stack.start(name, [PROMETHEUS, f"--config.file={config_file}", f"--storage.tsdb.path={d / name}",
                       f"--web.listen-address=127.0.0.1:{port}"], f"http://127.0.0.1:{port}/-/ready")


def start_replicas(stack: Stack, ports: StackPorts, ha: HAPorts, registry: Path, ui: list[str]) -> None:
    """PostgreSQL, two exporter replicas over it, and the balancer in front of them on the exporter port."""
    py = sys.executable
    data = pglocal.prepare(stack.directory / "postgres")
    stack.start("postgres", pglocal.command(data, ha.postgres), lambda: pglocal.ready(ha.postgres),
                **pglocal.run_as())
    pglocal.create_database(ha.postgres)
    for i, port in enumerate(ha.replicas):
        stack.start(f"exporter-{i + 1}", [py, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{port}",
                                          "--registry", str(registry), "--state", pglocal.url(ha.postgres),
                                          *ui],
                    f"http://127.0.0.1:{port}/-/ready")
    upstreams = [arg for port in ha.replicas for arg in ("--upstream", f"http://127.0.0.1:{port}")]
    stack.start("balancer", [py, "-m", "pipemon.stack.balancer", "--listen", f"127.0.0.1:{ports.exporter}", *upstreams],
                f"http://127.0.0.1:{ports.exporter}/-/ready")


def banner(ports: StackPorts, directory: Path, with_demo: bool, ha: HAPorts | None = None) -> str:
    lines = [
        "pipemon stack is up (Ctrl-C stops everything):",
        f"  exporter      http://127.0.0.1:{ports.exporter}/  (web UI; metrics: /metrics, API: /api/v1/pipelines)",
        f"  prometheus    http://127.0.0.1:{ports.prometheus}/alerts",
    ]
    if ha is not None:
        lines = [
            *lines[:2],
            f"                (a balancer in front of the replicas http://127.0.0.1:{ha.replicas[0]}/ and"
            f" http://127.0.0.1:{ha.replicas[1]}/)",
            f"  prometheus    http://127.0.0.1:{ports.prometheus}/alerts  and  http://127.0.0.1:{ha.prometheus_b}/alerts"
            " (replica a, b)",
            f"  postgresql    {pglocal.url(ha.postgres)}",
            f"  victoria      http://127.0.0.1:{ha.victoriametrics}/vmui  (long-term store, both Prometheus"
            f" deduplicated; PromQL API: http://127.0.0.1:{ha.victoriametrics}/api/v1/query)",
        ]
    lines += [
        f"  alertmanager  http://127.0.0.1:{ports.alertmanagers[0]}/  and  http://127.0.0.1:{ports.alertmanagers[1]}/",
        f"  sink          every notification is printed below (also: http://127.0.0.1:{ports.sink}/notifications)",
        f"  state & logs  {directory}/",
    ]
    if with_demo:
        lines.append("demo traffic runs: expect PipelineRunFailed (ledger_reconcile, finance-info) within a"
                     " minute, then the others within five.")
    return "\n".join(lines)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path("pipemon-stack"), help="state and logs (default: %(default)s)")
    parser.add_argument("--registry", type=Path, default=Path("pipelines.yaml"),
                        help="ownership registry (default: %(default)s; --demo uses its own)")
    parser.add_argument("--demo", action="store_true", help="send demo traffic with injected trouble")
    parser.add_argument("--rules-config", type=Path, default=Path("rules/config.yaml"))
    parser.add_argument("--templates", type=Path, default=Path("alertmanager/templates"))
    parser.add_argument("--ports", default="9464,9090,9093,9095,9094,9096,9099",
                        help="exporter,prometheus,am1,am2,am1-cluster,am2-cluster,sink")
    parser.add_argument("--scrape-interval", default="5s")
    parser.add_argument("--evaluation-interval", default="5s")
    parser.add_argument("--max-for", default=None,
                        help="cap every alert's `for:` (default: 30s with --demo, else as configured)")
    parser.add_argument("--group-wait", default="5s")
    parser.add_argument("--group-interval", default="30s")
    parser.add_argument("--repeat-interval", default="1h")
    parser.add_argument("--ha", action="store_true",
                        help="PostgreSQL, two exporter replicas behind one address, a Prometheus HA pair"
                             " remote-writing to VictoriaMetrics")
    parser.add_argument("--ha-ports", default="9474,9475,9092,5439,8428",
                        help="with --ha: replica1,replica2,prometheus-b,postgresql,victoriametrics (the balancer"
                             " takes the exporter port, prometheus-a the prometheus port)")
    parser.add_argument("--vm-retention", default="1y",
                        help="with --ha: VictoriaMetrics' -retentionPeriod (default: %(default)s)")


def parse_ports(text: str) -> StackPorts:
    values = [int(p) for p in text.split(",")]
    if len(values) != 7:
        raise ValueError("--ports takes seven ports: exporter,prometheus,am1,am2,am1-cluster,am2-cluster,sink")
    e, p, a1, a2, c1, c2, s = values
    return StackPorts(e, p, (a1, a2), (c1, c2), s)


def parse_ha_ports(text: str) -> HAPorts:
    values = [int(p) for p in text.split(",")]
    if len(values) != 5:
        raise ValueError("--ha-ports takes five ports: replica1,replica2,prometheus-b,postgresql,victoriametrics")
    r1, r2, prom, pg, vm = values
    return HAPorts((r1, r2), prom, pg, vm)


def run(args: argparse.Namespace) -> int:
    missing = [b for b in (PROMETHEUS, ALERTMANAGER) if not Path(b).exists()]
    if missing:
        print(f"error: {', '.join(missing)} not found. Install Debian's packages:\n  {INSTALL_HINT}", file=sys.stderr)
        return 1
    ha = parse_ha_ports(args.ha_ports) if args.ha else None
    if ha is not None and not pglocal.installed():
        print(f"error: --ha needs PostgreSQL 15 ({pglocal.BIN}):\n  {pglocal.INSTALL_HINT}", file=sys.stderr)
        return 1
    if ha is not None and not Path(VICTORIAMETRICS).exists():
        print(f"error: --ha needs VictoriaMetrics ({VICTORIAMETRICS}):\n  {VM_INSTALL_HINT}", file=sys.stderr)
        return 1
    for path in (args.rules_config, args.templates):
        if not path.exists():
            print(f"error: {path} not found: run `pipemon stack` from the pipemon repository", file=sys.stderr)
            return 1
    ports = parse_ports(args.ports)
    directory = args.dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    registry = args.registry.resolve()
    if args.demo:
        registry = directory / "demo-pipelines.yaml"
        registry.write_text(demo.demo_registry(demo.demo_pipelines()))
        args.max_for = args.max_for or "30s"
    args.rules_config, args.templates = args.rules_config.resolve(), args.templates.resolve()
    stack = Stack(directory)
    with _stop_on_signals():
        try:
            start_stack(args, ports, stack, registry, ha)
            if args.demo:
                stack.start("demo", [sys.executable, "-m", "pipemon.stack.demo", "--url",
                                     f"http://127.0.0.1:{ports.exporter}"],
                            f"http://127.0.0.1:{ports.exporter}/-/ready")
            print(banner(ports, directory, args.demo, ha), flush=True)
            while (gone := stack.exited()) is None:
                time.sleep(0.5)
            print(f"error: {gone} exited; see {directory / (gone + '.log')}. Stopping.", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping…", file=sys.stderr)
            return 0
        except (RuntimeError, RegistryError, rules_render.ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            stack.stop()
