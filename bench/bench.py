"""pipemon against Prometheus Pushgateway, side by side on loopback, driven by the same load generator.

`python bench/bench.py` (or `make bench`) starts `pipemon serve` and Debian's `prometheus-pushgateway`, each
with a fresh state directory, fills both with the same number of pipelines (one Pushgateway group per
pipeline, holding the families a batch job would push), measures every figure of bench/README.md on both
and prints pipemon's figure, Pushgateway's and the ratio pipemon / Pushgateway. Figures are medians of
repeated measurements (the machine may be shared). `--quick` is a tiny run that prints every row (the
tests run it so this script cannot rot); it skips Pushgateway when the binary is missing outside CI.

Load generator: `wrk` (C, epoll, LuaJIT scripts that make every run id unique) for every request-rate and
latency figure, on both systems; `/metrics` is fetched with one plain http.client connection.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import free_port, stack_command, stop, wait_http  # noqa: E402

PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 43200, 86400)
# Gauges a batch job would push besides last-run and last-success; enough of them are pushed to give a
# Pushgateway group the same number of series as a pipemon pipeline (see pushgateway_body).
EXTRA_GAUGES = tuple(f"pipeline_extra_gauge_{i}" for i in range(128))  # one Pushgateway series each


def pipeline_name(i: int) -> str:
    return f"bench_pipeline_{i:05d}"


# ---- what each system is sent ------------------------------------------------------------------------


def run_event(pipeline: int, run: str, status: str = "success") -> dict:
    return {"pipeline": pipeline_name(pipeline), "run_id": run, "status": status,
            "duration_seconds": 30.0 + pipeline % 17, "records_processed": 1000 + pipeline}


def pushgateway_body(series: int, runs: str = "@N", ts: str = "@T") -> str:
    """The text-format body of one push: the group of a batch job after a run, `series` series in all
    (Pushgateway adds push_time_seconds and push_failure_time_seconds to the group: counted)."""
    lab = 'team="unowned"'
    lines = [
        "# TYPE pipeline_runs_total counter",
        f'pipeline_runs_total{{{lab},status="success"}} {runs}',
        f'pipeline_runs_total{{{lab},status="failure"}} 0',
        "# TYPE pipeline_run_duration_seconds histogram",
        *(f'pipeline_run_duration_seconds_bucket{{{lab},le="{float(b)!r}"}} {runs if b >= 30 else 0}'
          for b in DURATION_BUCKETS),
        f'pipeline_run_duration_seconds_bucket{{{lab},le="+Inf"}} {runs}',
        f"pipeline_run_duration_seconds_sum{{{lab}}} {runs}",
        f"pipeline_run_duration_seconds_count{{{lab}}} {runs}",
        "# TYPE pipeline_records_processed_total counter",
        f"pipeline_records_processed_total{{{lab}}} {runs}",
        "# TYPE pipeline_last_run_timestamp_seconds gauge",
        f"pipeline_last_run_timestamp_seconds{{{lab}}} {ts}",
        "# TYPE pipeline_last_success_timestamp_seconds gauge",
        f"pipeline_last_success_timestamp_seconds{{{lab}}} {ts}",
    ]
    pushed = sum(1 for line in lines if not line.startswith("#"))
    extra = series - 2 - pushed
    assert 0 <= extra <= len(EXTRA_GAUGES), (series, pushed)
    for name in EXTRA_GAUGES[:extra]:
        lines += [f"# TYPE {name} gauge", f"{name}{{{lab}}} 1"]
    return "\n".join(lines) + "\n"


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for this ASCII text


LUA_COMMON = """
local n = 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  prefix = args[1]
  pipelines = tonumber(args[2])
  nthreads = tonumber(args[3])
end
"""

LUA_DELAY = """
function delay()
  return %d
end
"""

LUA_PIPEMON_SINGLE = LUA_COMMON + """
local headers = {["Content-Type"] = "application/json"}
function request()
  n = n + 1
  local p = (n * nthreads + tid) % pipelines
  local body = string.format('{"pipeline":"bench_pipeline_%05d","run_id":"%s-%d-%d","status":"success",'
    .. '"duration_seconds":%d.5,"records_processed":%d}', p, prefix, tid, n, 30 + p % 17, 1000 + p)
  return wrk.format("POST", "/api/v1/runs", headers, body)
