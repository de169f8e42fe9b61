"""The exporter's HTTP API, in-process with pytest-aiohttp."""

import dataclasses
import json
import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_tokens
from tests.helpers import iso, run, same, samples, value

P = {"pipeline": "orders_daily", "team": "data-eng"}


async def metrics(client, accept: str = "text/plain") -> str:
    resp = await client.get("/metrics", headers={"Accept": accept})
    assert resp.status == 200
    return await resp.text()


async def post(client, body, path="/api/v1/runs", **kwargs):
    if not isinstance(body, (str, bytes)):
        body = json.dumps(body)
    resp = await client.post(path, data=body, **kwargs)
    return resp.status, await resp.json()


async def test_registered_pipelines_are_exported_before_their_first_run(exporter_client):
    client = await exporter_client()
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="success") == 0
    assert value(text, "pipeline_runs_total", **P, status="failure") == 0
    assert value(text, "pipeline_last_success_timestamp_seconds", **P) == 0
    assert value(text, "pipeline_info", **P, tier="gold") == 1
    assert value(text, "pipeline_expected_interval_seconds", **P) == 86400
    assert value(text, "pipeline_alert_threshold", pipeline="events_ingest_5m", team="data-eng",
                 threshold="min_runs") == 10
    assert value(text, "pipemon_pipelines") == 9


async def test_a_finished_run_updates_every_family(exporter_client):
    client = await exporter_client()
    now = time.time()
    status, body = await post(client, run("orders_daily", "r1", started_at=iso(now - 30), finished_at=iso(now - 10),
                                          records_processed=400, duration_seconds=None))
    assert (status, body["status"]) == (200, "accepted")
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_run_duration_seconds_count", **P) == 1
    assert value(text, "pipeline_run_duration_seconds_sum", **P) == pytest.approx(20, abs=0.01)
    assert value(text, "pipeline_run_duration_seconds_bucket", **P, le="+Inf") == 1
    assert value(text, "pipeline_records_processed_total", **P) == 400
    assert value(text, "pipeline_last_run_records", **P) == 400
    assert value(text, "pipeline_last_success_timestamp_seconds", **P) == pytest.approx(now - 10, abs=0.01)
    assert value(text, "pipemon_events_received_total", endpoint="runs") == 1


async def test_duration_buckets_are_series_only_when_asked_for(exporter_client, config):
    """By default the histogram is +Inf, _sum and _count (no rule reads a bucket); --duration-buckets adds
    bounds, and the throughput gauge is left to the API (records / duration in PromQL)."""
    now = time.time()
    custom = dataclasses.replace(config, duration_buckets="15,60", state_dir=config.state_dir.with_name("custom"))
    for cfg, bounds in ((config, []), (custom, ["15.0", "60.0"])):
        client = await exporter_client(cfg)
        await post(client, run("orders_daily", "r1", started_at=iso(now - 30), finished_at=iso(now - 10),
                               records_processed=400, duration_seconds=None))
        text = await metrics(client)
        bucket = r'pipeline_run_duration_seconds_bucket\{pipeline="orders_daily",[^}]*le="([^"]+)"\} (\d+)'
        les = re.findall(bucket, text)
        assert les == [(le, "1" if le != "15.0" else "0") for le in bounds] + [("+Inf", "1")], les
        assert "pipeline_last_run_throughput_records_per_second" not in text
        await client.close()


async def test_retried_event_is_acknowledged_and_counted_once(exporter_client):
    client = await exporter_client()
    for expected in ("accepted", "duplicate", "duplicate"):
        status, body = await post(client, run("orders_daily", "r1", records_processed=5))
        assert (status, body["status"]) == (200, expected)
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_records_processed_total", **P) == 5


async def test_out_of_order_event_counts_but_keeps_the_newer_last_run(exporter_client):
    client = await exporter_client()
    now = time.time()
    await post(client, run("orders_daily", "new", finished_at=iso(now - 10)))
    await post(client, run("orders_daily", "old", "failure", finished_at=iso(now - 3600)))
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="failure") == 1
    assert value(text, "pipeline_last_run_success", **P) == 1
    assert value(text, "pipeline_last_run_timestamp_seconds", **P) == pytest.approx(now - 10, abs=0.01)
    assert value(text, "pipeline_consecutive_failures", **P) == 0


