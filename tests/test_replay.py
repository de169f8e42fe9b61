"""`pipemon replay`: files kept while pipemon was down (the real openlineage-python file transport's output, native
NDJSON, the client's spool) sent again, idempotently, with a summary."""

import asyncio
import dataclasses
import json
import time

from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import RunState
from openlineage.client.transport.file import FileConfig, FileTransport

from pipemon.cli import main
from pipemon.service.app import create_app
from tests.helpers import iso, value
from tests.procs import free_port
from tests.test_lineage_children import REGISTRY, event, rid


async def start(aiohttp_client, config, tmp_path):
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY.format(unknown="ignore"))
    return await aiohttp_client(create_app(dataclasses.replace(config, registry=registry)))


def lineage_file(tmp_path, now: float):
    """What the OpenLineage file transport kept of a DAG run: the DAG, a task (a child), an unknown job."""
    path = tmp_path / "openlineage.ndjson"
    client = OpenLineageClient(transport=FileTransport(FileConfig(log_file_path=str(path), append=True)))
    dag, task = rid(), rid()
    for e in (event(RunState.START, dag, now - 60, "orders_daily"),
              event(RunState.COMPLETE, task, now - 50, "orders_daily.load", ("orders_daily", dag), rows=42),
              event(RunState.COMPLETE, dag, now - 40, "orders_daily"),
              event(RunState.COMPLETE, rid(), now - 30, "not_in_the_registry")):
        client.emit(e)
    return path


async def test_replay_sends_lineage_and_native_files_once(aiohttp_client, config, tmp_path, capsys):
    client = await start(aiohttp_client, config, tmp_path)
    now = time.time()
    lineage = lineage_file(tmp_path, now)
    native = tmp_path / "native.ndjson"
    native.write_text("\n".join([
        json.dumps({"pipeline": "billing", "run_id": "b1", "started_at": iso(now - 20)}),
        json.dumps({"pipeline": "billing", "run_id": "b1", "status": "success", "started_at": iso(now - 20),
                    "finished_at": iso(now - 10), "records_processed": 7}),
        json.dumps({"path": "/api/v1/runs", "event": {"pipeline": "billing", "run_id": "b2", "status": "failure",
                                                      "duration_seconds": 3}}),  # a client spool line
        "not json at all",
        json.dumps({"pipeline": "billing", "run_id": "b3", "status": "success", "duration_seconds": 1,
                    "finished_at": iso(now + 86400)}),  # in the future: rejected, with its reason
    ]) + "\n")
    url = str(client.make_url("/"))
    args = ["replay", "--url", url, "--quiet", str(lineage), str(native)]
    assert await asyncio.to_thread(main, args) == 1  # some lines were rejected
    first = capsys.readouterr().out
    assert first.splitlines()[0] == "5 accepted, 0 duplicate, 2 ignored, 2 rejected", first
    assert "ignored: child_run: 1" in first and "ignored: unknown_pipeline: 1" in first
    assert "rejected: malformed: 1" in first and "rejected: future_timestamp: 1" in first
    detail = await (await client.get("/api/v1/pipelines/orders_daily")).json()
    assert (detail["runs_success"], detail["last_run"]["records"]) == (1, 42)
    billing = await (await client.get("/api/v1/pipelines/billing")).json()
    assert (billing["runs_success"], billing["runs_failure"]) == (1, 1)
    # Again: nothing counts twice.
    before = await (await client.get("/metrics")).text()
    assert await asyncio.to_thread(main, args) == 1
    assert capsys.readouterr().out.splitlines()[0] == "0 accepted, 5 duplicate, 2 ignored, 2 rejected"
    after = await (await client.get("/metrics")).text()
    for name, labels in (("pipeline_runs_total", {"pipeline": "orders_daily", "team": "data-eng",
                                                  "status": "success"}),
                         ("pipeline_records_processed_total", {"pipeline": "billing", "team": "finance"})):
        assert value(after, name, **labels) == value(before, name, **labels)


async def test_replay_shows_progress_and_exits_2_when_pipemon_is_unreachable(tmp_path, capsys):
    lineage = lineage_file(tmp_path, time.time())
    code = await asyncio.to_thread(main, ["replay", "--url", f"http://127.0.0.1:{free_port()}", "--retries", "0",
                                          str(lineage)])
    assert code == 2
    assert "unreachable" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["replay", str(tmp_path / "missing.ndjson")]) == 2


async def test_replay_progress_goes_to_stderr(aiohttp_client, config, tmp_path, capsys):
    client = await start(aiohttp_client, config, tmp_path)
    lineage = lineage_file(tmp_path, time.time())
    assert await asyncio.to_thread(main, ["replay", "--url", str(client.make_url("/")), str(lineage)]) == 0
    captured = capsys.readouterr()
    assert "4/4 events" in captured.err
    assert captured.out.splitlines()[0] == "2 accepted, 0 duplicate, 2 ignored, 0 rejected"
