"""Late events never rewrite history (issue 14), on real exporter processes: a replayed backlog ends exactly as
live traffic does, a finish that arrives after its run was abandoned replaces the abandonment, and a run that
never finishes still ends as a failure after its time. Each case also across a `kill -9` and restart."""

from __future__ import annotations

import random
import time

import pytest

from tests.fault.common import Exporter, pipeline_samples, post_ndjson, request, scrape, wait_until
from tests.helpers import iso, samples

pytestmark = pytest.mark.slow

REGISTRY = """unknown_pipelines: accept
teams:
  alpha: {}
pipelines:
  - {match: "backlog_*", team: alpha, max_runtime: 10m}
  - {match: "quick_*", team: alpha, max_runtime: 1s}
  - {match: "stuck_*", team: alpha, max_runtime: 2s}
"""
SWEEP = ("--sweep-interval", "0.05")  # the sweep gets to every run in progress, even mid-replay
RUNS, PIPELINES, CHUNK = 10_000, 5, 500
STUCK = ("stuck_live", "stuck_late", "stuck_mixed")


def exporter(tmp_path, name: str, *extra: str) -> Exporter:
    directory = tmp_path / name
    directory.mkdir()
    return Exporter(directory, *extra, registry=REGISTRY)


def pipelines(url: str) -> dict[str, dict]:
    status, body = request(f"{url}/api/v1/pipelines")
    assert status == 200, body
    return {p["pipeline"]: p for p in body["pipelines"]}


def backlog(seed: int = 14) -> list[tuple[float, str, dict]]:
    """10,000 runs of five pipelines that ended 5 to 30 hours ago, overlapping (a start every 45 s, up to
    400 s long), with failure streaks; every START and finish as (event time, endpoint, body), in time order."""
    rng = random.Random(seed)
    t0 = time.time() - 30 * 3600
    events = []
    for i in range(RUNS):
        pipeline, n = f"backlog_{i % PIPELINES}", i // PIPELINES
        started = t0 + 45 * n + rng.uniform(0, 5)
        finished = started + rng.uniform(20, 400)
        failing = n % 97 in (3, 4, 5) or rng.random() < 0.1
        run = {"pipeline": pipeline, "run_id": f"r{i}"}
        events.append((started, "runs/start", {**run, "started_at": iso(started)}))
        events.append((finished, "runs", {**run, "status": "failure" if failing else "success",
                                          "started_at": iso(started), "finished_at": iso(finished),
                                          "records_processed": rng.randrange(10_000)}))
    events.sort(key=lambda e: e[0])
    return events


def send(url: str, endpoint: str, bodies: list[dict]) -> None:
    status, answer = post_ndjson(f"{url}/api/v1/{endpoint}", bodies, timeout=30)
    assert status == 200 and answer["rejected"] == 0 and answer["duplicate"] == 0, (status, answer)


def send_live(url: str, events) -> None:
    """In time order, each stretch of events of one endpoint as one request: what live senders deliver."""
    stretch: list[dict] = []
    for i, (_, endpoint, body) in enumerate(events):
        stretch.append(body)
        if i + 1 == len(events) or events[i + 1][1] != endpoint or len(stretch) == CHUNK:
            send(url, endpoint, stretch)
            stretch = []


def replay_chunks(events):
    """As a spool flush sends them: chunks of 500 events in time order, each chunk's STARTs, then its finishes."""
    for i in range(0, len(events), CHUNK):
        chunk = events[i:i + CHUNK]
        yield [b for _, e, b in chunk if e == "runs/start"], [b for _, e, b in chunk if e == "runs"]


def facts(url: str) -> tuple[dict, dict]:
    text = scrape(url)
    return pipelines(url), {k: v for k, v in pipeline_samples(text).items() if k[0] != "pipeline_info"}