async def test_start_marks_a_run_in_progress_until_it_finishes(exporter_client):
    client = await exporter_client()
    started = time.time() - 60
    status, body = await post(client, {"pipeline": "orders_daily", "run_id": "r9", "started_at": iso(started)},
                              "/api/v1/runs/start")
    assert (status, body["status"]) == (200, "accepted")
    text = await metrics(client)
    assert value(text, "pipeline_runs_in_progress", **P) == 1
    assert value(text, "pipeline_oldest_run_start_timestamp_seconds", **P) == pytest.approx(started, abs=0.01)
    await post(client, run("orders_daily", "r9"))
    text = await metrics(client)
    assert value(text, "pipeline_runs_in_progress", **P) == 0
    assert value(text, "pipeline_oldest_run_start_timestamp_seconds", **P) == 0


async def test_batches_as_array_and_ndjson_keep_good_items_when_one_is_bad(exporter_client):
    client = await exporter_client()
    batch = [run("orders_daily", "a"), {"pipeline": "orders_daily", "run_id": "b", "status": "maybe"},
             run("orders_daily", "a"), run("cdc_orders", "c", "failure")]
    status, body = await post(client, batch)
    assert status == 200
    assert [r["status"] for r in body["results"]] == ["accepted", "rejected", "duplicate", "accepted"]
    assert (body["accepted"], body["duplicate"], body["rejected"]) == (2, 1, 1)
    assert body["results"][1]["error"]["field"] == "status"
    ndjson = "\n".join(json.dumps(run("orders_daily", f"n{i}")) for i in range(3)) + "\n{broken\n"
    status, body = await post(client, ndjson, headers={"Content-Type": "application/x-ndjson"})
    assert [r["status"] for r in body["results"]] == ["accepted"] * 3 + ["rejected"]
    assert body["results"][3]["error"]["reason"] == "malformed"
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="success") == 4
    assert value(text, "pipeline_runs_total", pipeline="cdc_orders", team="data-eng", status="failure") == 1


BAD_INPUTS = [
    ("{not json", 400, "malformed", None),
    ("42", 400, "malformed", None),
    ('{"pipeline": 5, "run_id": "x", "status": "success", "duration_seconds": 1}', 422, "invalid_field", "pipeline"),
    ('{"pipeline": "p", "status": "success", "duration_seconds": 1}', 422, "invalid_field", "run_id"),
    ('{"pipeline": "p", "run_id": "x", "status": "success", "duration_seconds": -1}', 422, "invalid_field",
     "duration_seconds"),
    ('{"pipeline": "p", "run_id": "x", "status": "success", "duration_seconds": NaN}', 400, "malformed", None),
    ('{"pipeline": "p", "run_id": "x", "status": "success", "duration_seconds": 1e999}', 422, "invalid_field",
     "duration_seconds"),
    ('{"pipeline": "p", "run_id": "x", "status": "success"}', 422, "invalid_field", "duration_seconds"),
    ('{"pipeline": "p", "run_id": "x", "status": "success", "duration_seconds": 1, "records_processed": -3}', 422,
     "invalid_field", "records_processed"),
    ('{"pipeline": "p", "run_id": "x", "status": "success", "duration_seconds": 1, "extra": 1}', 422,
     "invalid_field", "extra"),
    ('{"pipeline": "p", "run_id": "x", "status": "success", "started_at": "yesterday"}', 422, "invalid_field",
     "started_at"),
    ('{"pipeline": "p", "run_id": "x", "status": "success", "started_at": "2024-01-01T00:00:00"}', 422,
     "invalid_field", "started_at"),
    ('{"pipeline": "p", "run_id": "x", "status": "success", "started_at": "2024-01-02T00:00:00Z",'
     ' "finished_at": "2024-01-01T00:00:00Z"}', 422, "invalid_field", "started_at"),
    ('{"pipeline": "p", "run_id": "x", "status": "success", "duration_seconds": 1,'
     ' "finished_at": "2999-01-01T00:00:00Z"}', 422, "future_timestamp", "finished_at"),
    ('{"pipeline": "a\\nb", "run_id": "x", "status": "success", "duration_seconds": 1}', 422, "invalid_field",
     "pipeline"),
    (json.dumps(run("p" * 201, "x")), 422, "invalid_field", "pipeline"),
    (json.dumps(run("trailing_newline\n", "x")), 422, "invalid_field", "pipeline"),
    (json.dumps(run("p", "x", team="data-eng\n")), 422, "invalid_field", "team"),
    (json.dumps(run("orders_daily", "x", team="analytics")), 422, "team_mismatch", "team"),
    (json.dumps(run("new_pipeline", "x", team="no-such-team")), 422, "unknown_team", "team"),
]


