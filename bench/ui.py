"""Benchmark of the web UI: the overview's server time and bytes, the recent-runs ring's memory, and the RSS
of an exporter holding 10,000 pipelines with and without the ring.

    python bench/ui.py [--sizes 1000,20000] [--rss-pipelines 10000] [--quick]

The overview is fetched over loopback HTTP from an in-process exporter (aiohttp's test server), whose
pipelines are filled directly through the state's `apply` (the ingest path is bench/bench.py's subject).
Server time is the median of 5 fetches after a first (cold) one, measured in the client: it includes HTTP
on loopback. The RSS figures come from two fresh processes (`--recent-runs 50` and `0`), each filling 10,000
pipelines with 60 runs and rendering /metrics once, as a scraped exporter does.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from pipemon.model.events import Finish, Start
from pipemon.model.recent import RecentRuns
from pipemon.service.app import EXPORTER_KEY, create_app
from pipemon.service.config import ServeConfig
from pipemon.web import UI_KEY

TEAMS = 8
TEAM_ENTRIES = ", ".join(f"team-{i}: {{}}" for i in range(TEAMS))
REGISTRY = f"teams: {{{TEAM_ENTRIES}}}\ndefaults: {{expected_interval: 1h}}\npipelines: []\n"


def fill(pipelines, registry, count: int, runs: int, now: float) -> None:
    """`count` pipelines with `runs` hourly runs each; one in ten fails its latest runs, one in twenty is
    slow, one in fifty has a run in progress for hours, one in thirty stopped reporting."""
    for p in range(count):
        name, team = f"pipeline_{p:05d}", f"team-{p % TEAMS}"
        spec = registry.default_spec(name, team)
        end = now - 600 - (5 * 3600 if p % 30 == 0 else 0)
        for r in range(runs):
            finished = end - 3600 * (runs - 1 - r)
            late = r >= runs - 2
            success = not (late and p % 10 == 0)
            duration = (80.0 if late and p % 20 == 1 else 10.0) * (1 + 0.03 * (r % 5))
            pipelines.apply(Finish(name, f"{name}-{r}", success, finished, duration, 1000 + r),
                            lambda *_args, spec=spec: spec)
        if p % 50 == 7:
            pipelines.apply(Start(name, "running", now - 4 * 3600), lambda *_args, spec=spec: spec)


async def overview_figures(count: int) -> list[tuple[str, float, float, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "pipelines.yaml"
        registry.write_text(REGISTRY)
        app = create_app(ServeConfig(registry=registry, state_dir=Path(tmp) / "state",
                                     max_pipelines=max(count, 20_000)))
        async with TestClient(TestServer(app)) as client:
            exporter = app[EXPORTER_KEY]
            pipelines = exporter.recorder.pipelines
            fill(pipelines, exporter.registry, count, 20, time.time())
            rows = []
            cold, body = await _fetch(client, "/")  # before the background judging got to them
            rows.append(("overview, right after the runs arrived", cold, math.nan, len(body)))
            for p, state in enumerate(list(pipelines)):  # one more run each: every pipeline changed
                spec = state.spec
                pipelines.apply(Finish(state.name, "one-more", p % 10 != 0, time.time() - 1, 10.0, 1000),
                                lambda *_args, spec=spec: spec)
            judge = app[UI_KEY].judge
            waited = time.perf_counter()
            while not all(judge.is_prepared(state) for state in pipelines):
                await asyncio.sleep(0.2)
            print(f"({count:,} pipelines: the background judging caught up with one new run each in"
                  f" {time.perf_counter() - waited:.1f} s)", file=sys.stderr)
            for label, path in (("overview, first page (judged in the background)", "/"),
                                ("overview, state=failing", "/?state=failing"),
                                ("overview, search", "/?q=pipeline_0042"),
                                ("overview, team, page 3", "/?team=team-3&page=3"),
                                ("pipeline page", "/pipelines/pipeline_00021")):
                cold, body = await _fetch(client, path)
                warm = statistics.median([(await _fetch(client, path))[0] for _ in range(5)])
                rows.append((label, cold, warm, len(body)))
            return rows


async def _fetch(client: TestClient, path: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    resp = await client.get(path)
    body = await resp.read()
    assert resp.status == 200, (path, resp.status)
    return time.perf_counter() - started, body


def ring_bytes(capacity: int = 50) -> tuple[float, float]:
    """Bytes one full ring adds: measured with tracemalloc over 1,000 rings, run ids shared with the dedup
    window (as in the exporter: the ring holds the same string objects), and with its own copies."""
    ids = [f"run-{i:06d}-{'x' * 24}" for i in range(capacity)]
    results = []
    for own_ids in (False, True):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        rings = []
        for _ in range(1000):
            ring = RecentRuns(capacity)
            for i, run_id in enumerate(ids):
                ring.add("".join(run_id) if own_ids else run_id, 0.0, i, i + 1.0, 1.0, 10.0)
            rings.append(ring)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        results.append(used / 1000)
        del rings
    return results[0], results[1]


def rss_child(pipelines: int, recent_runs: int, overview: int) -> None:
    """In a fresh process: an exporter's state with `pipelines` pipelines of 60 runs, /metrics rendered
    (and, with `overview`, the overview judged and rendered once: its cached facts per pipeline)."""
    from pipemon.model.health import HealthJudge
    from pipemon.service.app import Exporter
    from pipemon.web import overview as page
    from pipemon.web.alerts import AlertView

    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "pipelines.yaml"
        registry.write_text(REGISTRY)
        exporter = Exporter(ServeConfig(registry=registry, state_dir=Path(tmp) / "state", recent_runs=recent_runs))
        fill(exporter.recorder.pipelines, exporter.registry, pipelines, 60, time.time())
        asyncio.run(exporter.renderer.render(False))
        if overview:
            judge = HealthJudge.from_path(None, time.time())
            view = page.build(iter(exporter.recorder.pipelines), judge, page.Filters(), time.time())
            page.render(view, page.Filters(), judge, AlertView())
        gc.collect()
        rss = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        print(json.dumps({"rss_kib": rss}))
        exporter.renderer.close()


def rss_figures(pipelines: int) -> dict[tuple[int, int], float]:
    out = {}
    for recent, overview in ((0, 0), (50, 0), (50, 1)):
        proc = subprocess.run([sys.executable, __file__, "--rss-child", str(pipelines), str(recent), str(overview)],
                              capture_output=True, text=True, check=True)
        out[recent, overview] = json.loads(proc.stdout.strip().splitlines()[-1])["rss_kib"] / 1024
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,20000")
    parser.add_argument("--rss-pipelines", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 pipelines only, RSS at 1,000")
    parser.add_argument("--rss-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return 0
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",")]
    rss_pipelines = 1000 if args.quick else args.rss_pipelines
    print("| pipelines | page | first fetch (ms) | median of 5 (ms) | bytes |")
    print("|---:|---|---:|---:|---:|")
    for count in sizes:
        for label, cold, warm, size in asyncio.run(overview_figures(count)):
            median = "–" if math.isnan(warm) else f"{warm * 1000:.0f}"
            print(f"| {count:,} | {label} | {cold * 1000:.0f} | {median} | {size:,} |")
    shared, own = ring_bytes()
    print(f"\nrecent-runs ring, 50 runs: {shared:,.0f} bytes per pipeline (run ids shared with the dedup window),"
          f" {own:,.0f} with its own copies of 35-character run ids (after a restart)")
    rss = rss_figures(rss_pipelines)
    base = rss[0, 0]
    print(f"\nRSS at {rss_pipelines:,} pipelines (60 runs each, /metrics rendered once):"
          f" {base:,.0f} MiB without the ring (--recent-runs 0), {rss[50, 0]:,.0f} MiB with it (50):"
          f" {rss[50, 0] / base:.2f}×; after an overview too: {rss[50, 1]:,.0f} MiB, {rss[50, 1] / base:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