end
"""

LUA_PIPEMON_BATCH = LUA_COMMON + """
local headers = {["Content-Type"] = "application/x-ndjson"}
function request()
  local lines = {}
  for k = 1, 1000 do
    n = n + 1
    local p = (n * nthreads + tid) % pipelines
    lines[k] = string.format('{"pipeline":"bench_pipeline_%05d","run_id":"%s-%d-%d","status":"success",'
      .. '"duration_seconds":%d.5,"records_processed":%d}', p, prefix, tid, n, 30 + p % 17, 1000 + p)
  end
  return wrk.format("POST", "/api/v1/runs", headers, table.concat(lines, "\\n"))
end
"""

LUA_PUSHGATEWAY_SINGLE = LUA_COMMON + """
local template = %s
local headers = {["Content-Type"] = "text/plain; version=0.0.4"}
function request()
  n = n + 1
  local p = (n * nthreads + tid) %% pipelines
  local body = template:gsub("@N", tostring(n)):gsub("@T", tostring(1700000000 + n))
  return wrk.format("PUT", string.format("/metrics/job/bench_pipeline_%%05d", p), headers, body)
end
"""


# ---- measuring -----------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rate: float  # requests per second
    p50_ms: float
    p99_ms: float
    requests: int
    errors: str  # empty when every request got a 2xx


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def wrk(url: str, lua: str, args: list[str], connections: int, seconds: float, threads: int = 2) -> WrkResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua)
    try:
        out = subprocess.run([WRK, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                              "--latency", "--timeout", "10s", "-s", script.name, url, "--", *args,
                              str(threads)], capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    finally:
        os.unlink(script.name)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = " ".join(m.group(0) for m in re.finditer(r"(Non-2xx or 3xx responses: \d+|Socket errors: [^\n]+)", out))
    return WrkResult(rate, p50, p99, requests, errors)


def fetch(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[float, bytes]:
    """Seconds to fetch `path` over a fresh connection (to the last byte), and the body."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    try:
        started = time.perf_counter()
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter() - started
        assert resp.status == 200, (resp.status, body[:200])
        return elapsed, body
    finally:
        conn.close()


def series_count(body: bytes) -> int:
    return sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))


def pipeline_series(body: bytes, marker: bytes) -> int:
    return sum(1 for line in body.split(b"\n") if marker in line and not line.startswith(b"#"))


def post(url: str, body: bytes, content_type: str, method: str = "POST") -> dict | bytes:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=120) as resp:
        data = resp.read()
        assert resp.status in (200, 202), resp.status
        return json.loads(data) if content_type != "text/plain; version=0.0.4" else data


def render_seconds_sum(body: bytes) -> float:
    for line in body.split(b"\n"):
        if line.startswith(b"pipemon_metrics_render_duration_seconds_sum"):
            return float(line.split()[-1])
    raise ValueError("no pipemon_metrics_render_duration_seconds_sum in /metrics")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---- the two systems -----------------------------------------------------------------------------------


class Pipemon:
    name = "pipemon"

    def __init__(self, directory: Path, max_pipelines: int = 20_000) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{self.port}", "--state-dir",
             str(directory), "--log-level", "warning", "--max-pipelines", str(max_pipelines)],
            env=os.environ.copy())
        wait_http(f"{self.url}/-/ready", 30, self.proc)
        self.batch = 0

    def send_runs(self, pipelines: range, tag: str, status: str = "success") -> None:
        """One run of each pipeline, in NDJSON batches of 1,000 (every run acknowledged after its commit)."""
        items = list(pipelines)
        for start in range(0, len(items), 1000):
            body = "\n".join(json.dumps(run_event(p, f"{tag}-{p}", status)) for p in items[start:start + 1000])
            answer = post(f"{self.url}/api/v1/runs", body.encode(), "application/x-ndjson")
            assert answer["rejected"] == 0 and answer["duplicate"] == 0, answer

    def close(self) -> None:
        stop(self.proc)


