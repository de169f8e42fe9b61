"""Replicas over one PostgreSQL, as real processes: a steady stream through the failing-over client while one
replica or the other is killed with SIGKILL (and once every database connection is cut), scrapes of both every
200 ms; then PostgreSQL itself stopped and started again.

Counted: every run the stream produced arrives exactly once (lost 0, counted twice 0) although some are sent
to both replicas on purpose; every replica's /metrics agrees after the stream; no counter of any scrape is
lower than the same counter in an earlier scrape of either replica."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from pipemon.client import FINISH_PATH, Reporter
from tests import pg
from tests.fault.common import Exporter, pipeline_samples, request, scrape, wait_until
from tests.helpers import samples

pytestmark = [pytest.mark.fault, pytest.mark.slow]
PIPELINES = [f"ha_{i:02d}" for i in range(20)]
COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


def replica(tmp: Path, name: str, url: str) -> Exporter:
    directory = tmp / name
    directory.mkdir()
    # A short checkpoint-free setup: checkpoints and truncation still run (every 10 s) during the stream.
    return Exporter(directory, "--state", url)


def event(pipeline: str, run_id: str) -> dict:
    return {"pipeline": pipeline, "run_id": run_id, "status": "success", "duration_seconds": 1.0,
            "records_processed": 10}


class Stream(threading.Thread):
    """Finish events at a steady pace through a Reporter that fails over between the replicas; every tenth
    run is also sent to both replicas at once, as a client that gave up on one and retried the other would."""

    def __init__(self, urls: list[str], spool: Path, rate: float = 40.0) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.reporter = Reporter(urls, spool=spool, timeout=3, retries=2, backoff=0.05)
        self.interval = 1.0 / rate
        self.sent: Counter[str] = Counter()  # runs per pipeline
        self.stop = threading.Event()

    def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            pipeline = PIPELINES[number % len(PIPELINES)]
            ev = event(pipeline, f"run-{number}")
            self.reporter.report(FINISH_PATH, ev)
            if number % 10 == 0:
                both = [threading.Thread(target=post_quietly, args=(f"{u}/api/v1/runs", ev)) for u in self.urls]
                for t in both:
                    t.start()
                for t in both:
                    t.join()
            self.sent[pipeline] += 1
            number += 1
            time.sleep(self.interval)


def post_quietly(url: str, ev: dict) -> None:
    """A send whose answer does not matter (the run also goes through the Reporter): a replica may be down."""
    with contextlib.suppress(OSError):
        request(url, ev, timeout=3)


class Scraper(threading.Thread):
    """Scrape the replicas in turn every 200 ms; remember the highest value of each counter series seen on any
    replica, and every scrape that shows less."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.high: dict[tuple, float] = {}
        self.decreases: list[str] = []
        self.scrapes = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        turn = 0
        while not self.stop.is_set():
            url = self.urls[turn % len(self.urls)]
            turn += 1
            try:
                status, text = request(f"{url}/metrics", timeout=5)
            except OSError:
                status = 0  # that replica is down right now
            if status == 200:
                self.scrapes[url] += 1
                self.check(url, text)
            time.sleep(0.2)

    def check(self, url: str, text: str) -> None:
        for key, value in samples(text).items():
            name = key[0]
            if not name.startswith("pipeline_") or not name.endswith(COUNTER_SUFFIXES):
                continue
            if value < self.high.get(key, float("-inf")):
                self.decreases.append(f"{url}: {name} {dict(key[1])} {value} < {self.high[key]}")
            self.high[key] = max(value, self.high.get(key, value))


def runs_per_pipeline(text: str) -> Counter[str]:
    counted: Counter[str] = Counter()
    for (name, labels), value in samples(text).items():
        if name == "pipeline_runs_total" and dict(labels)["pipeline"] in PIPELINES:
            counted[dict(labels)["pipeline"]] += int(value)
    return counted


def cut_connections(server: pg.PostgresServer, database: str) -> int:
    rows = server.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                      f" WHERE datname = '{database}' AND pid <> pg_backend_pid()")
    return rows[0][0]


