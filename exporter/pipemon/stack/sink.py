"""A webhook sink for Alertmanager notifications: records each one and prints a one-line summary.

    python -m pipemon.stack.sink --listen 127.0.0.1:9099

POST any path: a notification (Alertmanager webhook JSON; Slack and PagerDuty payloads are kept as they come).
GET /notifications: everything received, oldest first, as JSON. DELETE /notifications: forget it all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from aiohttp import web

MAX_NOTIFICATIONS = 10_000
NOTIFICATIONS = web.AppKey("notifications", list[dict[str, Any]])


def summarize(payload: Any, path: str) -> dict[str, Any]:
    """The record kept for one delivery: who it was for, its status, its alerts, and the raw body."""
    body = payload if isinstance(payload, dict) else {}
    alerts = body.get("alerts") if isinstance(body.get("alerts"), list) else []
    return {
        "received_at": time.time(),
        "path": path,
        "receiver": body.get("receiver"),
        "status": body.get("status"),
        "group_key": body.get("groupKey"),
        "alerts": [
            _alert_record(a) for a in alerts if isinstance(a, dict)
        ],
        "body": payload,
    }


def _alert_record(alert: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": alert.get("status"),
        "labels": alert.get("labels", {}),
        "annotations": alert.get("annotations", {}),
    }


def one_line(record: dict[str, Any]) -> str:
    """A terminal line: `12:00:01 data-eng-pager firing: PipelineFailing{pipeline=orders_daily,...}`."""
    stamp = time.strftime("%H:%M:%S", time.localtime(record["received_at"]))
    if record["receiver"] is None:
        return f"{stamp} {record['path']} (not an Alertmanager webhook: {json.dumps(record['body'])[:200]})"
    alerts = ", ".join(_alert_text(a) for a in record["alerts"])
    return f"{stamp} {record['receiver']} {record['status']}: {alerts}"


def _alert_text(alert: dict[str, Any]) -> str:
    labels = dict(alert["labels"])
    name = labels.pop("alertname", "?")
    inner = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    mark = "" if alert["status"] == "firing" else f" ({alert['status']})"
    return f"{name}{{{inner}}}{mark}"


async def receive(request: web.Request) -> web.Response:
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return web.json_response({"error": "expected a JSON body"}, status=400)
    record = summarize(payload, request.path)
    notifications = request.app[NOTIFICATIONS]
    notifications.append(record)
    del notifications[:-MAX_NOTIFICATIONS]
    print(one_line(record), flush=True)
    return web.json_response({"ok": True})


async def list_notifications(request: web.Request) -> web.Response:
    return web.json_response(request.app[NOTIFICATIONS])


async def clear_notifications(request: web.Request) -> web.Response:
    request.app[NOTIFICATIONS].clear()
    return web.json_response({"ok": True})


def make_app() -> web.Application:
    app = web.Application()
    app[NOTIFICATIONS] = []
    app.router.add_get("/notifications", list_notifications)
    app.router.add_delete("/notifications", clear_notifications)
    app.router.add_post("/{tail:.*}", receive)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipemon.stack.sink", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:9099", help="HOST:PORT (default 127.0.0.1:9099)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    print(f"pipemon sink listening on http://{host}:{port}/", flush=True)
    web.run_app(make_app(), host=host or "127.0.0.1", port=int(port), print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