class Pushgateway:
    name = "pushgateway"

    def __init__(self, directory: Path, series: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.series = series
        self.proc = subprocess.Popen(
            [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{self.port}",
             f"--persistence.file={directory / 'pg.state'}", "--persistence.interval=5m", "--log.level=warn",
             # Pushgateway's best case: by default every push re-checks the consistency of every group
             # held (cost grows with the groups: ~11 pushes/s at 1,000 groups on the reference machine).
             "--push.disable-consistency-check"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{self.url}/-/ready", 30, self.proc)
        self.template = pushgateway_body(series)
        self.pushes = 0

    def send_runs(self, pipelines: range, tag: str, status: str = "success") -> None:
        """One push per pipeline (as a job does after each run), 16 at a time."""
        def push(p: int) -> None:
            self.pushes += 1
            body = self.template.replace("@N", str(self.pushes)).replace("@T", str(int(time.time())))
            post(f"{self.url}/metrics/job/{pipeline_name(p)}", body.encode(), "text/plain; version=0.0.4", "PUT")

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(push, pipelines))

    def close(self) -> None:
        stop(self.proc)


# ---- the report ----------------------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    pipemon: str
    pushgateway: str
    ratio: str
    target: str
    holds: bool | None  # None: nothing to judge
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    def add(self, figure: str, ours: str, theirs: str, ratio: float | None, target: str,
            holds: bool | None, note: str = "") -> None:
        self.rows.append(Row(figure, ours, theirs, "n/a" if ratio is None else f"{ratio:.2f}×", target,
                             holds, note))
        print(f"  {figure}: {ours} | {theirs} | {self.rows[-1].ratio} ({target})", file=sys.stderr, flush=True)

    def print(self) -> None:
        header = ("figure", "pipemon", "pushgateway", "ratio", "target", "holds")
        cells = [header] + [(r.figure, r.pipemon, r.pushgateway, r.ratio, r.target,
                             "-" if r.holds is None else ("yes" if r.holds else "NO")) for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        for line in self.facts:
            print(line)
        print()
        for i, cell in enumerate(cells):
            print("| " + " | ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) + " |")
            if i == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        notes = [f"- {r.figure}: {r.note}" for r in self.rows if r.note]
        if notes:
            print()
            print("\n".join(notes))


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    pg = subprocess.run([PUSHGATEWAY, "--version"], capture_output=True, text=True).stderr.split("\n")[0] \
        if Path(PUSHGATEWAY).exists() else "Pushgateway missing"
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return (f"{os.cpu_count()} CPUs ({model}), {mem} GiB, Linux {os.uname().release}, Python"
            f" {sys.version.split()[0]} ({loop}); {pg.strip()}")


# ---- the figures ---------------------------------------------------------------------------------------


@dataclass
class Settings:
    pipelines: int = 10_000
    seconds: float = 10.0  # per wrk run
    repeats: int = 3  # wrk runs per figure and system (medians)
    scrapes: int = 5  # timed /metrics fetches per figure (medians)
    scale: tuple[int, int] = (1_000, 50_000)
    e2e_alerts: int = 6

    @classmethod
    def quick(cls) -> Settings:
        return cls(pipelines=1_000, seconds=1.0, repeats=1, scrapes=2, scale=(200, 2_000), e2e_alerts=1)


def ratio_row(report: Report, figure: str, ours: float, theirs: float | None, fmt: Callable[[float], str],
              target: str, limit: float, lower_is_better: bool, note: str = "") -> None:
    if theirs is None:
        report.add(figure, fmt(ours), "skipped", None, target, None, note)
        return
    ratio = ours / theirs
    holds = ratio <= limit if lower_is_better else ratio >= limit
    report.add(figure, fmt(ours), fmt(theirs), ratio, target, holds, note)


def measure_ingest(report: Report, pm: Pipemon, pg: Pushgateway | None, s: Settings) -> float | None:
    singles: dict[str, list[WrkResult]] = {"pipemon": [], "pushgateway": []}
    for rep in range(s.repeats):  # alternate the systems, so drifting noise hits both
        singles["pipemon"].append(wrk(pm.url, LUA_PIPEMON_SINGLE, [f"s{rep}", str(s.pipelines)], 32, s.seconds))
        if pg is not None:
            lua = LUA_PUSHGATEWAY_SINGLE % lua_string(pg.template)
            singles["pushgateway"].append(wrk(pg.url, lua, [f"s{rep}", str(s.pipelines)], 32, s.seconds))
    for name, results in singles.items():
        for r in results:
            assert not r.errors, f"{name}: {r.errors}"
    ours = median([r.rate for r in singles["pipemon"]])
    theirs = median([r.rate for r in singles["pushgateway"]]) if pg else None
    ratio_row(report, "runs recorded/s, one run per request, 32 keep-alive connections", ours, theirs,
              lambda v: f"{v:,.0f}/s", "≥ 1.0×", 1.0, False)

    batches = [wrk(pm.url, LUA_PIPEMON_BATCH, [f"b{rep}", str(s.pipelines)], 4, s.seconds).rate * 1000
               for rep in range(s.repeats)]
    ours_batch = median(batches)
    ratio_row(report, "runs recorded/s, NDJSON batches of 1,000 (4 connections) vs Pushgateway one per request",
              ours_batch, theirs, lambda v: f"{v:,.0f}/s", "≥ 20×", 20.0, False)
    return theirs


def measure_metrics(report: Report, pm: Pipemon, pg: Pushgateway | None, s: Settings) -> None:
    n = s.pipelines
    text, om = {}, {"Accept": "application/openmetrics-text; version=1.0.0"}
    prometheus = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
                  "Accept-Encoding": "gzip"}
    # Series per pipeline, counted in the bodies themselves.
    _, body = fetch(pm.url, "/metrics")
    ours_series = pipeline_series(body, b'pipeline="bench_pipeline_00001"')
    theirs_series = None
    if pg is not None:
        _, pg_body = fetch(pg.url, "/metrics")
        theirs_series = pipeline_series(pg_body, b'job="bench_pipeline_00001"')
        report.facts.append(f"series per pipeline: pipemon {ours_series}, Pushgateway {theirs_series} (incl."
                            f" push_time_seconds and push_failure_time_seconds); /metrics at {n:,} pipelines:"
                            f" pipemon {series_count(body):,} series / {len(body) / 2**20:.1f} MiB, Pushgateway"
                            f" {series_count(pg_body):,} series / {len(pg_body) / 2**20:.1f} MiB")
    else:
        report.facts.append(f"series per pipeline: pipemon {ours_series}")

    def pg_median(headers: dict[str, str]) -> float | None:
        if pg is None:
            return None
        return median([fetch(pg.url, "/metrics", headers)[0] for _ in range(s.scrapes)])

    tag = iter(range(10**6))

    def pm_full(headers: dict[str, str]) -> float:
        times = []
        for _ in range(s.scrapes):
            pm.send_runs(range(n), f"full{next(tag)}")  # every pipeline changed: a full re-render
            times.append(fetch(pm.url, "/metrics", headers)[0])
        return median(times)

    def pm_incremental(headers: dict[str, str]) -> float:
        times = []
        changed = max(1, n // 100)
        for i in range(s.scrapes):
            first = (i * changed) % n
            pm.send_runs(range(first, first + changed), f"inc{next(tag)}")
            times.append(fetch(pm.url, "/metrics", headers)[0])
        return median(times)

    ms = lambda v: f"{v * 1000:,.0f} ms"  # noqa: E731
    for label, headers in (("text format", text), ("OpenMetrics", om), ("as Prometheus asks: OpenMetrics, gzip",
                                                                          prometheus)):
        theirs = pg_median(headers)
        ratio_row(report, f"/metrics full render at {n:,} pipelines, {label}", pm_full(headers), theirs, ms,
                  "≤ 1.0×", 1.0, True)
        ratio_row(report, f"/metrics at {n:,} pipelines, ≤ 1% changed, {label}", pm_incremental(headers),
                  theirs, ms, "≤ 0.1×", 0.1, True,
                  "Pushgateway has no incremental render: its full render is the reference" if not headers else "")

    ours = rss_mib(pm.proc.pid)
    theirs = rss_mib(pg.proc.pid) if pg else None
    ratio_row(report, f"RSS at {n:,} pipelines (after the /metrics figures)", ours, theirs,
              lambda v: f"{v:,.0f} MiB", "≤ 1.0×", 1.0, True)


class Scraper:
    """Fetches /metrics as Prometheus does (OpenMetrics, gzip) every `interval` seconds, or back to back
    (interval 0), until stopped."""

    def __init__(self, url: str, gzip: bool = True, interval: float = 0.0) -> None:
        self.url, self.count, self.gzip, self.interval = url, 0, gzip, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        headers = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
                   "Accept-Encoding": "gzip" if self.gzip else "identity"}
        while not self._stop.is_set():
            started = time.monotonic()
            fetch(self.url, "/metrics", headers)
            self.count += 1
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)


def measure_latency(report: Report, pm: Pipemon, pg: Pushgateway | None, s: Settings) -> None:
    """p99 of single-run POSTs at a moderate rate (8 connections, 10 ms apart each), idle and while
    /metrics is scraped as Prometheus does (OpenMetrics, gzip) every second, 5x the stack's rate."""
    lua = LUA_PIPEMON_SINGLE + LUA_DELAY % 10
    idle, scraped, scrapes = [], [], 0
    for rep in range(s.repeats):
        idle.append(wrk(pm.url, lua, [f"li{rep}", str(s.pipelines)], 8, s.seconds))
        with Scraper(pm.url, interval=1.0) as scraper:
            scraped.append(wrk(pm.url, lua, [f"ls{rep}", str(s.pipelines)], 8, s.seconds))
        scrapes += scraper.count
    for r in idle + scraped:
        assert not r.errors, r.errors
    ours_idle, ours_scraped = median([r.p99_ms for r in idle]), median([r.p99_ms for r in scraped])
    ratio = ours_scraped / ours_idle
    theirs = "n/a"
    if pg is not None:
        pg_lua = LUA_PUSHGATEWAY_SINGLE % lua_string(pg.template) + LUA_DELAY % 10
        pg_idle = wrk(pg.url, pg_lua, ["li", str(s.pipelines)], 8, s.seconds)
        with Scraper(pg.url, interval=1.0):
            pg_scraped = wrk(pg.url, pg_lua, ["ls", str(s.pipelines)], 8, s.seconds)
        theirs = f"{pg_scraped.p99_ms:.1f} ms (idle {pg_idle.p99_ms:.1f} ms)"
    report.rows.append(Row(f"p99 of single-run POSTs while /metrics is scraped every 1 s ({s.pipelines:,}"
                           " pipelines), vs idle", f"{ours_scraped:.1f} ms (idle {ours_idle:.1f} ms)", theirs,
                           f"{ratio:.2f}× idle", "≤ 2× idle p99", ratio <= 2.0,
                           f"~{median([r.rate for r in idle]):,.0f} POSTs/s; {scrapes} scrapes during the"
                           " scraped runs"))
    print(f"  p99: {report.rows[-1]}", file=sys.stderr, flush=True)


def measure_scaling(report: Report, directory: Path, s: Settings) -> None:
    small, large = s.scale
    pm = Pipemon(directory, max_pipelines=large + 1000)
    try:
        fetch(pm.url, "/metrics")
        base = rss_mib(pm.proc.pid)
        figures = {}
        done = 0
        client: dict[int, float] = {}
        for n in (small, large):
            pm.send_runs(range(done, n), f"fill{n}")
            done = n
            times, server = [], []
            for rep in range(s.scrapes):
                pm.send_runs(range(n), f"scale{n}-{rep}")
                elapsed, body = fetch(pm.url, "/metrics")
                times.append(elapsed)
                # The next body holds that render's own duration (pipemon_metrics_render_duration_seconds).
                server.append(render_seconds_sum(fetch(pm.url, "/metrics")[1]) - render_seconds_sum(body))
            figures[n] = (median(server) / n, (rss_mib(pm.proc.pid) - base) / n)
            client[n] = median(times) / n
    finally:
        pm.close()
    render_ratio = figures[large][0] / figures[small][0]
    memory_ratio = figures[large][1] / figures[small][1]
    for what, ratio, unit, index in (("render time", render_ratio, "µs", 0), ("memory", memory_ratio, "KiB", 1)):
        scale = 1e6 if index == 0 else 1024
        report.rows.append(Row(
            f"{what} per pipeline, {large:,} vs {small:,} pipelines",
            f"{figures[large][index] * scale:.1f} vs {figures[small][index] * scale:.1f} {unit}", "n/a",
            f"{ratio:.2f}×", "≤ 1.2×", ratio <= 1.2,
            "memory: RSS growth over the empty exporter's" if index else
            "full re-render, text format, in the exporter (pipemon_metrics_render_duration_seconds); fetched by"
            f" the client incl. transfer: {client[large] * 1e6:.1f} vs {client[small] * 1e6:.1f} µs per pipeline"
            f" ({client[large] / client[small]:.2f}×)"))
        print(f"  scaling: {report.rows[-1]}", file=sys.stderr, flush=True)


E2E_REGISTRY = """
unknown_pipelines: accept
teams:
  alpha: {slack_channel: "#alpha"}
pipelines:
  - {match: "e2e_*", team: alpha}
"""


def measure_e2e(report: Report, directory: Path, s: Settings) -> None:
    figure = "event → notification at the sink, 5 s scrape / 5 s evaluation / 1 s group_wait (median)"
    missing = [b for b in ("/usr/bin/prometheus", "/usr/bin/prometheus-alertmanager") if not Path(b).exists()]
    if s.e2e_alerts == 0 or missing:
        report.rows.append(Row(figure, f"skipped ({' '.join(missing) or 'no alerts asked'})", "n/a", "n/a",
                               "≤ 15 s", None))
        return
    registry = directory / "pipelines.yaml"
    registry.write_text(E2E_REGISTRY)
    ports = [free_port() for _ in range(7)]
    exporter, prom, sink = (f"http://127.0.0.1:{ports[i]}" for i in (0, 1, 6))
    cmd = stack_command(directory / "stack", registry, ports, scrape="5s", evaluation="5s")
    with open(directory / "stack.out", "wb") as log:
        stack = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"{prom}/-/ready", 60, stack)
        wait_http(f"{exporter}/-/ready", 30, stack)
        names = [f"e2e_{i}" for i in range(s.e2e_alerts)]
        ok = [{"pipeline": p, "run_id": "ok", "status": "success", "duration_seconds": 1.0} for p in names]
        post(f"{exporter}/api/v1/runs", json.dumps(ok).encode(), "application/json")
        time.sleep(11)  # two scrapes: the successes are in Prometheus
        sent: dict[str, float] = {}
        received: dict[str, float] = {}
        deadline = time.time() + 60 + 3.3 * len(names)
        pending = list(names)
        next_send = time.time()
        while time.time() < deadline and len(received) < len(names):
            if pending and time.time() >= next_send:  # 3.3 s apart: the events land at every phase of the cycle
                name = pending.pop(0)
                post(f"{exporter}/api/v1/runs", json.dumps({"pipeline": name, "run_id": "bad", "status": "failure",
                                                            "duration_seconds": 1.0}).encode(), "application/json")
                sent[name] = time.time()
                next_send = time.time() + 3.3
            with urllib.request.urlopen(f"{sink}/notifications", timeout=10) as resp:
                for note in json.load(resp):
                    for alert in note["alerts"]:
                        labels = alert["labels"]
                        if (alert["status"] == "firing" and labels.get("alertname") == "PipelineRunFailed"
                                and labels.get("pipeline") in sent):
                            received.setdefault(labels["pipeline"], note["received_at"])
            time.sleep(0.2)
    finally:
        stop(stack, 60)
    latencies = sorted(received[p] - sent[p] for p in received)
    if not latencies:
        report.rows.append(Row(figure, "no notification", "n/a", "n/a", "≤ 15 s", False))
        return
    mid = median(latencies)
    report.rows.append(Row(figure, f"{mid:.1f} s", "n/a (no alerting)", "n/a", "≤ 15 s",
                           mid <= 15 and len(latencies) == len(names),
                           f"{len(latencies)}/{len(names)} alerts (PipelineRunFailed), min {latencies[0]:.1f} s,"
                           f" max {latencies[-1]:.1f} s"))
    print(f"  e2e: {report.rows[-1]}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def systems(directory: Path, series: int, want_pg: bool) -> Iterator[tuple[Pipemon, Pushgateway | None]]:
    for sub in ("pipemon", "pg"):
        (directory / sub).mkdir(parents=True)
    pm = Pipemon(directory / "pipemon")
    pg = None
    try:
        if want_pg:
            pg = Pushgateway(directory / "pg", series)
        yield pm, pg
    finally:
        pm.close()
        if pg is not None:
            pg.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run that prints every row (for the tests)")
    parser.add_argument("--only", default="ingest,metrics,latency,scaling,e2e",
                        help="comma-separated parts to run (default: all)")
    args = parser.parse_args()
    s = Settings.quick() if args.quick else Settings()
    parts = set(args.only.split(","))
    if not Path(WRK).exists():
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 2
    want_pg = Path(PUSHGATEWAY).exists()
    if not want_pg and (os.environ.get("CI") or not args.quick):
        print(f"{PUSHGATEWAY} is missing: apt-get install prometheus-pushgateway", file=sys.stderr)
        return 2
    report = Report()
    report.facts.append(f"machine: {machine()}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pipemon-bench-") as tmp:
        directory = Path(tmp)
        with systems(directory / "probe", 0, False) as (pm_probe, _):
            pm_probe.send_runs(range(1), "probe")
            series = pipeline_series(fetch(pm_probe.url, "/metrics")[1], b'pipeline="bench_pipeline_00000"')
        # A fresh exporter for the figures (the probe's pipeline would be one too many).
        with systems(directory / "main", series, want_pg) as (pm, pg):
            fill_started = time.perf_counter()
            pm.send_runs(range(s.pipelines), "fill")
            pm_fill = time.perf_counter() - fill_started
            if pg is not None:
                fill_started = time.perf_counter()
                pg.send_runs(range(s.pipelines), "fill")
                report.facts.append(f"filling {s.pipelines:,} pipelines: pipemon {pm_fill:.1f} s (NDJSON),"
                                    f" Pushgateway {time.perf_counter() - fill_started:.1f} s (one push each)")
            if "ingest" in parts:
                measure_ingest(report, pm, pg, s)
            if "metrics" in parts:
                measure_metrics(report, pm, pg, s)
        if "latency" in parts:
            # Fresh exporters holding one run per pipeline: the figure is about scrapes disturbing ingest.
            # (After the figures above pipemon holds ~180 run ids per pipeline in its dedup windows, and its
            # 10 s checkpoints stall commits for hundreds of ms: see bench/README.md.)
            with systems(directory / "latency", series, want_pg) as (pm, pg):
                pm.send_runs(range(s.pipelines), "fill")
                if pg is not None:
                    pg.send_runs(range(s.pipelines), "fill")
                measure_latency(report, pm, pg, s)
        if "scaling" in parts:
            (directory / "scale").mkdir()
            measure_scaling(report, directory / "scale", s)
        if "e2e" in parts:
            (directory / "e2e").mkdir()
            measure_e2e(report, directory / "e2e", s)
    report.facts.append(f"benchmark took {time.monotonic() - started:.0f} s; figures are medians of {s.repeats}"
                        f" wrk runs of {s.seconds:.0f} s / {s.scrapes} scrapes")
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
