"""State survives restarts: same /metrics after a clean stop, a corrupt file starts a healthy service."""

import dataclasses
import json

from pipemon.service.recorder import state_path
from tests.conftest import make_tokens
from tests.helpers import run, samples, value

P = {"pipeline": "orders_daily", "team": "data-eng"}


def exported(text: str) -> list:
    """The per-pipeline samples in a stable order, values as repr so that NaN equals NaN."""
    return sorted((name, sorted(labels), repr(v)) for (name, labels), v in samples(text).items()
                  if name.startswith("pipeline_"))


async def send_history(client) -> None:
    for i in range(12):
        status = "failure" if i % 5 == 4 else "success"
        resp = await client.post("/api/v1/runs", data=json.dumps(
            run("orders_daily", f"r{i}", status, duration_seconds=10.0 + i, records_processed=100 * i)))
        assert resp.status == 200
    await client.post("/api/v1/runs/start", data=json.dumps({"pipeline": "cdc_x", "run_id": "s1"}))


async def test_restart_gives_identical_metrics(exporter_client, aiohttp_client, config):
    client = await exporter_client()
    await send_history(client)
    before = await (await client.get("/metrics")).text()
    await client.close()  # clean shutdown: final checkpoint

    again = await exporter_client()
    after = await (await again.get("/metrics")).text()
    assert exported(after) == exported(before)
    assert value(after, "pipeline_runs_total", **P, status="success") == 10
    # Retries of runs sent before the restart are still recognised.
    resp = await again.post("/api/v1/runs", data=json.dumps(run("orders_daily", "r3")))
    assert (await resp.json())["status"] == "duplicate"


async def test_log_without_checkpoint_is_replayed(exporter_client, config):
    """What a crash leaves behind: records in the log and no final checkpoint."""
    client = await exporter_client()
    await send_history(client)
    before = await (await client.get("/metrics")).text()
    recorder = client.exporter.recorder
    recorder._checkpoint = _no_checkpoint  # simulate the crash: the final checkpoint never happens
    await client.close()

    again = await exporter_client()
    after = await (await again.get("/metrics")).text()
    assert exported(after) == exported(before)


async def _no_checkpoint() -> None:
    return None


async def test_corrupt_state_file_starts_healthy_and_says_so(exporter_client, config, caplog):
    path = state_path(config.state_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database" * 100)
    client = await exporter_client()
    assert (await client.get("/-/healthy")).status == 200
    assert (await client.post("/api/v1/runs", data=json.dumps(run("orders_daily", "a")))).status == 200
    assert any("unreadable" in r.message and "moved aside" in r.message for r in caplog.records)
    assert list(path.parent.glob("pipemon.sqlite3.corrupt-*"))


async def test_state_dir_is_created(exporter_client, config, tmp_path):
    cfg = dataclasses.replace(config, state_dir=tmp_path / "deep" / "er")
    client = await exporter_client(cfg)
    assert (await client.post("/api/v1/runs", data=json.dumps(run("orders_daily", "a")))).status == 200
    assert state_path(cfg.state_dir).exists()


async def test_after_a_restart_the_team_follows_the_registry(exporter_client, config, tmp_path):
    registry = tmp_path / "reg.yaml"
    registry.write_text("teams:\n  a: {}\n  b: {}\npipelines:\n  - {match: job, team: a}\n")
    cfg = dataclasses.replace(config, registry=registry)
    client = await exporter_client(cfg)
    await client.post("/api/v1/runs", data=json.dumps(run("job", "1")))
    await client.close()
    registry.write_text("teams:\n  a: {}\n  b: {}\npipelines:\n  - {match: job, team: b}\n")
    again = await exporter_client(cfg)
    text = await (await again.get("/metrics")).text()
    assert value(text, "pipeline_runs_total", pipeline="job", team="b", status="success") == 1
    assert ("pipeline_runs_total", frozenset({("pipeline", "job"), ("team", "a"), ("status", "success")})) \
        not in samples(text)


async def test_a_pipeline_deleted_and_reported_again_keeps_its_new_runs_over_a_restart(exporter_client, config):
    tokens = make_tokens(root="admin")
    auth = {"Authorization": "Bearer root"}
    client = await exporter_client(tokens=tokens)
    await client.post("/api/v1/runs", data=json.dumps(run("temp_job", "old")), headers=auth)
    await client.exporter.recorder._checkpoint()
    assert (await client.delete("/api/v1/pipelines/temp_job", headers=auth)).status == 200
    for run_id in ("new1", "new2"):  # acknowledged after the delete, before the next checkpoint
        resp = await client.post("/api/v1/runs", data=json.dumps(run("temp_job", run_id)), headers=auth)
        assert (await resp.json())["status"] == "accepted"
    await client.close()

    again = await exporter_client(tokens=tokens)
    text = await (await again.get("/metrics")).text()
    assert value(text, "pipeline_runs_total", pipeline="temp_job", team="unowned", status="success") == 2


async def test_a_crash_between_snapshots_and_log_truncation_counts_nothing_twice(exporter_client, config):
    """The snapshots say which log sequence they hold; replay skips it, even beyond the dedup window."""
    cfg = dataclasses.replace(config, dedup_window=2)
    client = await exporter_client(cfg)
    for i in range(10):
        await client.post("/api/v1/runs", data=json.dumps(run("orders_daily", f"r{i}", records_processed=1)))
    recorder = client.exporter.recorder
    recorder.storage.truncate_log = lambda upto: None  # the crash: snapshots written, log not truncated
    await recorder._checkpoint()
    recorder._checkpoint = _no_checkpoint
    await client.close()

    again = await exporter_client(cfg)
    text = await (await again.get("/metrics")).text()
    assert value(text, "pipeline_runs_total", **P, status="success") == 10
    assert value(text, "pipeline_records_processed_total", **P) == 10
