"""The web UI's pages and read protection, in-process with pytest-aiohttp (the browser suite is test_web_ui)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipemon.service.auth import TokenEntry, Tokens, TokensError, hash_token, load_tokens
from pipemon.service.config import add_serve_arguments, config_from_args
from tests.helpers import iso, run
from tests.procs import free_port


def tokens_with_reader() -> Tokens:
    return Tokens([TokenEntry("reader", hash_token("reader-secret").hex(), reader=True),
                   TokenEntry("de", hash_token("de-secret").hex(), team="data-eng"),
                   TokenEntry("admin", hash_token("admin-secret").hex(), admin=True)])


async def post_run(client, name: str, run_id: str, token: str | None = None, **extra) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await client.post("/api/v1/runs", data=json.dumps(run(name, run_id, finished_at=iso(time.time() - 5),
                                                                 **extra)), headers=headers)
    return resp.status


async def test_reads_are_open_by_default_and_the_overview_lists_pipelines(exporter_client):
    client = await exporter_client()
    assert await post_run(client, "orders_daily", "r1") == 200
    resp = await client.get("/")
    text = await resp.text()
    assert resp.status == 200 and 'data-pipeline="orders_daily"' in text
    assert resp.headers["Cache-Control"] == "no-store" and "script-src 'self'" in resp.headers[
        "Content-Security-Policy"]
    for link in ("/metrics", "/api/v1/pipelines", "/api/v1/openapi.json"):
        assert f'href="{link}"' in text
    for asset in ("ui.css", "ui.js"):
        assert (await client.get(f"/static/{asset}")).status == 200
    assert (await client.get("/static/../app.py")).status == 404


@pytest.mark.parametrize("query", ["state=bogus", "page=0", "page=x", "page=²", "per=100000", "q=" + "x" * 201])
async def test_a_bad_filter_is_a_clear_400(exporter_client, query):
    client = await exporter_client()
    resp = await client.get(f"/?{query}")
    assert resp.status == 400 and "Bad filter" in await resp.text()


async def test_names_are_escaped_everywhere(exporter_client):
    client = await exporter_client()
    name = '<script>alert("x")</script>/and "quotes"'
    assert await post_run(client, name, "r1") == 200
    text = await (await client.get("/")).text()
    assert "<script>alert" not in text and "&lt;script&gt;" in text
    resp = await client.get("/pipelines/%3Cscript%3Ealert(%22x%22)%3C%2Fscript%3E%2Fand%20%22quotes%22")
    page = await resp.text()
    assert resp.status == 200 and "<script>alert" not in page and "&lt;script&gt;" in page


async def test_alertmanager_down_the_pages_still_render_and_say_so(exporter_client, config):
    dead = f"http://127.0.0.1:{free_port()}"
    client = await exporter_client(dataclasses.replace(config, alertmanager_urls=(dead,)))
    await post_run(client, "orders_daily", "r1")
    started = time.monotonic()
    resp = await client.get("/")
    assert resp.status == 200 and "No Alertmanager answered" in await resp.text()
    resp = await client.get("/pipelines/orders_daily")
    text = await resp.text()
    assert resp.status == 200 and "No Alertmanager answered" in text and "silences/new" in text
    assert time.monotonic() - started < 5


async def test_protect_reads_reader_token_reads_all_writes_nothing(exporter_client, config):
    cfg = dataclasses.replace(config, protect_reads=True)
    client = await exporter_client(cfg, tokens_with_reader())
    assert await post_run(client, "orders_daily", "r1", "admin-secret") == 200
    assert await post_run(client, "orders_daily", "r2", "reader-secret") == 403
    resp = await client.get("/metrics", headers={"Authorization": "Bearer reader-secret"})
    assert resp.status == 200 and "pipemon_events_received_total" in await resp.text()
    resp = await client.get("/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/login"
    assert (await client.get("/-/healthy")).status == 200  # probes stay open
    assert (await client.get("/login")).status == 200


async def test_sign_in_sets_a_strict_httponly_session_and_a_bad_token_gets_none(exporter_client, config):
    client = await exporter_client(dataclasses.replace(config, protect_reads=True), tokens_with_reader())
    resp = await client.post("/login", data={"token": "wrong"}, allow_redirects=False)
    assert resp.status == 401 and "not valid" in await resp.text() and "Set-Cookie" not in resp.headers
    resp = await client.post("/login", data={"token": "de-secret"}, allow_redirects=False)
    cookie = resp.headers["Set-Cookie"]
    assert resp.status == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie and "de-secret" not in cookie
    resp = await client.get("/")
    assert resp.status == 200 and "de (team data-eng)" in await resp.text()
    await client.post("/logout", allow_redirects=False)
    resp = await client.get("/", allow_redirects=False)
    assert resp.status == 303


async def test_team_scoped_metrics_parse_and_hold_only_that_team(exporter_client, config):
    client = await exporter_client(dataclasses.replace(config, protect_reads=True), tokens_with_reader())
    for accept in ("text/plain", "application/openmetrics-text"):
        resp = await client.get("/metrics", headers={"Authorization": "Bearer de-secret", "Accept": accept})
        text = await resp.text()
        teams = {s.labels.get("team") for f in text_string_to_metric_families(text) for s in f.samples}
        assert resp.status == 200 and teams == {"data-eng"}, teams


def test_protect_reads_needs_tokens_and_tokens_need_exactly_one_kind(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(ValueError, match="--protect-reads"):
        config_from_args(parser.parse_args(["--protect-reads"]))
    with pytest.raises(ValueError, match="--alertmanager-url"):
        config_from_args(parser.parse_args(["--alertmanager-url", "localhost:9093"]))
    path = tmp_path / "tokens.yaml"
    path.write_text(json.dumps({"tokens": [{"name": "x", "sha256": "0" * 64, "team": "a", "reader": True}]}))
    with pytest.raises(TokensError, match="exactly one of"):
        load_tokens(path)


def test_basic_auth_on_metrics_and_protect_reads_are_refused_together(tmp_path, config):
    import bcrypt

    from pipemon.service.serve import serve
    from pipemon.web.config import WebConfigError

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    (tmp_path / "tokens.yaml").write_text(json.dumps({"tokens": [{"name": "a", "sha256": "0" * 64, "admin": True}]}))
    cfg = dataclasses.replace(config, web_config=tmp_path / "web.yml", tokens=tmp_path / "tokens.yaml",
                              protect_reads=True)
    with pytest.raises(WebConfigError, match="exclude each other"):
        serve(cfg)


async def test_pipelines_are_judged_in_the_background_before_anyone_looks(exporter_client):
    from pipemon.web import UI_KEY

    client = await exporter_client()
    await post_run(client, "orders_daily", "r1")
    state = client.exporter.recorder.pipelines.get("orders_daily")
    judge = client.server.app[UI_KEY].judge
    assert not judge.is_prepared(state)
    deadline = time.monotonic() + 10  # one round every 5 s
    while not judge.is_prepared(state):
        assert time.monotonic() < deadline, "not judged in the background"
        await asyncio.sleep(0.1)


def test_an_unreadable_alertmanager_answer_is_skipped_not_a_crash():
    from pipemon.web.alerts import _parse

    assert _parse("not an alert", "am") is None
    assert _parse({"labels": ["pipeline"]}, "am") is None
    alert = _parse({"labels": {"pipeline": "p", "alertname": "A"}, "status": "odd"}, "am")
    assert alert is not None and alert.state == "firing" and alert.pipeline == "p"
