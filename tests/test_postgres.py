"""The PostgreSQL state backend, in process against a real PostgreSQL (tests/pg.py): the schema and its version,
the SQLite guarantees (acknowledged = committed, a failed write keeps nothing, a restart gives the same
/metrics) and replicas over one database (each one's writes visible on the others' next scrape, a run sent to
two replicas counted once)."""

import asyncio
import contextlib
import dataclasses
import json

import pytest

from tests.helpers import run, samples, value

pytestmark = pytest.mark.slow
P = {"pipeline": "orders_daily", "team": "data-eng"}


def exported(text: str) -> list:
    return sorted((name, sorted(labels), repr(v)) for (name, labels), v in samples(text).items()
                  if name.startswith("pipeline_"))


@pytest.fixture
def pg_config(config, pg_url):
    return dataclasses.replace(config, state=pg_url)


async def post(client, event: dict, path: str = "/api/v1/runs"):
    resp = await client.post(path, data=json.dumps(event))
    return resp.status, await resp.json()


async def send_history(client) -> None:
    for i in range(12):
        status, _ = await post(client, run("orders_daily", f"r{i}", "failure" if i % 5 == 4 else "success",
                                           duration_seconds=10.0 + i, records_processed=100 * i))
        assert status == 200
    await post(client, {"pipeline": "cdc_x", "run_id": "s1"}, "/api/v1/runs/start")


async def metrics(client) -> str:
    return await (await client.get("/metrics")).text()


async def test_schema_is_created_with_its_version(exporter_client, pg_config, postgres_server):
    from pipemon.backends.postgres import SCHEMA_VERSION

    client = await exporter_client(pg_config)
    await client.close()
    database = pg_config.state.rsplit("/", 1)[1]
    assert postgres_server.sql("SELECT value FROM pipemon_meta WHERE key = 'schema_version'", database) == [
        (SCHEMA_VERSION,)]
    tables = {r[0] for r in postgres_server.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                                                database)}
    assert {"pipemon_meta", "pipemon_log", "pipemon_pipelines"} <= tables


async def test_newer_schema_is_refused_and_left_alone(exporter_client, pg_config, postgres_server):
    from pipemon.backends import StorageError

    client = await exporter_client(pg_config)
    await client.close()
    database = pg_config.state.rsplit("/", 1)[1]
    postgres_server.sql("UPDATE pipemon_meta SET value = 99 WHERE key = 'schema_version'", database)
    with pytest.raises(StorageError, match="schema version 99"):
        await exporter_client(pg_config)
    assert postgres_server.sql("SELECT value FROM pipemon_meta WHERE key = 'schema_version'", database) == [(99,)]


async def test_restart_gives_identical_metrics(exporter_client, pg_config):
    client = await exporter_client(pg_config)
    await send_history(client)
    before = await metrics(client)
    await client.close()  # final checkpoint: the log is folded into snapshots

    again = await exporter_client(pg_config)
    after = await metrics(again)
    assert exported(after) == exported(before)
    assert value(after, "pipeline_runs_total", **P, status="success") == 10
    assert (await post(again, run("orders_daily", "r3")))[1]["status"] == "duplicate"


async def test_crash_without_checkpoint_replays_the_log(exporter_client, pg_config):
    client = await exporter_client(pg_config)
    await send_history(client)
    before = await metrics(client)

    async def no_checkpoint() -> None:  # what kill -9 leaves: records in the log, no final checkpoint
        return None

    client.exporter.recorder._checkpoint = no_checkpoint
    await client.close()
    again = await exporter_client(pg_config)
    assert exported(await metrics(again)) == exported(before)


