"""The recent-runs ring: bounded, in order, kept across restarts, served at /api/v1/pipelines/NAME/runs."""

import dataclasses
import json
import math
import time

import msgspec
import pytest

from pipemon.model.events import Abandon
from pipemon.model.recent import RecentRuns
from pipemon.model.registry import parse_registry
from pipemon.model.state import Pipelines, PipelineState, Snapshot
from pipemon.service.recorder import SNAPSHOT_DECODER
from tests.helpers import iso, run


async def post(client, body, path="/api/v1/runs"):
    resp = await client.post(path, data=json.dumps(body))
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def runs_of(client, name, **query):
    resp = await client.get(f"/api/v1/pipelines/{name}/runs", params=query)
    return resp.status, await resp.json()


async def test_ring_keeps_the_last_runs_in_order_and_survives_a_restart(exporter_client, config):
    cfg = dataclasses.replace(config, recent_runs=5)
    client = await exporter_client(cfg)
    now = time.time() - 1000
    for i in range(8):
        status = "failure" if i == 6 else "success"
        await post(client, run("orders_daily", f"r{i}", status, finished_at=iso(now + 60 * i), duration_seconds=10 + i,
                               records_processed=100 * i))
    await post(client, {"pipeline": "orders_daily", "run_id": "live", "started_at": iso(now + 600)},
               "/api/v1/runs/start")
    status, body = await runs_of(client, "orders_daily")
    assert status == 200 and body["capacity"] == 5
    assert [r["run_id"] for r in body["runs"]] == ["r7", "r6", "r5", "r4", "r3"]  # latest first, bounded
    latest = body["runs"][0]
    assert latest["status"] == "success" and latest["duration_seconds"] == 17 and latest["records"] == 700
    assert latest["throughput_records_per_second"] == pytest.approx(700 / 17)
    assert latest["finished_timestamp"] == pytest.approx(now + 420, abs=0.01)
    assert latest["started_timestamp"] == pytest.approx(now + 420 - 17, abs=0.01)
    assert body["runs"][1]["status"] == "failure"
    status, body = await runs_of(client, "orders_daily", limit="2")
    assert [r["run_id"] for r in body["runs"]] == ["r7", "r6"]

    await client.close()  # checkpoints on close
    client = await exporter_client(cfg)
    status, again = await runs_of(client, "orders_daily")
    assert [r["run_id"] for r in again["runs"]] == ["r7", "r6", "r5", "r4", "r3"]
    assert again["runs"][0] == latest


async def test_a_finish_after_a_start_takes_the_start_time(exporter_client):
    client = await exporter_client()
    now = time.time() - 100
    await post(client, {"pipeline": "orders_daily", "run_id": "a", "started_at": iso(now)}, "/api/v1/runs/start")
    await post(client, run("orders_daily", "a", finished_at=iso(now + 30), duration_seconds=25))
    _, body = await runs_of(client, "orders_daily")
    (only,) = body["runs"]
    assert only["started_timestamp"] == pytest.approx(now, abs=0.01)  # the START's, not finish - duration
    assert only["duration_seconds"] == 25


async def test_runs_api_rejects_bad_input_and_unknown_pipelines(exporter_client):
    client = await exporter_client()
    status, body = await runs_of(client, "no_such_pipeline")
    assert status == 404 and body["error"]["reason"] == "not_found"
    for bad in ("0", "-1", "x", "1e3", "²", "٣"):  # Unicode digits: isdigit() but not int()
        status, body = await runs_of(client, "orders_daily", limit=bad)
        assert status == 400 and body["error"]["field"] == "limit"


def _spec():
    return parse_registry("teams: {t: {}}\npipelines: [{match: p, team: t}]\n").lookup("p")


def test_abandonment_is_a_run_of_the_ring_until_its_finish_replaces_it():
    from pipemon.model.events import Finish, Start

    pipelines = Pipelines(recent_runs=10)
    spec = _spec()
    pipelines.apply(Start("p", "a", 1000.0), lambda *_: spec)
    pipelines.apply(Abandon("p", "a", 9000.0), lambda *_: spec)
    (entry,) = pipelines.get("p").recent
    assert (entry.status, entry.started, entry.finished) == ("abandoned", 1000.0, 9000.0)
    pipelines.apply(Finish("p", "a", True, 1100.0, 100.0, 5), lambda *_: spec)
    (entry,) = pipelines.get("p").recent
    assert (entry.status, entry.started, entry.duration, entry.records) == ("success", 1000.0, 100.0, 5.0)


def test_checkpoints_from_before_the_ring_still_load():
    """A Snapshot encoded without the ring's fields (an older pipemon) restores with an empty ring."""
    old = msgspec.msgpack.encode(["p", "t", 1, 0, [0] * 17, 10.0, 1, 5, 100.0, 100.0, True, 10.0, 5.0, 0.5, 0, {},
                                  [], None, {"r": 2}, 7])
    snap = SNAPSHOT_DECODER.decode(old)
    assert snap.recent_ids == [] and snap.recent_values == []
    state = PipelineState.restore(snap, _spec(), 30)
    assert len(state.recent) == 0 and state.runs_success == 1


def test_a_ring_whose_lists_disagree_is_dropped_and_a_smaller_capacity_keeps_the_latest():
    assert len(RecentRuns.from_lists(5, ["a", "b"], [0.0] * 5)) == 0
    ring = RecentRuns.from_lists(1, ["a", "b"], [0.0, 1, 2, 3, 4, 1.0, 5, 6, 1, math.nan])
    (only,) = ring
    assert (only.run_id, only.status, only.started) == ("b", "failure", 5.0)
    fields = Snapshot.__struct_fields__  # array-like: new fields only ever come after the older ones
    assert {"recent_ids", "recent_values"} <= set(fields[fields.index("runs_reverted") + 1:])


def test_a_restored_ring_shares_its_run_ids_with_the_restored_dedup_window():
    pipelines = Pipelines(recent_runs=3)
    spec = _spec()
    from pipemon.model.events import Finish

    for i in range(5):
        pipelines.apply(Finish("p", f"run-{i}-" + "x" * 30, True, 100.0 + i, 1.0, 1), lambda *_: spec)
    blob = msgspec.msgpack.encode(pipelines.get("p").snapshot())
    restored = PipelineState.restore(SNAPSHOT_DECODER.decode(blob), spec, 30, recent_runs=3)
    seen_keys = {id(key) for key in restored.seen}
    assert [r.run_id for r in restored.recent] == [f"run-{i}-" + "x" * 30 for i in (2, 3, 4)]
    assert all(id(run_id) in seen_keys for run_id in restored.recent.ids)
