"""What pipemon's rules and series cost a real Prometheus, at N pipelines, old rules beside new in one run.

For each N and each rule set (`--rules-dir`, the working tree; `--rules-rev`, the landed rules run against the
landed exporter): a real `pipemon serve` is filled with N pipelines and a day of their runs; the series the
rules read over long windows (found in the rule files) get that day as backfilled TSDB blocks that end
where the exporter's counters are; recorded series read over long windows are backfilled from those by
`promtool tsdb create-blocks-from rules`. A real Prometheus then scrapes the exporter every 15 s (runs
keep arriving on the pipelines' schedules) and evaluates the rules; the script prints head series, RSS,
each group's evaluation time against its interval, missed iterations and the heaviest rules.

    python bench/prometheus_cost.py                     # 1,000, 5,000, 20,000 pipelines
    python bench/prometheus_cost.py --quick             # 200 and 1,000 pipelines, shorter history
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import prometheus_cost_history as history  # noqa: E402
import prometheus_cost_rules as rules  # noqa: E402

from tests.procs import free_port, stop, wait_http  # noqa: E402

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
TARGETS = {"group_share": 0.10, "scaling": 1.2, "rss_ratio": 0.6}


@dataclass
class Settings:
    pipelines: list[int]
    rule_sets: list[rules.RuleSet]
    history: float = 86400.0  # seconds of backfilled history
    history_step: float = 60.0
    long_range: float = 3600.0  # ranges at least this long read the backfill
    scrape_interval: str = "15s"
    measure_minutes: float = 6.0
    min_evaluations: int = 5
    keep: bool = False


# ---- small helpers --------------------------------------------------------------------------------------


def get_json(url: str, timeout: float = 60) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def get_text(url: str, timeout: float = 120) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def post_ndjson(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-ndjson"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        answer = json.load(resp)
    if answer["rejected"]:
        bad = next(r for r in answer["results"] if r["status"] not in ("accepted", "duplicate"))
        raise RuntimeError(f"exporter rejected {answer['rejected']} runs, e.g. {bad}")
    return answer["accepted"]


def metric_values(body: str, name: str) -> dict[str, float]:
    """Label string → value of every sample of `name` in a text exposition."""
    out = {}
    for line in body.splitlines():
        if line.startswith(name) and line[len(name)] in "{ ":
            labels, _, value = line[len(name):].rpartition(" ")
            out[labels.strip()] = float(value)
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- processes ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exporter(directory: Path, rule_set: rules.RuleSet, n: int) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    (directory / "registry.yaml").write_text(history.registry_yaml())
    env = os.environ.copy()
    if rule_set.exporter_path is not None:  # the landed exporter for the landed rules
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(rule_set.exporter_path), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{port}", "--state-dir",
           str(directory / "state"), "--registry", str(directory / "registry.yaml"), "--log-level", "warning",
           "--max-pipelines", str(n + 100)]
    with open(directory / "exporter.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", 60, proc)
        yield f"127.0.0.1:{port}", proc
    finally:
        stop(proc, 30)


def prometheus_config(target: str | None, rule_files: list[Path], scrape: str, evaluation: float) -> dict:
    config: dict = {"global": {"scrape_interval": scrape, "scrape_timeout": scrape,
                               "evaluation_interval": f"{int(evaluation)}s"},
                    "rule_files": [str(f) for f in rule_files]}
    if target:
        config["scrape_configs"] = [{"job_name": "pipemon", "static_configs": [{"targets": [target]}]}]
    return config


@contextlib.contextmanager
def prometheus(directory: Path, config: dict, name: str) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    config_file = directory / f"{name}.yml"
    config_file.write_text(yaml.safe_dump(config))
    cmd = [PROMETHEUS, f"--config.file={config_file}", f"--storage.tsdb.path={directory / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=30d", "--log.level=warn",
           "--query.max-samples=500000000"]
    with open(directory / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", 600, proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc, 120)


class RunStream:
    """Posts each pipeline's runs as their schedule comes due, so counters and gauges keep changing while
    Prometheus is measured (about N × 58 runs a day: 13 runs/s at 20,000 pipelines)."""

    def __init__(self, url: str, pipelines: list[history.Pipeline], start: float, horizon: float) -> None:
        self.url, self.sent = url, 0
        for p in pipelines:
            p.runs = []
        history.schedule_runs(pipelines, start, start + horizon)
        self.due = sorted((t, p.name, ok, p) for p in pipelines for t, ok in p.runs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import random

        rng, index = random.Random(1), 0
        while not self._stop.wait(1.0) and index < len(self.due):
            now, batch = time.time(), []
            while index < len(self.due) and self.due[index][0] <= now:
                t, _, ok, p = self.due[index]
                batch.append(json.dumps(p.event(t, ok, rng)))
                index += 1
            if batch:
                with contextlib.suppress(OSError):
                    self.sent += post_ndjson(self.url, "\n".join(batch).encode())

    def __enter__(self) -> RunStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


# ---- preparing one N and rule set ----------------------------------------------------------------------


def fill(url: str, pipelines: list[history.Pipeline], start: float, end: float) -> int:
    history.schedule_runs(pipelines, start, end)
    return history.send_all(lambda body: post_ndjson(f"{url}/api/v1/runs", body),
                            history.fill_batches(pipelines, start))


def backfill_raw(directory: Path, target: str, plan: rules.HistoryPlan, pipelines: list[history.Pipeline],
                 start: float, end: float, step: float) -> int:
    body = get_text(f"http://{target}/metrics")
    series = history.live_series(body, plan.raw)
    missing = plan.raw - {s.name for s in series} - {s.name.rsplit("_", 1)[0] for s in series}
    if missing:
        log(f"  no such series in the exporter (nothing to backfill): {sorted(missing)}")
    files = history.write_history(series, pipelines, start, end, step, f'job="pipemon",instance="{target}"',
                                  directory)
    history.create_blocks(files, directory / "data", PROMTOOL)
    return len(series)


def backfill_recorded(directory: Path, prom: str, proc: subprocess.Popen, plan: rules.HistoryPlan, start: float,
                      end: float) -> None:
    """Each level of recording rules evaluated over the history by promtool against the running Prometheus,
    its blocks moved in; the next level waits until Prometheus has loaded them."""
    for number, groups in enumerate(plan.recorded_levels):
        rule_file, out = directory / f"backfill-{number}.yml", directory / f"backfill-{number}"
        rule_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        for attempt in range(3):  # promtool exits 0 with no blocks when its queries found nothing yet
            done = subprocess.run([PROMTOOL, "tsdb", "create-blocks-from", "rules", f"--url={prom}",
                                   f"--start={int(start)}", f"--end={int(end)}", f"--output-dir={out}",
                                   str(rule_file)], check=True, capture_output=True, text=True, timeout=7200)
            if out.is_dir():
                break
            log(f"  promtool wrote no blocks (attempt {attempt + 1}): {(done.stdout + done.stderr)[-500:]!r}")
            time.sleep(30)
        else:
            raise RuntimeError(f"promtool create-blocks-from rules wrote nothing for {rule_file}")
        before = reloads(prom)
        moved = 0
        for block in out.iterdir():
            if (block / "meta.json").exists():
                shutil.move(str(block), directory / "data" / block.name)
                moved += 1
        shutil.rmtree(out)
        if moved:
            # the next block reload after the move has them (their count alone can stay the same when
            # Prometheus merges overlapping blocks meanwhile)
            wait_until(lambda before=before: reloads(prom) > before + 1, 180, proc)


def reloads(prom: str) -> float:
    return sum(metric_values(get_text(f"{prom}/metrics"), "prometheus_tsdb_reloads_total").values())


def wait_until(condition: callable, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("Prometheus exited or did not get there in time")
        time.sleep(2)


def wait_compacted(prom: str, proc: subprocess.Popen) -> None:
    """Until Prometheus has run a compaction since the last blocks arrived and sits idle: the 2-hour
    backfilled blocks are merged into longer ones before the measurement, not during it."""
    triggered = lambda: sum(metric_values(get_text(f"{prom}/metrics"),  # noqa: E731
                                          "prometheus_tsdb_compactions_triggered_total").values())
    first = triggered()
    wait_until(lambda: triggered() > first, 300, proc)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        used = cpu_seconds(proc.pid)
        time.sleep(10)
        if cpu_seconds(proc.pid) - used < 3.0:  # below 30% of a core: scrapes only
            return
    log("  compaction still busy after 15 min; measuring anyway")


# ---- measuring ------------------------------------------------------------------------------------------


@dataclass
class GroupFigures:
    name: str
    interval: float
    durations: list[float] = field(default_factory=list)  # one per evaluation, after the first
    first: float | None = None  # the first evaluation (cold caches), not in `durations`
    missed: float = 0.0
    rule_times: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Result:
    pipelines: int
    rules: str
    head_series: int = 0
    rss_bytes: int = 0
    groups: list[GroupFigures] = field(default_factory=list)
    backfilled_series: int = 0
    backfill: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    load: str = ""
    other_cpu: float = 0.0  # cores busy with processes other than this benchmark's, during the measurement
    runs_streamed: int = 0

    def rule_seconds(self) -> float:
        return sum(statistics.median(g.durations) for g in self.groups if g.durations)

    def heaviest(self, count: int = 5) -> list[tuple[str, str, float]]:
        rows = [(name, g.name, statistics.median(times)) for g in self.groups for name, times in g.rule_times.items()
                if times]
        return sorted(rows, key=lambda row: -row[2])[:count]


def sample_rules(prom: str, groups: dict[str, GroupFigures], seen: dict[str, str]) -> None:
    for group in get_json(f"{prom}/api/v1/rules")["data"]["groups"]:
        figures = groups.setdefault(group["name"], GroupFigures(group["name"], group["interval"]))
        last = group.get("lastEvaluation", "")
        if not last or last.startswith("0001") or seen.get(group["name"]) == last:
            continue
        seen[group["name"]] = last
        if figures.first is None:
            figures.first = group["evaluationTime"]
            continue
        figures.durations.append(group["evaluationTime"])
        for index, rule in enumerate(group["rules"]):
            key = f"{rule['name']} #{index + 1}"  # several rules share a name (one per threshold, severity)
            figures.rule_times.setdefault(key, []).append(rule["evaluationTime"])


def measure(prom: str, proc: subprocess.Popen, s: Settings, result: Result, pids: list[int]) -> None:
    groups: dict[str, GroupFigures] = {}
    seen: dict[str, str] = {}
    started, busy0 = time.monotonic(), busy_seconds()
    ours0 = sum(cpu_seconds(pid) for pid in pids) + time.process_time()
    window = s.measure_minutes * 60
    longest = max(g["interval"] for g in get_json(f"{prom}/api/v1/rules")["data"]["groups"])
    cap = 3 * max(window, (s.min_evaluations + 2) * longest)  # missed iterations stretch the rounds
    while True:
        sample_rules(prom, groups, seen)
        elapsed = time.monotonic() - started
        enough = groups and all(len(g.durations) >= s.min_evaluations for g in groups.values())
        if (elapsed >= window and enough) or elapsed >= cap or proc.poll() is not None:
            break
        time.sleep(5)
    elapsed = time.monotonic() - started
    ours = sum(cpu_seconds(pid) for pid in pids) + time.process_time() - ours0
    result.other_cpu = max(0.0, (busy_seconds() - busy0 - ours) / elapsed)
    body = get_text(f"{prom}/metrics")
    missed = metric_values(body, "prometheus_rule_group_iterations_missed_total")
    for g in groups.values():
        g.missed = sum(v for labels, v in missed.items() if f';{g.name}"' in labels)
    result.groups = list(groups.values())
    result.head_series = get_json(f"{prom}/api/v1/status/tsdb")["data"]["headStats"]["numSeries"]
    result.rss_bytes = rss_bytes(proc.pid)
    result.seconds["measure"] = elapsed


def run_one(s: Settings, rule_set: rules.RuleSet, n: int, directory: Path) -> Result:
    result = Result(n, rule_set.label, load=loadavg())
    plan = rules.history_plan(rule_set, s.long_range)
    for name, window in plan.short_reads.items():
        if window < 2 * s.history_step:
            log(f"  warning: backfilled recordings read {name} over {window:g} s, under two history steps:"
                " their history is empty (use a shorter --history-step)")
    pipelines = history.fleet(n)
    evaluation = min(rule_set.interval(g) for g in rule_set.groups)
    t = time.monotonic()
    with exporter(directory, rule_set, n) as (target, exporter_proc):
        end = time.time()
        start = end - s.history - s.long_range  # a margin, so the backfilled recordings' own windows are full
        runs = fill(f"http://{target}", pipelines, start, end)
        result.seconds["fill"] = time.monotonic() - t
        log(f"  {runs:,} runs sent in {result.seconds['fill']:.0f} s; backfilling {sorted(plan.raw)} every"
            f" {s.history_step:.0f} s over {(end - start) / 3600:.0f} h")
        t = time.monotonic()
        (directory / "data").mkdir()
        result.backfilled_series = backfill_raw(directory, target, plan, pipelines, start, end, s.history_step)
        result.backfill = (f"{result.backfilled_series:,} series of {', '.join(sorted(plan.raw))} every"
                           f" {s.history_step:.0f} s; recorded: "
                           + (", ".join(r["record"] for level in plan.recorded_levels for g in level
                                        for r in g["rules"]) or "none"))
        with RunStream(f"http://{target}/api/v1/runs", pipelines, end, 6 * 3600) as stream:
            prep = prometheus_config(target, [], s.scrape_interval, evaluation)
            with prometheus(directory, prep, "prep") as (prom, proc):
                backfill_recorded(directory, prom, proc, plan, end - s.history, end)
                wait_compacted(prom, proc)
            result.seconds["backfill"] = time.monotonic() - t
            log(f"  history ready in {result.seconds['backfill']:.0f} s; measuring ≥ {s.measure_minutes:g} min")
            config = prometheus_config(target, rule_set.files(), s.scrape_interval, evaluation)
            with prometheus(directory, config, "measure") as (prom, proc):
                measure(prom, proc, s, result, [proc.pid, exporter_proc.pid])
            result.runs_streamed = stream.sent
    return result


# ---- the report -----------------------------------------------------------------------------------------


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def describe(r: Result) -> list[str]:
    lines = [f"## {r.pipelines:,} pipelines, rules {r.rules}",
             f"head series {r.head_series:,} ({r.head_series / r.pipelines:.1f} per pipeline); Prometheus RSS"
             f" {gib(r.rss_bytes)} ({r.rss_bytes / r.pipelines / 1024:.1f} KiB per pipeline); rule time"
             f" {r.rule_seconds():.3f} s per round ({r.rule_seconds() / r.pipelines * 1e6:.1f} µs per pipeline)",
             f"history: {r.backfill}; {r.runs_streamed:,} runs streamed while measured",
             f"load before: {r.load}; other processes used {r.other_cpu:.2f} cores while measured;"
             f" took {', '.join(f'{k} {v:.0f} s' for k, v in r.seconds.items())}",
             "",
             "| group | interval | evaluations | median | min–max | first | share of interval (median / max) |"
             " missed |",
             "|---|---|---|---|---|---|---|---|"]
    for g in r.groups:
        med = statistics.median(g.durations) if g.durations else float("nan")
        top = max(g.durations, default=float("nan"))
        lines.append(f"| {g.name} | {g.interval:g} s | {len(g.durations)} | {med:.3f} s |"
                     f" {min(g.durations, default=float('nan')):.3f}–{top:.3f} s | {g.first or 0:.3f} s |"
                     f" {med / g.interval:.1%} / {top / g.interval:.1%} | {g.missed:.0f} |")
    lines += ["", "heaviest rules (median evaluation time): " + "; ".join(
        f"`{name}` ({group}) {sec:.3f} s" for name, group, sec in r.heaviest())]
    return lines


def targets(results: list[Result]) -> list[str]:
    """The issue's targets, judged for every rule set (the landed rules are the reference, not the goal)."""
    lines = ["## targets"]
    by_rules: dict[str, list[Result]] = {}
    for r in results:
        by_rules.setdefault(r.rules, []).append(r)
    for label, rs in by_rules.items():
        big, small = max(rs, key=lambda r: r.pipelines), min(rs, key=lambda r: r.pipelines)
        worst = max((max(g.durations) / g.interval for g in big.groups if g.durations), default=float("nan"))
        missed = sum(g.missed for g in big.groups)
        lines.append(f"- {label}: at {big.pipelines:,} every group ≤ 10% of its interval: worst {worst:.1%}"
                     f" ({'yes' if worst <= TARGETS['group_share'] else 'NO'}); missed iterations {missed:.0f}"
                     f" ({'yes' if missed == 0 else 'NO'})")
        if big is not small:
            ratio = (big.rule_seconds() / big.pipelines) / (small.rule_seconds() / small.pipelines)
            lines.append(f"- {label}: rule time per pipeline at {big.pipelines:,} ÷ at {small.pipelines:,}:"
                         f" {ratio:.2f}× ({'yes' if ratio <= TARGETS['scaling'] else 'NO'}, target ≤ 1.2×)")
    labels = list(by_rules)
    if len(labels) == 2:
        old, new = labels[1], labels[0]
        for n in sorted({r.pipelines for r in results}):
            pair = {r.rules: r for r in results if r.pipelines == n}
            if old in pair and new in pair:
                ratio = pair[new].rss_bytes / pair[old].rss_bytes
                lines.append(f"- RSS per pipeline at {n:,}, {new} ÷ {old}: {ratio:.2f}×"
                             f" ({'yes' if ratio <= TARGETS['rss_ratio'] else 'NO'}, target ≤ 0.6×); head series"
                             f" {pair[new].head_series / pair[old].head_series:.2f}×; rule time"
                             f" {pair[new].rule_seconds() / pair[old].rule_seconds():.2f}×")
    return lines