@pytest.mark.parametrize("kill", [False, True], ids=["straight", "kill-9-mid-replay"])
def test_a_replayed_backlog_ends_exactly_as_the_same_runs_sent_live(tmp_path, kill):
    events = backlog()
    with exporter(tmp_path, "live").start() as live, exporter(tmp_path, "replay", *SWEEP).start() as replay:
        send_live(live.url, events)
        started = time.monotonic()
        chunks = list(replay_chunks(events))
        for number, (starts, finishes) in enumerate(chunks):
            send(replay.url, "runs/start", starts)
            if kill and number == len(chunks) // 2:  # runs of this chunk are in progress: kill, restart
                replay.kill9()
                replay.start()
                time.sleep(0.3)  # several sweeps over the restored runs in progress
            send(replay.url, "runs", finishes)
        elapsed = time.monotonic() - started
        time.sleep(0.3)  # sweeps after the replay: nothing to abandon
        live_api, live_metrics = facts(live.url)
        replay_api, replay_metrics = facts(replay.url)
        abandoned = samples(scrape(replay.url))[("pipemon_runs_abandoned_total", frozenset())]
    print(f"\n{RUNS} runs ({len(events)} events) replayed in {elapsed:.2f} s"
          f" ({len(events) / elapsed:.0f} events/s){', with a kill -9 and restart' if kill else ''}")
    assert abandoned == 0
    assert replay_api == live_api
    assert replay_metrics == live_metrics
    # And those are the facts of the runs themselves.
    finishes = [b for _, e, b in events if e == "runs"]
    for name, summary in replay_api.items():
        own = [b for b in finishes if b["pipeline"] == name]
        streak = len(own) - 1 - max(i for i, b in enumerate(own) if b["status"] == "success")
        assert (summary["runs_success"], summary["runs_failure"], summary["runs_in_progress"]) == \
            (sum(b["status"] == "success" for b in own), sum(b["status"] == "failure" for b in own), 0)
        assert summary["consecutive_failures"] == streak
        assert iso(summary["last_run_timestamp"]) == own[-1]["finished_at"]


def run_facts(url: str, pipeline: str) -> dict:
    status, body = request(f"{url}/api/v1/pipelines/{pipeline}")
    assert status == 200, body
    return body


@pytest.mark.parametrize(("kill", "status"), [(False, "success"), (True, "success"), (True, "failure")],
                         ids=["success", "success-kill-9", "failure-kill-9"])
def test_a_finish_that_arrives_after_the_abandonment_ends_as_the_finish_says(tmp_path, kill, status):
    quick = "quick_job"
    with exporter(tmp_path, "late", "--sweep-interval", "0.1", "--abandon-after-factor", "2").start() as late, \
            exporter(tmp_path, "live").start() as live:
        now = time.time()
        first = {"pipeline": quick, "run_id": "r0", "status": "success", "started_at": iso(now - 60),
                 "finished_at": iso(now - 50), "records_processed": 5}
        start = {"pipeline": quick, "run_id": "r1", "started_at": iso(now - 0.5)}
        for exp in (late, live):
            send(exp.url, "runs", [first])
            send(exp.url, "runs/start", [start])
        # 2 × 1 s later the run is abandoned: a failure at its own start time, not at the sweep's.
        wait_until(lambda: run_facts(late.url, quick)["runs_in_progress"] == 0, 10, "the abandonment", 0.05)
        abandoned = run_facts(late.url, quick)
        assert (abandoned["runs_failure"], abandoned["consecutive_failures"]) == (1, 1)
        assert abandoned["last_run_timestamp"] == pytest.approx(now - 0.5, abs=1e-3)
        assert samples(scrape(late.url))[("pipemon_runs_abandoned_total", frozenset())] == 1
        if kill:
            late.kill9()
            late.start()
        done = {"pipeline": quick, "run_id": "r1", "status": status, "started_at": iso(now - 0.5),
                "finished_at": iso(time.time()), "records_processed": 7}
        assert post_ndjson(f"{late.url}/api/v1/runs", [done])[1]["accepted"] == 1
        send(live.url, "runs", [done])
        reverted_now = samples(scrape(late.url))[("pipemon_runs_abandonment_reverted_total", frozenset())]
        if kill:
            late.kill9()
            late.start()
        assert post_ndjson(f"{late.url}/api/v1/runs", [done])[1]["duplicate"] == 1  # a retry changes nothing
        late_api, late_metrics = facts(late.url)
        live_api, live_metrics = facts(live.url)
    assert reverted_now == 1
    assert late_api[quick]["abandonments_reverted"] == 1
    assert {**late_api[quick], "abandonments_reverted": 0} == live_api[quick]
    assert late_api[quick]["runs_success"] == (2 if status == "success" else 1)
    assert late_api[quick]["runs_failure"] == (0 if status == "success" else 1)
    # In /metrics the counters never go down: the abandonment's failure stays counted, the reverted counter
    # says it was taken back; everything else is what live traffic gives.
    labels = {("pipeline", quick), ("team", "alpha")}
    failure = ("pipeline_runs_total", frozenset({*labels, ("status", "failure")}))
    reverted = ("pipeline_runs_abandonment_reverted_total", frozenset(labels))
    assert float(late_metrics.pop(failure)) == float(live_metrics.pop(failure)) + 1
    assert (float(late_metrics.pop(reverted)), float(live_metrics.pop(reverted))) == (1, 0)
    assert late_metrics == live_metrics


