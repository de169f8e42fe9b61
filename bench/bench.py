"""Exporter benchmark: ingest rates and /metrics cost at 1,000 and 10,000 pipelines.

Starts `pipemon serve` on loopback with a fresh state directory, drives it with an aiohttp client and
prints one line per figure. `--quick` runs a tiny version (used by the tests so this script cannot rot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import free_port, stop, wait_http  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def event(pipeline: int, run: str) -> dict:
    return {"pipeline": f"bench_pipeline_{pipeline:05d}", "run_id": run, "status": "success",
            "duration_seconds": 30.0 + pipeline % 17, "records_processed": 1000 + pipeline}


async def single_posts(url: str, count: int, pipelines: int, connections: int, tag: str) -> float:
    """Events per second, one event per request over `connections` keep-alive connections."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            async with session.post(f"{url}/api/v1/runs", json=event(i % pipelines, f"{tag}-{i}")) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        return count / (time.perf_counter() - started)


async def batches(url: str, count: int, batch: int, pipelines: int, tag: str, parallel: int = 2) -> float:
    """Events per second in NDJSON batches."""
    bodies = [
        "\n".join(json.dumps(event((b * batch + k) % pipelines, f"{tag}-{b}-{k}")) for k in range(batch)).encode()
        for b in range(count // batch)
    ]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(f"{url}/api/v1/runs", data=body,
                                    headers={"Content-Type": "application/x-ndjson"}) as resp:
                answer = await resp.json()
                assert resp.status == 200 and answer["rejected"] == 0, answer

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(parallel)))
        return len(bodies) * batch / (time.perf_counter() - started)


async def scrape_seconds(url: str, openmetrics: bool = False) -> tuple[float, int]:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.get(f"{url}/metrics", headers=headers) as resp:
            body = await resp.read()
        return time.perf_counter() - started, body.count(b"\n")


async def measure(url: str, pid: int, quick: bool) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    singles = 500 if quick else 20_000
    rows.append(("single-run POSTs, 32 connections",
                 f"{await single_posts(url, singles, 1000, 32, 'single'):,.0f} runs/s"))
    total = 2_000 if quick else 200_000
    rows.append(("NDJSON batches of 1,000", f"{await batches(url, total, 1000, 1000, 'batch'):,.0f} runs/s"))
    for pipelines in (1_000, 10_000) if not quick else (1_000,):
        await batches(url, pipelines, 1000, pipelines, f"fill{pipelines}")  # one run of each pipeline
        full, lines = await scrape_seconds(url)
        cached, _ = await scrape_seconds(url)
        om, _ = await scrape_seconds(url, openmetrics=True)
        rows.append((f"/metrics at {pipelines:,} pipelines ({lines:,} lines): re-render / cached / OpenMetrics",
                     f"{full * 1000:,.0f} / {cached * 1000:,.0f} / {om * 1000:,.0f} ms"))
        rows.append((f"RSS at {pipelines:,} pipelines", f"{rss_mib(pid):,.0f} MiB"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny run, to check the script works")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as state:
        proc = subprocess.Popen([sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{port}",
                                 "--state-dir", state, "--log-level", "warning"], env=os.environ.copy())
        try:
            wait_http(f"{url}/-/ready", 20, proc)
            rows = asyncio.run(measure(url, proc.pid, args.quick))
        finally:
            stop(proc)
    width = max(len(name) for name, _ in rows)
    print(f"pipemon exporter benchmark ({os.cpu_count()} CPUs, Python {sys.version.split()[0]})")
    for name, figure in rows:
        print(f"{name:<{width}}  {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