def summary(results: list[Result]) -> list[str]:
    lines = ["| pipelines | rules | head series | per pipeline | RSS | KiB per pipeline | rule time per round |"
             " µs per pipeline | worst group (max share) | missed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        worst = max(r.groups, key=lambda g: max(g.durations, default=0) / g.interval)
        lines.append(f"| {r.pipelines:,} | {r.rules} | {r.head_series:,} | {r.head_series / r.pipelines:.1f} |"
                     f" {gib(r.rss_bytes)} | {r.rss_bytes / r.pipelines / 1024:.0f} | {r.rule_seconds():.2f} s |"
                     f" {r.rule_seconds() / r.pipelines * 1e6:.0f} | {worst.name}"
                     f" {max(worst.durations, default=0) / worst.interval:.1%} |"
                     f" {sum(g.missed for g in r.groups):.0f} |")
    return lines


# ---- main -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", default=None, help="comma-separated N (default 1000,5000,20000)")
    parser.add_argument("--rules-dir", type=Path, default=ROOT / "rules", help="working-tree rules (default rules/)")
    parser.add_argument("--rules-rev", default="7c93d63", help="landed rules and exporter ('' to skip)")
    parser.add_argument("--exporter-rev", default="",
                        help="run the working-tree rules against the exporter at this revision (default: the tree's)")
    parser.add_argument("--quick", action="store_true", help="N=200,1000 and 3 h of history")
    parser.add_argument("--history", default=None, help="backfilled history (default 1d; --quick 3h)")
    parser.add_argument("--history-step", default=None, help="sample step of the backfill (default 60s)")
    parser.add_argument("--measure-minutes", type=float, default=6.0)
    parser.add_argument("--min-evaluations", type=int, default=5, help="per group, after the first")
    parser.add_argument("--evaluation-interval", default=None, help="override every group's interval (tests)")
    parser.add_argument("--scrape-interval", default="15s")
    parser.add_argument("--max-seconds-per-n", type=float, default=3600,
                        help="stop before the next N once an N took longer than this")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs, blocks)")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace, tmp: Path) -> Settings:
    sets = [rules.from_directory(args.rules_dir.resolve())]
    if args.exporter_rev:
        sets[0].exporter_path = rules.exporter_at(ROOT, args.exporter_rev, tmp / "exporter-rev")
        sets[0].label += f" on the exporter of {args.exporter_rev}"
    if args.rules_rev:
        landed = rules.from_revision(ROOT, args.rules_rev, tmp / "landed")
        same_exporter = args.exporter_rev == args.rules_rev or (not args.exporter_rev
                                                                and not exporter_changed(args.rules_rev))
        if rules.same_files(sets[0], landed) and same_exporter:
            log(f"rules/ and the exporter are as in {args.rules_rev}: measuring them once")
            sets = []
        sets.append(landed)
    if args.evaluation_interval:
        sets = [rules.with_interval(r, args.evaluation_interval, tmp / f"rules-{i}") for i, r in enumerate(sets)]
    default_n = "200,1000" if args.quick else "1000,5000,20000"
    return Settings(
        pipelines=[int(n) for n in (args.pipelines or default_n).split(",")], rule_sets=sets,
        history=rules.seconds(args.history or ("3h" if args.quick else "1d")),
        history_step=rules.seconds(args.history_step or "60s"),
        scrape_interval=args.scrape_interval, measure_minutes=args.measure_minutes,
        min_evaluations=args.min_evaluations, keep=args.keep)


