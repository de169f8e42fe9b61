"""Sharded exposition: `/metrics?shard=K&shards=N` exposes the pipelines whose stable hash falls in shard K,
so N scrape jobs (or N Prometheus servers) split a fleet whose `/metrics` outgrows one scrape. The hash is
CRC-32 of the pipeline name: the same on every replica, every restart and every version of Python."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping

from pipemon.model.state import PipelineState

MAX_SHARDS = 1024


class ShardError(ValueError):
    """The shard parameters of a request are off (answered with 400)."""


def shard_of(name: str, shards: int) -> int:
    return zlib.crc32(name.encode()) % shards


def parse_shard(query: Mapping[str, str]) -> tuple[int, int] | None:
    """(K, N) from `shard` and `shards`, or None for the whole exposition."""
    if "shard" not in query and "shards" not in query:
        return None
    try:
        shard, shards = int(query["shard"]), int(query["shards"])
    except KeyError as exc:
        raise ShardError("give both shard and shards, e.g. /metrics?shard=0&shards=4") from exc
    except ValueError as exc:
        raise ShardError("shard and shards must be integers") from exc
    if not 1 <= shards <= MAX_SHARDS or not 0 <= shard < shards:
        raise ShardError(f"expected 0 <= shard < shards <= {MAX_SHARDS}, got shard={shard} shards={shards}")
    return shard, shards


def shard_filter(states: Callable[[], Iterable[PipelineState]], shard: int,
                 shards: int) -> Callable[[], list[PipelineState]]:
    """The pipelines of one shard, in tracking order (the renderer caches by position). Hashes are remembered:
    a scrape of one shard of 10,000 pipelines hashes only the new ones."""
    hashes: dict[str, int] = {}

    def select() -> list[PipelineState]:
        picked = []
        for state in states():
            number = hashes.get(state.name)
            if number is None:
                number = hashes[state.name] = shard_of(state.name, shards)
            if number == shard:
                picked.append(state)
        if len(hashes) > 2 * len(picked) * shards + 1000:  # forgotten pipelines: start the memo again
            hashes.clear()
        return picked

    return select