@pytest.mark.parametrize("kill", [None, "kill9", "stop"], ids=["straight", "kill-9-before-its-time",
                                                                "restart-from-checkpoint"])
def test_a_run_that_never_finishes_still_ends_as_a_failure_after_its_time(tmp_path, kill):
    limit = 4.0  # 2 × a max runtime of 2 s
    exp = exporter(tmp_path, "stuck", "--sweep-interval", "0.1", "--abandon-after-factor", "2").start()
    try:
        hours_ago = time.time() - 5 * 3600
        live_finish = time.time()  # stuck_mixed: a live run, then a START of a backlog
        send(exp.url, "runs", [{"pipeline": "stuck_mixed", "run_id": "z", "status": "success",
                                "finished_at": iso(live_finish), "duration_seconds": 1}])
        sent = time.time()
        send(exp.url, "runs/start", [{"pipeline": "stuck_live", "run_id": "a", "started_at": iso(sent)},
                                     {"pipeline": "stuck_late", "run_id": "b", "started_at": iso(hours_ago)},
                                     {"pipeline": "stuck_mixed", "run_id": "c", "started_at": iso(hours_ago)}])
        if kill:
            time.sleep(1)
            exp.kill9() if kill == "kill9" else exp.stop()  # a clean stop checkpoints: restored from snapshots
            exp.start()
        time.sleep(max(0.0, sent + limit - 1.5 - time.time()))
        # The late STARTs are judged from their arrival, not from their 5 hours old timestamp.
        assert [run_facts(exp.url, p)["runs_in_progress"] for p in STUCK] == [1, 1, 1]
        wait_until(lambda: all(run_facts(exp.url, p)["runs_in_progress"] == 0 for p in STUCK), 10,
                   "the abandonments", 0.05)
        ended = time.time()
        # After its time, and not postponed by the restart: the arrival is stored with the START.
        assert sent + limit <= ended <= sent + limit + 2.5, ended - sent
        for pipeline, own_time in (("stuck_live", sent), ("stuck_late", hours_ago)):
            summary = run_facts(exp.url, pipeline)
            assert (summary["runs_failure"], summary["runs_success"], summary["consecutive_failures"]) == (1, 0, 1)
            assert summary["last_run_timestamp"] == pytest.approx(own_time, abs=1e-3)
        # A run finished after it started: that one stays the latest run, the streak stays 0.
        summary = run_facts(exp.url, "stuck_mixed")
        assert (summary["runs_failure"], summary["runs_success"], summary["consecutive_failures"]) == (1, 1, 0)
        assert summary["last_run_timestamp"] == pytest.approx(live_finish, abs=1e-3)
        exp.kill9()
        exp.start()
        time.sleep(0.3)
        for pipeline in STUCK:
            summary = run_facts(exp.url, pipeline)
            assert (summary["runs_failure"], summary["runs_in_progress"]) == (1, 0)
    finally:
        exp.stop()