def test_kill9_replicas_under_a_stream_loses_nothing_and_counts_once(tmp_path, postgres_server):
    url = postgres_server.new_database()
    database = url.rsplit("/", 1)[1]
    replicas = [replica(tmp_path, name, url) for name in ("a", "b")]
    for r in replicas:
        r.start()
    urls = [r.url for r in replicas]
    stream, scraper = Stream(urls, tmp_path / "spool.ndjson"), Scraper(urls)
    rng = random.Random(16)
    try:
        stream.start()
        scraper.start()
        time.sleep(1.0)
        for kill in range(10):
            victim = rng.choice(replicas)
            time.sleep(rng.uniform(0.3, 1.5))
            victim.kill9()
            time.sleep(rng.uniform(0.2, 1.0))
            victim.start()
            if kill == 4:
                assert cut_connections(postgres_server, database) >= 2  # both replicas' sessions, at once
        time.sleep(1.0)
        stream.stop.set()
        stream.join(30)
        time.sleep(0.5)
        scraper.stop.set()
        scraper.join(10)
        stream.reporter.flush()  # whatever went to the spool while neither answered
        assert not stream.reporter.spool.has_events()

        texts = [scrape(u) for u in urls]
        expected = stream.sent
        for u, text in zip(urls, texts, strict=True):
            counted = runs_per_pipeline(text)
            lost = {p: expected[p] - counted[p] for p in PIPELINES if counted[p] < expected[p]}
            twice = {p: counted[p] - expected[p] for p in PIPELINES if counted[p] > expected[p]}
            assert not lost and not twice, f"{u}: lost {lost}, counted twice {twice}"
        assert pipeline_samples(texts[0]) == pipeline_samples(texts[1]), "the replicas disagree"
        assert not scraper.decreases, "\n".join(scraper.decreases[:20])
        assert min(scraper.scrapes.values()) > 20, scraper.scrapes
        total = sum(expected.values())
        print(f"\n{total} runs ({total // 10} of them also sent to both replicas at once), 10 kill -9, one cut of"
              f" every database connection: lost 0, counted twice 0; {sum(scraper.scrapes.values())} scrapes,"
              " no counter decreased")
    finally:
        stream.stop.set()
        scraper.stop.set()
        for r in replicas:
            r.stop()


def test_postgres_stopped_ingest_503_metrics_serve_last_state_and_recover(tmp_path):
    pg.require()
    with pg.postgres() as server:
        url = server.new_database()
        replicas = [replica(tmp_path, name, url) for name in ("a", "b")]
        try:
            for r in replicas:
                r.start()
            a, b = (r.url for r in replicas)
            for i in range(10):
                assert request(f"{a}/api/v1/runs", event("ha_00", f"r{i}"))[0] == 200
            before = pipeline_samples(scrape(b))
            server.stop()
            for u in (a, b):
                status, body = request(f"{u}/api/v1/runs", event("ha_00", "during-outage"), timeout=15)
                assert status == 503 and body["error"]["reason"] == "storage_unavailable", body
                assert pipeline_samples(scrape(u, timeout=15)) == before  # the last state, still served
            server.start()
            # Recovers by itself: no restart of the replicas, the next write goes through.
            wait_until(lambda: request(f"{b}/api/v1/runs", event("ha_00", "after"))[0] == 200, 30,
                       "ingest to work again")
            after = [samples(scrape(u)) for u in (a, b)]
            for text in after:
                assert text[("pipeline_runs_total", frozenset({"pipeline": "ha_00", "team": "unowned",
                                                               "status": "success"}.items()))] == 11
            status, body = request(f"{a}/api/v1/runs", event("ha_00", "during-outage"))
            assert (status, body["status"]) == (200, "accepted"), body  # the 503 kept nothing
            logs = json.dumps([r.tail() for r in replicas])
            assert "Traceback" not in logs
        finally:
            for r in replicas:
                r.stop()
