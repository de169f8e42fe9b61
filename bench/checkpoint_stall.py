"""How long single-run POSTs wait while checkpoints are written, after a long ingest.

Fills an exporter with PIPELINES pipelines × RUNS runs (so every pipeline carries a dedup window), then
keeps every pipeline changing with NDJSON batches while one client times single-run POSTs. Each 10 s
checkpoint then snapshots thousands of pipelines; the figure is how long a POST waits meanwhile.

    python bench/checkpoint_stall.py [--pipelines 5000] [--runs 200] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import free_port, stop, wait_http  # noqa: E402

NDJSON = {"Content-Type": "application/x-ndjson"}


def batch(pipelines: range, tag: str) -> bytes:
    return "\n".join(json.dumps({"pipeline": f"p{p}", "run_id": f"{tag}-{p}", "status": "success",
                                 "duration_seconds": 1.0}) for p in pipelines).encode()


async def fill(session: aiohttp.ClientSession, url: str, pipelines: int, runs: int) -> None:
    for r in range(runs):
        for start in range(0, pipelines, 1000):
            async with session.post(url, data=batch(range(start, min(start + 1000, pipelines)), f"fill{r}"),
                                    headers=NDJSON) as resp:
                assert resp.status == 200, await resp.text()


async def churn(session: aiohttp.ClientSession, url: str, pipelines: int, until: float) -> None:
    """Keep every pipeline dirty: a batch of 1,000 runs every 0.2 s, cycling through the pipelines."""
    n = 0
    while time.monotonic() < until:
        start = (n * 1000) % pipelines
        async with session.post(url, data=batch(range(start, min(start + 1000, pipelines)), f"churn{n}"),
                                headers=NDJSON) as resp:
            await resp.read()
        n += 1
        await asyncio.sleep(0.2)


async def probe(session: aiohttp.ClientSession, url: str, until: float) -> list[float]:
    latencies, n = [], 0
    while time.monotonic() < until:
        body = {"pipeline": "probe", "run_id": f"probe{n}", "status": "success", "duration_seconds": 1.0}
        started = time.perf_counter()
        async with session.post(url, json=body) as resp:
            await resp.read()
        latencies.append(time.perf_counter() - started)
        n += 1
        await asyncio.sleep(0.01)
    return latencies


async def measure(url: str, args: argparse.Namespace) -> list[float]:
    async with aiohttp.ClientSession() as session:
        await fill(session, url, args.pipelines, args.runs)
        until = time.monotonic() + args.seconds
        _, latencies = await asyncio.gather(churn(session, url, args.pipelines, until), probe(session, url, until))
        return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        proc = subprocess.Popen([sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{port}",
                                 "--state-dir", state, "--log-level", "warning"], cwd=ROOT)
        try:
            wait_http(f"http://127.0.0.1:{port}/-/ready", 20, proc)
            latencies = sorted(asyncio.run(measure(f"http://127.0.0.1:{port}/api/v1/runs", args)))
        finally:
            stop(proc)
    p99 = latencies[int(len(latencies) * 0.99)]
    print(f"{args.pipelines:,} pipelines × {args.runs} runs, then {args.seconds:.0f} s of churn: {len(latencies)}"
          f" single POSTs, median {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
          f" max {latencies[-1] * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