@pytest.mark.parametrize(("body", "code", "reason", "field"), BAD_INPUTS)
async def test_bad_input_is_a_4xx_naming_the_field_and_changes_nothing(exporter_client, body, code, reason, field):
    client = await exporter_client()
    await post(client, run("orders_daily", "kept", records_processed=7))
    before = samples(await metrics(client))
    status, answer = await post(client, body)
    assert status == code
    assert answer["error"]["reason"] == reason
    assert answer["error"].get("field") == field
    after = samples(await metrics(client))
    rejected = ("pipemon_events_rejected_total", frozenset({("reason", reason)}))
    assert after[rejected] == before[rejected] + 1
    pipeline_series = {k for k in after if k[0].startswith("pipeline_")}
    assert pipeline_series == {k for k in before if k[0].startswith("pipeline_")}
    assert [k for k in pipeline_series if not same(after[k], before[k])] == []


async def test_oversized_body_is_413(exporter_client, config):
    client = await exporter_client(dataclasses.replace(config, max_body_bytes=1000))
    status, body = await post(client, [run("orders_daily", f"r{i}") for i in range(50)])
    assert (status, body["error"]["reason"]) == (413, "too_large")
    assert value(await metrics(client), "pipemon_events_rejected_total", reason="too_large") == 1


async def test_unknown_pipelines_rejected_when_the_registry_says_so(exporter_client, config, tmp_path):
    registry = tmp_path / "reg.yaml"
    registry.write_text("unknown_pipelines: reject\nteams:\n  t: {}\npipelines:\n  - {match: known, team: t}\n")
    client = await exporter_client(dataclasses.replace(config, registry=registry))
    status, body = await post(client, run("stranger", "x"))
    assert (status, body["error"]["reason"]) == (422, "unknown_pipeline")
    status, _ = await post(client, run("known", "x"))
    assert status == 200


async def test_cap_on_tracked_pipelines(exporter_client, config):
    client = await exporter_client(dataclasses.replace(config, max_pipelines=12))  # 9 registered
    status, body = await post(client, [run(f"random_{i}", "x") for i in range(5)])
    assert [r["status"] for r in body["results"]] == ["accepted"] * 3 + ["rejected"] * 2
    assert body["results"][3]["code"] == 429 and body["results"][3]["error"]["reason"] == "pipeline_cap"
    assert value(await metrics(client), "pipemon_pipelines") == 12
    status, _ = await post(client, run("random_0", "y"))  # known pipelines still report
    assert status == 200


async def test_unregistered_pipeline_is_unowned_or_takes_the_team_it_names(exporter_client):
    client = await exporter_client()
    await post(client, run("adhoc_script", "x"))
    await post(client, run("adhoc_ml", "x", team="ml-platform"))
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", pipeline="adhoc_script", team="unowned", status="success") == 1
    assert value(text, "pipeline_runs_total", pipeline="adhoc_ml", team="ml-platform", status="success") == 1


async def test_team_tokens_write_only_their_own_pipelines(exporter_client):
    tokens = make_tokens(**{"de-secret": "data-eng", "an-secret": "analytics", "root-secret": "admin"})
    client = await exporter_client(tokens=tokens)

    def auth(token):
        return {"Authorization": f"Bearer {token}"}

    assert (await post(client, run("orders_daily", "a")))[0] == 401
    assert (await post(client, run("orders_daily", "a"), headers=auth("de-secret-x")))[0] == 401
    status, body = await post(client, run("orders_daily", "a"), headers=auth("an-secret"))
    assert (status, body["error"]["reason"]) == (403, "forbidden")
    assert (await post(client, run("orders_daily", "a"), headers=auth("de-secret")))[0] == 200
    assert (await post(client, run("dbt_marts_nightly", "a"), headers=auth("root-secret")))[0] == 200
    # An unregistered pipeline reported with a team token belongs to that team.
    assert (await post(client, run("de_adhoc", "a"), headers=auth("de-secret")))[0] == 200
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", **P, status="success") == 1
    assert value(text, "pipeline_runs_total", pipeline="de_adhoc", team="data-eng", status="success") == 1
    assert value(text, "pipemon_events_rejected_total", reason="unauthorized") == 2
    assert value(text, "pipemon_events_rejected_total", reason="forbidden") == 1


async def test_label_values_are_escaped_in_both_formats(exporter_client):
    client = await exporter_client()
    name = 'we"ird\\name é'
    assert (await post(client, run(name, "x")))[0] == 200
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", pipeline=name, team="unowned", status="success") == 1
    om = await metrics(client, "application/openmetrics-text; version=1.0.0")
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families

    found = [s for f in om_families(om) for s in f.samples
             if s.name == "pipeline_runs_total" and s.labels.get("pipeline") == name]
    assert {s.labels["status"]: s.value for s in found} == {"success": 1, "failure": 0}
    assert om.endswith("# EOF\n") and om.count("# EOF") == 1


