"""High availability figures, side by side in one run: pipemon on SQLite vs on PostgreSQL (real processes).

`python bench/ha.py` starts a PostgreSQL 15 of its own (tests/pg.py: a temporary cluster on a free port, fsync
on) and `pipemon serve` processes on loopback, then prints:
  1. ingest: single runs one request at a time (one keep-alive connection), single runs from 8 concurrent
     clients, and NDJSON batches of 500, on SQLite and on PostgreSQL;
  2. replication lag between two replicas over one database: from the moment replica A acknowledged a run
     (it is committed) to the moment replica B shows it, polling B's /api/v1/pipelines/NAME every 1 ms
     (that route does not catch up first, unlike /metrics, so this is the follower's own lag: NOTIFY);
  3. the cost of a whole scrape vs one of 4 shards at 10,000 pipelines, with 100 pipelines changed before
     each scrape (what a scrape interval brings), plain and gzip.
Figures are medians (and p99) of repeated measurements; the machine may be shared, so expect noise.
`--quick` is a tiny run that prints every row.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import pg  # noqa: E402
from tests.procs import free_port, stop, wait_http  # noqa: E402

REGISTRY = "unknown_pipelines: accept\nteams:\n  bench: {}\n"


def event(pipeline: str, run_id: str) -> dict:
    return {"pipeline": pipeline, "run_id": run_id, "status": "success", "duration_seconds": 30.0,
            "records_processed": 1000}


class Serve:
    """One `pipemon serve` process."""

    def __init__(self, workdir: Path, name: str, state: str | None) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        (self.dir / "registry.yaml").write_text(REGISTRY)
        self.port = free_port()
        cmd = [sys.executable, "-m", "pipemon.cli", "serve", "--listen", f"127.0.0.1:{self.port}",
               "--registry", str(self.dir / "registry.yaml"), "--state-dir", str(self.dir / "state"),
               "--max-pipelines", "50000"]
        if state:
            cmd += ["--state", state]
        self.log = open(self.dir / "serve.log", "wb")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"http://127.0.0.1:{self.port}/-/ready", 30, self.proc)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


def call(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, resp.read()


def post_run(conn: http.client.HTTPConnection, ev: dict) -> None:
    status, body = call(conn, "POST", "/api/v1/runs", json.dumps(ev).encode(), {"Content-Type": "application/json"})
    assert status == 200, (status, body[:200])


def post_batch(conn: http.client.HTTPConnection, events: list[dict]) -> None:
    body = b"\n".join(json.dumps(e).encode() for e in events)
    status, answer = call(conn, "POST", "/api/v1/runs", body, {"Content-Type": "application/x-ndjson"})
    assert status == 200, (status, answer[:200])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- 1. ingest ---------------------------------------------------------------------------------------


def ingest_single(serve: Serve, count: int, tag: str) -> dict[str, float]:
    conn = serve.connection()
    latencies = []
    started = time.perf_counter()
    for i in range(count):
        t = time.perf_counter()
        post_run(conn, event(f"single_{i % 100}", f"{tag}-{i}"))
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    conn.close()
    return {"per_s": count / elapsed, "p50_ms": 1000 * pct(latencies, 0.5), "p99_ms": 1000 * pct(latencies, 0.99)}


def ingest_concurrent(serve: Serve, count: int, tag: str, clients: int = 8) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = serve.connection()
        mine = []
        for i in range(count // clients):
            t = time.perf_counter()
            post_run(conn, event(f"conc_{(k * 7 + i) % 100}", f"{tag}-{k}-{i}"))
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"per_s": len(latencies) / elapsed, "p50_ms": 1000 * pct(latencies, 0.5),
            "p99_ms": 1000 * pct(latencies, 0.99)}


def ingest_batched(serve: Serve, batches: int, tag: str, size: int = 500) -> dict[str, float]:
    conn = serve.connection()
    latencies = []
    started = time.perf_counter()
    for b in range(batches):
        events = [event(f"batch_{i % 1000}", f"{tag}-{b}-{i}") for i in range(size)]
        t = time.perf_counter()
        post_batch(conn, events)
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    conn.close()
    return {"per_s": batches * size / elapsed, "p50_ms": 1000 * pct(latencies, 0.5),
            "p99_ms": 1000 * pct(latencies, 0.99)}


# ---- 2. replication lag ------------------------------------------------------------------------------


def replication_lag(a: Serve, b: Serve, samples: int) -> list[float]:
    ca, cb = a.connection(), b.connection()
    lags = []
    for i in range(samples):
        name = f"lag_{i:05d}"
        post_run(ca, event(name, "r1"))
        acked = time.perf_counter()
        while call(cb, "GET", f"/api/v1/pipelines/{name}")[0] != 200:
            time.sleep(0.001)
        lags.append(time.perf_counter() - acked)
        time.sleep(0.01)
    ca.close()
    cb.close()
    return lags


# ---- 3. sharded vs whole scrape ----------------------------------------------------------------------


def fill(serve: Serve, pipelines: int) -> None:
    conn = serve.connection()
    for start in range(0, pipelines, 500):
        post_batch(conn, [event(f"fleet_{i:05d}", "r0") for i in range(start, min(pipelines, start + 500))])
    conn.close()


def scrape_cost(serve: Serve, pipelines: int, path: str, repeats: int, gzipped: bool) -> tuple[float, int]:
    """Median seconds and bytes of a scrape of `path`, 100 pipelines changed before each."""
    conn = serve.connection()
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}
    call(conn, "GET", path, headers=headers)  # the first render fills the caches
    times, size = [], 0
    for r in range(repeats):
        post_batch(conn, [event(f"fleet_{(r * 100 + i) % pipelines:05d}", f"s{path}{gzipped}{r}-{i}")
                          for i in range(100)])
        t = time.perf_counter()
        status, body = call(conn, "GET", path, headers=headers)
        times.append(time.perf_counter() - t)
        assert status == 200
        size = len(body)
    conn.close()
    return statistics.median(times), size


# ---- the run -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def exporters(workdir: Path, url: str) -> Iterator[dict[str, Serve]]:
    started: dict[str, Serve] = {}
    try:
        started["sqlite"] = Serve(workdir, "sqlite", None)
        started["postgresql"] = Serve(workdir, "postgresql", url)
        started["replica"] = Serve(workdir, "replica", url)
        yield started
    finally:
        for serve in started.values():
            serve.stop()


def report_ingest(procs: dict[str, Serve], n_single: int, n_conc: int, n_batches: int) -> None:
    print("## ingest (events/s; latency per request)\n")
    print("| load | SQLite | PostgreSQL | PostgreSQL / SQLite |")
    print("| --- | --- | --- | --- |")
    rows = [("single runs, 1 client", lambda s, t: ingest_single(s, n_single, t)),
            ("single runs, 8 clients", lambda s, t: ingest_concurrent(s, n_conc, t)),
            ("NDJSON batches of 500", lambda s, t: ingest_batched(s, n_batches, t))]
    for label, measure in rows:
        lite, post = measure(procs["sqlite"], f"l{label}"), measure(procs["postgresql"], f"p{label}")
        print(f"| {label} | {lite['per_s']:,.0f}/s (p50 {lite['p50_ms']:.1f} ms, p99 {lite['p99_ms']:.1f}"
              f" ms) | {post['per_s']:,.0f}/s (p50 {post['p50_ms']:.1f} ms, p99 {post['p99_ms']:.1f} ms)"
              f" | {post['per_s'] / lite['per_s']:.2f} |")


def report_lag(procs: dict[str, Serve], samples: int) -> None:
    lags = replication_lag(procs["postgresql"], procs["replica"], samples)
    print(f"\n## replication lag, commit on one replica → visible on the other ({len(lags)} runs)\n")
    print("| p50 | p99 | max |\n| --- | --- | --- |")
    print(f"| {1000 * pct(lags, 0.5):.1f} ms | {1000 * pct(lags, 0.99):.1f} ms | {1000 * max(lags):.1f} ms |")


def report_scrapes(serve: Serve, fleet: int, repeats: int) -> None:
    fill(serve, fleet)
    conn = serve.connection()
    tracked = len(json.loads(call(conn, "GET", "/api/v1/pipelines")[1])["pipelines"])
    conn.close()
    print(f"\n## scrape cost at {fleet:,} pipelines ({tracked:,} tracked with those of the runs above;"
          f" PostgreSQL replica, median of {repeats};"
          " 100 pipelines changed before each)\n")
    print("| scrape | plain | gzip |\n| --- | --- | --- |")
    paths = [("whole /metrics", "/metrics")] + [(f"shard {k} of 4", f"/metrics?shard={k}&shards=4") for k in range(4)]
    for label, path in paths:
        plain = scrape_cost(serve, fleet, path, repeats, False)
        packed = scrape_cost(serve, fleet, path, repeats, True)
        print(f"| {label} | {1000 * plain[0]:.1f} ms, {plain[1] / 1e6:.1f} MB | {1000 * packed[0]:.1f} ms,"
              f" {packed[1] / 1e6:.2f} MB |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run that prints every row")
    args = parser.parse_args()
    n_single, n_conc, n_batches, n_lag = (50, 80, 4, 20) if args.quick else (1000, 2000, 40, 300)
    fleet, repeats = (1000, 3) if args.quick else (10_000, 9)
    if not pg.available():
        print("PostgreSQL 15 not installed (apt-get install postgresql)", file=sys.stderr)
        return 2
    with (tempfile.TemporaryDirectory(prefix="pipemon-bench-ha-") as tmp, pg.postgres(fsync=True) as server,
          exporters(Path(tmp), server.new_database()) as procs):
        report_ingest(procs, n_single, n_conc, n_batches)
        report_lag(procs, n_lag)
        report_scrapes(procs["postgresql"], fleet, repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