async def test_failed_write_answers_503_and_keeps_nothing(exporter_client, pg_config, postgres_server):
    client = await exporter_client(pg_config)
    assert (await post(client, run("orders_daily", "r1")))[0] == 200
    before = await metrics(client)
    database = pg_config.state.rsplit("/", 1)[1]
    # A real outage of this database: no new connections, the existing ones cut.
    postgres_server.sql(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
    postgres_server.sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
    try:
        status, body = await post(client, run("orders_daily", "r2"))
        assert status == 503 and body["error"]["reason"] == "storage_unavailable", body
        during = await metrics(client)  # /metrics keeps serving the last state
        assert exported(during) == exported(before)
    finally:
        postgres_server.sql(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
    await client.close()
    again = await exporter_client(pg_config)
    after = await metrics(again)
    assert exported(after) == exported(before)  # r2 was not kept
    assert (await post(again, run("orders_daily", "r2")))[1]["status"] == "accepted"  # and works again


async def test_replicas_see_each_others_writes_before_rendering(exporter_client, pg_config):
    a, b = await exporter_client(pg_config), await exporter_client(pg_config)
    await send_history(a)
    assert exported(await metrics(b)) == exported(await metrics(a))
    assert (await post(b, run("orders_daily", "r4")))[1]["status"] == "duplicate"  # a's run, retried at b
    assert (await post(b, run("orders_daily", "r100")))[1]["status"] == "accepted"
    assert value(await metrics(a), "pipeline_runs_total", **P, status="success") == 11


async def test_a_run_sent_to_two_replicas_at_once_counts_once(exporter_client, pg_config):
    a, b = await exporter_client(pg_config), await exporter_client(pg_config)
    for i in range(20):
        (_, ra), (_, rb) = await asyncio.gather(post(a, run("orders_daily", f"x{i}")),
                                                post(b, run("orders_daily", f"x{i}")))
        assert sorted([ra["status"], rb["status"]]) == ["accepted", "duplicate"], (ra, rb)
    for client in (a, b):
        assert value(await metrics(client), "pipeline_runs_total", **P, status="success") == 20


async def test_follower_catches_up_on_notify_without_a_scrape(exporter_client, pg_config):
    a, b = await exporter_client(pg_config), await exporter_client(pg_config)
    await post(a, run("orders_daily", "n1"))
    target = a.exporter.recorder.applied_seq
    for _ in range(100):  # the follower's poll is 2 s; a NOTIFY wakes it at once
        if b.exporter.recorder.applied_seq >= target:
            break
        await asyncio.sleep(0.01)
    assert b.exporter.recorder.applied_seq >= target


async def test_checkpoints_run_on_one_replica(exporter_client, pg_config):
    clients = [await exporter_client(pg_config), await exporter_client(pg_config)]
    loop = asyncio.get_running_loop()

    async def leads(client) -> bool:
        return await loop.run_in_executor(None, client.exporter.recorder.storage.try_lead)

    leaders = [await leads(c) for c in clients]
    assert sorted(leaders) == [False, True]
    assert await leads(clients[leaders.index(True)])  # asking again keeps it (and does not stack the lock)
    await clients[leaders.index(True)].close()  # the leader goes: the other takes over at its next try
    follower = clients[leaders.index(False)]
    for _ in range(50):  # the server releases the lock once the closed session's backend has ended
        if await leads(follower):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the remaining replica never took the lead")


async def _stall_follower(client) -> None:
    """Stop a replica's follower (its NOTIFY wake-ups): it moves on only when it writes or is scraped."""
    follower = client.exporter.recorder._tasks[2]
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower


async def _truncate_past(client) -> None:
    """Two checkpoints of the leader: the shared log is truncated one checkpoint late."""
    for i in range(2):
        await post(client, run("orders_daily", f"ckpt{i}"))
        await client.exporter.recorder._checkpoint()


@pytest.mark.parametrize("then", ["scrape", "write"])
async def test_a_replica_behind_a_truncated_log_reloads_from_the_checkpoints(exporter_client, pg_config, then,
                                                                             caplog):
    a = await exporter_client(pg_config)
    b = await exporter_client(pg_config)
    await _stall_follower(b)
    behind = b.exporter.recorder.applied_seq
    await send_history(a)
    await _truncate_past(a)
    assert a.exporter.recorder._truncate_next > behind
    if then == "write":
        assert (await post(b, run("orders_daily", "from-b")))[1]["status"] == "accepted"
        await post(a, run("orders_daily", "from-b"))  # a duplicate on both
    assert exported(await metrics(b)) == exported(await metrics(a))
    assert b.exporter.recorder.applied_seq == a.exporter.recorder.applied_seq
    assert "state reloaded from the checkpoints" in caplog.text


def test_the_logged_url_has_no_password_in_its_user_part_or_its_query():
    from pipemon.backends.postgres import PostgresBackend

    backend = PostgresBackend.__new__(PostgresBackend)  # no connection: describe() reads the URL only
    backend.url = "postgresql://pipemon:secret@db:5432/pipemon?password=hunter2&sslmode=require"
    assert backend.describe() == "postgresql://pipemon@db:5432/pipemon"


async def test_a_root_finish_answered_503_keeps_its_childrens_fold_for_the_retry(exporter_client, pg_config,
                                                                                  postgres_server):
    import time

    from openlineage.client.event_v2 import RunState
    from openlineage.client.serde import Serde

    from tests.test_lineage_children import event, rid

    async def lineage(e) -> tuple[int, dict]:
        return await post(client, json.loads(Serde.to_json(e)), "/api/v1/lineage")

    client = await exporter_client(pg_config)
    dag, now = rid(), time.time()
    assert (await lineage(event(RunState.START, dag, now - 30, "orders_daily")))[0] == 200
    child = event(RunState.COMPLETE, rid(), now - 20, "orders_daily.load", ("orders_daily", dag), rows=70)
    assert (await lineage(child))[1]["status"] == "ignored"
    finish = event(RunState.COMPLETE, dag, now - 10, "orders_daily")
    database = pg_config.state.rsplit("/", 1)[1]
    postgres_server.sql(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
    postgres_server.sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
    try:
        assert (await lineage(finish))[0] == 503
    finally:
        postgres_server.sql(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
    for _ in range(50):  # the backend reconnects by itself
        status, body = await lineage(finish)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert body["status"] == "accepted", body
    assert value(await metrics(client), "pipeline_records_processed_total", **P) == 70


async def test_a_delete_on_another_replica_finds_the_pipeline_just_created(exporter_client, pg_config):
    from tests.conftest import make_tokens

    tokens = make_tokens(root="admin")
    a, b = await exporter_client(pg_config, tokens), await exporter_client(pg_config, tokens)
    await _stall_follower(b)  # b hears of a's write only when it catches up itself
    auth = {"Authorization": "Bearer root"}
    assert (await a.post("/api/v1/runs", data=json.dumps(run("adhoc_new", "r1")), headers=auth)).status == 200
    resp = await b.delete("/api/v1/pipelines/adhoc_new", headers=auth)
    assert (resp.status, (await resp.json())["status"]) == (200, "deleted")
    assert "adhoc_new" not in await metrics(a)
