"""The webhook sink that catches Alertmanager notifications in tests and the local stack."""

from __future__ import annotations

from typing import Any

from pipemon.stack.sink import make_app, one_line, summarize

PAYLOAD: dict[str, Any] = {
    "version": "4",
    "groupKey": '{}/{team="data-eng"}:{alertname="PipelineFailing", pipeline="orders_daily", team="data-eng"}',
    "status": "firing",
    "receiver": "data-eng-pager",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "PipelineFailing", "pipeline": "orders_daily", "team": "data-eng",
                       "severity": "critical"},
            "annotations": {"summary": "orders_daily failed 3 times in a row"},
            "fingerprint": "abc",
        }
    ],
}


async def test_records_and_lists_notifications(aiohttp_client: Any, capsys: Any) -> None:
    client = await aiohttp_client(make_app())
    assert (await client.post("/", json=PAYLOAD)).status == 200
    assert (await client.post("/slack/data-eng", json={"text": "hello"})).status == 200
    notifications = await (await client.get("/notifications")).json()
    assert [n["receiver"] for n in notifications] == ["data-eng-pager", None]
    assert notifications[0]["alerts"][0]["labels"]["pipeline"] == "orders_daily"
    assert notifications[1]["path"] == "/slack/data-eng"
    assert notifications[1]["body"] == {"text": "hello"}
    assert "data-eng-pager firing: PipelineFailing{pipeline=orders_daily" in capsys.readouterr().out


async def test_clear_and_reject_non_json(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app())
    await client.post("/", json=PAYLOAD)
    assert (await client.delete("/notifications")).status == 200
    assert await (await client.get("/notifications")).json() == []
    assert (await client.post("/", data=b"not json")).status == 400


def test_one_line_marks_resolved_alerts() -> None:
    resolved = {**PAYLOAD, "status": "resolved",
                "alerts": [{**PAYLOAD["alerts"][0], "status": "resolved"}]}
    line = one_line(summarize(resolved, "/"))
    assert "data-eng-pager resolved: PipelineFailing{" in line
    assert line.endswith("(resolved)")
