"""pipemon.stack.balancer (the one address of `pipemon stack --ha`): passes a replica that refuses connections over
for the next, forwards bodies, queries and encodings as they are."""

import asyncio
import gzip
import json

from pipemon.service.app import create_app
from pipemon.stack import balancer
from tests.helpers import run, value
from tests.procs import free_port


async def raw_get(port: int, path: str) -> str:
    """A request without Accept-Encoding (urllib and http.client always send one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"gzip" not in head.lower(), head
    return body.decode()


async def test_a_dead_replica_is_passed_over_and_requests_forwarded_as_they_are(aiohttp_client, config):
    port = free_port()
    await aiohttp_client(create_app(config), server_kwargs={"port": port})
    dead = f"http://127.0.0.1:{free_port()}"
    front = await aiohttp_client(balancer.create_app([dead, f"http://127.0.0.1:{port}"]))
    resp = await front.post("/api/v1/runs", data=json.dumps(run("orders_daily", "r1")))
    assert resp.status == 200 and (await resp.json())["status"] == "accepted"
    text = await raw_get(front.port, "/metrics?shard=0&shards=1")  # like curl: no Accept-Encoding at all
    assert value(text, "pipeline_runs_total", pipeline="orders_daily", team="data-eng", status="success") == 1
    packed = await front.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert packed.headers["Content-Encoding"] == "gzip"
    assert b"pipeline_runs_total" in gzip.decompress(await packed.read())


async def test_no_replica_answering_is_a_502(aiohttp_client):
    front = await aiohttp_client(balancer.create_app([f"http://127.0.0.1:{free_port()}"]))
    assert (await front.get("/metrics")).status == 502