def exporter_changed(rev: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", rev, "--", "exporter"]).returncode != 0 or bool(
        subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "exporter"], capture_output=True,
                       text=True).stdout.strip())


def machine() -> str:
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    version = subprocess.run([PROMETHEUS, "--version"], capture_output=True, text=True)
    return (f"{os.cpu_count()} CPUs, {mem:.0f} GiB, Linux {os.uname().release};"
            f" {(version.stdout or version.stderr).splitlines()[0]}; load average at start {loadavg()}")


def run(args: argparse.Namespace, tmp: Path) -> list[str]:
    s = settings(args, tmp)
    results: list[Result] = []
    notes = [f"machine: {machine()}"]
    for n in s.pipelines:
        started = time.monotonic()
        for number, rule_set in enumerate(s.rule_sets):
            log(f"{n:,} pipelines, rules {rule_set.label}")
            directory = tmp / f"n{n}-{number}"
            directory.mkdir()
            results.append(run_one(s, rule_set, n, directory))
            print("\n".join(describe(results[-1])) + "\n", flush=True)
            if not s.keep:
                shutil.rmtree(directory, ignore_errors=True)
        took = time.monotonic() - started
        notes.append(f"{n:,} pipelines took {took / 60:.1f} min for {len(s.rule_sets)} rule set(s)")
        if took > args.max_seconds_per_n and n != s.pipelines[-1]:
            notes.append(f"stopped after {n:,} pipelines: it took {took / 60:.0f} min (--max-seconds-per-n)")
            break
    lines = ["# summary", *notes, "", *summary(results), "", *targets(results)]
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for binary in (PROMETHEUS, PROMTOOL):
        if not Path(binary).exists():
            print(f"{binary} is missing: apt-get install prometheus", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: every process stopped, temp dir removed
    tmp = Path(tempfile.mkdtemp(prefix="pipemon-prometheus-cost-"))
    try:
        run(args, tmp)
    except KeyboardInterrupt:
        log("interrupted; everything started is stopped")
        return 130
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