async def test_openmetrics_is_negotiated_and_gzip_when_asked(exporter_client):
    client = await exporter_client()
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0",
                                                 "Accept-Encoding": "gzip"})
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert resp.headers["Content-Encoding"] == "gzip"
    assert "# TYPE pipeline_runs counter" in await resp.text()
    text = await metrics(client)
    assert "# TYPE pipeline_runs_total counter" in text
    assert {f.name for f in text_string_to_metric_families(text)} >= {"pipeline_runs", "pipeline_run_duration_seconds"}


async def test_reload_keeps_state_and_follows_the_new_registry(exporter_client, config, tmp_path):
    registry = tmp_path / "reg.yaml"
    registry.write_text("teams:\n  a: {}\n  b: {}\npipelines:\n  - {match: job, team: a, max_runtime: 1h}\n")
    client = await exporter_client(dataclasses.replace(config, registry=registry))
    await post(client, run("job", "1"))
    registry.write_text("teams:\n  a: {}\n  b: {}\npipelines:\n  - {match: job, team: b, max_runtime: 2h}\n"
                        "  - {match: other, team: a}\n")
    resp = await client.post("/-/reload")
    assert resp.status == 200
    text = await metrics(client)
    assert value(text, "pipeline_runs_total", pipeline="job", team="b", status="success") == 1
    assert value(text, "pipeline_max_runtime_seconds", pipeline="job", team="b") == 7200
    assert value(text, "pipeline_runs_total", pipeline="other", team="a", status="success") == 0
    registry.write_text("teams: [broken\n")
    resp = await client.post("/-/reload")
    assert resp.status == 400 and "reg.yaml:" in (await resp.json())["error"]["message"]
    assert value(await metrics(client), "pipeline_runs_total", pipeline="job", team="b", status="success") == 1


async def test_reload_is_closed_unless_enabled(exporter_client, config):
    client = await exporter_client(dataclasses.replace(config, enable_lifecycle=False))
    assert (await client.post("/-/reload")).status == 403


async def test_pipelines_api_and_landing_page(exporter_client):
    client = await exporter_client()
    await post(client, run("orders_daily", "a"))
    listing = await (await client.get("/api/v1/pipelines?team=data-eng")).json()
    names = [p["pipeline"] for p in listing["pipelines"]]
    assert "orders_daily" in names and "dbt_marts_nightly" not in names
    detail = await (await client.get("/api/v1/pipelines/orders_daily")).json()
    assert detail["runs_success"] == 1 and detail["max_runtime_seconds"] == 3600
    assert (await client.get("/api/v1/pipelines/nope")).status == 404
    landing = await (await client.get("/")).text()
    assert all(link in landing for link in ("/metrics", "/api/v1/pipelines", "/api/v1/openapi.json"))
    spec = await (await client.get("/api/v1/openapi.json")).json()
    assert spec["components"]["schemas"]["RunFinished"]["required"] == ["pipeline", "run_id", "status"]


async def test_admin_can_forget_a_pipeline(exporter_client):
    client = await exporter_client(tokens=make_tokens(root="admin", de="data-eng"))
    await post(client, run("temp_job", "a"), headers={"Authorization": "Bearer de"})
    assert (await client.delete("/api/v1/pipelines/temp_job", headers={"Authorization": "Bearer de"})).status == 403
    assert (await client.delete("/api/v1/pipelines/temp_job", headers={"Authorization": "Bearer root"})).status == 200
    assert ("pipeline_runs_total", frozenset({("pipeline", "temp_job"), ("team", "data-eng"), ("status", "success")})
            ) not in samples(await metrics(client))


async def test_a_registry_that_is_not_utf8_is_a_clear_400_on_reload(exporter_client, config, tmp_path):
    registry = tmp_path / "reg.yaml"
    registry.write_text("teams:\n  a: {}\n")
    client = await exporter_client(dataclasses.replace(config, registry=registry))
    registry.write_bytes(b"teams:\n  \xff\xfe: {}\n")
    resp = await client.post("/-/reload")
    assert resp.status == 400
    assert "not UTF-8" in (await resp.json())["error"]["message"]


async def test_runs_in_progress_are_capped_within_one_batch_too(exporter_client):
    from pipemon.service.ingest import MAX_IN_PROGRESS_PER_PIPELINE as cap

    client = await exporter_client()
    starts = [{"pipeline": "fresh_job", "run_id": f"s{i}"} for i in range(cap + 5)]
    status, body = await post(client, starts, "/api/v1/runs/start")
    assert status == 200
    assert (body["accepted"], body["rejected"]) == (cap, 5)
    assert body["results"][-1]["error"]["reason"] == "in_progress_cap"
    assert value(await metrics(client), "pipeline_runs_in_progress", pipeline="fresh_job", team="unowned") == cap
