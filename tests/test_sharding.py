"""Sharded exposition: `/metrics?shard=K&shards=N` splits the pipelines by a stable hash of their name, every
pipeline in exactly one shard, the exporter's own metrics on shard 0 only; bad parameters are a 400."""

import json
import zlib

import pytest

from pipemon.service.sharding import shard_of
from tests.helpers import run, samples


async def fill(client, count: int = 60) -> None:
    body = "\n".join(json.dumps(run(f"p{i:03d}", "r1")) for i in range(count))
    resp = await client.post("/api/v1/runs", data=body, headers={"Content-Type": "application/x-ndjson"})
    assert resp.status == 200


def pipelines_in(text: str) -> set[str]:
    return {dict(labels)["pipeline"] for (name, labels), _ in samples(text).items() if name.startswith("pipeline_")}


def test_the_hash_is_stable_crc32():
    # The same shard on every replica, restart and Python: not Python's salted hash().
    assert shard_of("orders_daily", 4) == zlib.crc32(b"orders_daily") % 4
    assert [shard_of(f"p{i}", 3) for i in range(6)] == [zlib.crc32(f"p{i}".encode()) % 3 for i in range(6)]


@pytest.mark.parametrize("gzipped", [False, True])
async def test_shards_partition_the_pipelines(exporter_client, gzipped):
    client = await exporter_client()
    await fill(client)
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}
    whole = await (await client.get("/metrics", headers=headers)).text()
    shards = [await (await client.get(f"/metrics?shard={k}&shards=3", headers=headers)).text() for k in range(3)]
    parts = [pipelines_in(text) for text in shards]
    assert set().union(*parts) == pipelines_in(whole)
    assert sum(len(p) for p in parts) == len(pipelines_in(whole))  # each pipeline in exactly one shard
    for k, names in enumerate(parts):
        assert names and all(shard_of(name, 3) == k for name in names)
    # The per-pipeline samples of the shards add up to the whole exposition's.
    pipeline_samples = {k: repr(v) for text in shards for k, v in samples(text).items()
                        if k[0].startswith("pipeline_")}
    assert pipeline_samples == {k: repr(v) for k, v in samples(whole).items() if k[0].startswith("pipeline_")}
    own = [any(name.startswith("pipemon_") for name, _ in samples(text)) for text in shards]
    assert own == [True, False, False]


async def test_openmetrics_shards_end_with_eof(exporter_client):
    client = await exporter_client()
    await fill(client, 10)
    for k in range(2):
        text = await (await client.get(f"/metrics?shard={k}&shards=2",
                                       headers={"Accept": "application/openmetrics-text"})).text()
        assert text.endswith("# EOF\n") and text.count("# EOF") == 1


async def test_a_shard_follows_new_pipelines(exporter_client):
    client = await exporter_client()
    await (await client.get("/metrics?shard=0&shards=2")).text()
    await fill(client, 20)
    after = pipelines_in(await (await client.get("/metrics?shard=0&shards=2")).text())
    assert {f"p{i:03d}" for i in range(20) if shard_of(f"p{i:03d}", 2) == 0} <= after


@pytest.mark.parametrize("query", ["shard=0", "shards=2", "shard=2&shards=2", "shard=-1&shards=2",
                                   "shard=a&shards=2", "shard=0&shards=0", "shard=0&shards=100000"])
async def test_bad_shard_parameters_are_a_400(exporter_client, query):
    client = await exporter_client()
    resp = await client.get(f"/metrics?{query}")
    assert resp.status == 400
    assert (await resp.json())["error"]["reason"] == "invalid_shard"
