"""Guarantee 5, load: a steady stream of single and batched events for PIPEMON_SOAK_SECONDS (default 180) with a
scrape every second: zero errors, flat memory, and the counters equal the events sent."""

from __future__ import annotations

import os
import statistics
import threading
import time

import pytest

from tests.fault.common import Exporter, Stopwatch, metric, post_ndjson, request, runs_counted, scrape
from tests.helpers import samples

pytestmark = [pytest.mark.fault, pytest.mark.slow]

SOAK_SECONDS = float(os.environ.get("PIPEMON_SOAK_SECONDS", "180"))
PIPELINES = 10
REQUESTS_PER_SECOND = 40  # half single events, half NDJSON batches of 10: 220 events/s


def test_soak_steady_rate_with_scrapes_every_second(tmp_path):
    with Exporter(tmp_path) as exp:
        exp.start()
        url = f"{exp.url}/api/v1/runs"
        # Warm-up: fill every pipeline's dedup window (1,000 run ids) and baseline, so that what the state may
        # legitimately grow to is reached before memory is watched.
        sent = 0
        for p in range(PIPELINES):
            events = [{"pipeline": f"soak_{p}", "run_id": f"w{i}", "status": "success", "duration_seconds": 5 + i % 3,
                       "records_processed": 100} for i in range(1200)]
            status, body = post_ndjson(url, events, timeout=30)
            assert status == 200 and body["accepted"] == 1200, body
            sent += 1200
        scrape(exp.url)

        errors: list[str] = []
        scrape_seconds: list[float] = []
        ingest_seconds: list[float] = []
        stop = threading.Event()
        counter = {"sent": sent, "requests": 0, "scrapes": 0}

        def ingest() -> None:
            i = 0
            next_at = time.monotonic()
            while not stop.is_set():
                next_at += 1 / REQUESTS_PER_SECOND
                n = 1 if i % 2 == 0 else 10
                events = [{"pipeline": f"soak_{(i + k) % PIPELINES}", "run_id": f"s{i}-{k}",
                           "status": "failure" if (i + k) % 17 == 0 else "success",
                           "duration_seconds": 5 + (i + k) % 3, "records_processed": 100} for k in range(n)]
                start = time.monotonic()
                try:
                    if n == 1:
                        status, body = request(url, events[0], timeout=10)
                        ok = status == 200 and body["status"] == "accepted"
                    else:
                        status, body = post_ndjson(url, events, timeout=10)
                        ok = status == 200 and body["accepted"] == n
                except OSError as exc:
                    ok, status, body = False, 0, repr(exc)
                ingest_seconds.append(time.monotonic() - start)
                counter["requests"] += 1
                if ok:
                    counter["sent"] += n
                else:
                    errors.append(f"ingest {status}: {str(body)[:200]}")
                i += 1
                time.sleep(max(0.0, next_at - time.monotonic()))

        def scraper() -> None:
            variants = [{}, {"Accept": "application/openmetrics-text; version=1.0.0"}, {"Accept-Encoding": "gzip"}]
            n = 0
            while not stop.wait(1.0):
                start = time.monotonic()
                try:
                    status, text = request(f"{exp.url}/metrics", headers=variants[n % 3], timeout=10)
                    if status != 200:
                        errors.append(f"scrape {status}")
                    elif n % 3 != 2:
                        samples(text)  # parses
                except (OSError, ValueError) as exc:
                    errors.append(f"scrape: {exc!r}")
                scrape_seconds.append(time.monotonic() - start)
                counter["scrapes"] += 1
                n += 1

        watch = Stopwatch(exp.proc.pid, 1.0)
        threads = [threading.Thread(target=ingest), threading.Thread(target=scraper)]
        watch.start()
        for t in threads:
            t.start()
        try:
            stop.wait(SOAK_SECONDS)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            watch.halt.set()
            watch.join(5)

        assert exp.proc.poll() is None, exp.tail()
        text = scrape(exp.url)
        counted = runs_counted(text, "soak_")
        rss = [kib for _, kib in watch.rss]
        third = max(1, len(rss) // 3)
        early, late = statistics.median(rss[:third]), statistics.median(rss[-third:])
        scrape_seconds.sort()
        ingest_seconds.sort()
        p99 = scrape_seconds[int(len(scrape_seconds) * 0.99) - 1] if scrape_seconds else 0
        print(f"\nsoak {SOAK_SECONDS:.0f}s: {counter['sent'] - sent} events in {counter['requests']} requests,"
              f" {counter['scrapes']} scrapes, {len(errors)} errors; RSS first third {early / 1024:.1f} MiB, last"
              f" third {late / 1024:.1f} MiB (max {max(rss) / 1024:.1f}); scrape p99 {p99 * 1000:.0f} ms, ingest"
              f" p99 {ingest_seconds[int(len(ingest_seconds) * 0.99) - 1] * 1000:.0f} ms;"
              f" storage errors {metric(text, 'pipemon_storage_errors_total'):.0f}")
        assert errors == [], errors[:10]
        assert counted == counter["sent"], (counted, counter["sent"])
        assert counter["scrapes"] >= SOAK_SECONDS * 0.8
        assert metric(text, "pipemon_storage_errors_total") == 0
        assert late - early < 8 * 1024, (early, late)
