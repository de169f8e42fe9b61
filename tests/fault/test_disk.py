"""Guarantee 2, disk trouble: with the state directory full or read-only the exporter answers 503 to ingest
(nothing of the request kept, no state change), keeps serving /metrics, counts pipemon_storage_errors_total,
and recovers by itself when the disk is back: the same events, retried, are then accepted and counted once.

"full" is a real 1 MiB tmpfs filled to the last byte when this machine allows mounting one (as root in CI);
otherwise, and for "read-only" (Linux refuses to remount a file system read-only while SQLite holds its files
open for writing), the fault is injected at the storage layer (PIPEMON_STORAGE_FAULT), which raises the same
sqlite3 errors from every write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.common import Exporter, metric, pipeline_samples, post_ndjson, request, runs_counted, scrape

pytestmark = [pytest.mark.fault, pytest.mark.slow]


@contextlib.contextmanager
def small_tmpfs(path: Path) -> Iterator[bool]:
    path.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the file system has no byte left."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def batch(tag: str, n: int) -> list[dict]:
    return [{"pipeline": f"disk_{i % 5}", "run_id": f"{tag}-{i}", "status": "success", "duration_seconds": 2.0,
             "records_processed": 1000} for i in range(n)]


class Fault:
    """Turns the disk trouble on and off: a filler file on a real tmpfs, or the storage-layer hook."""

    def __init__(self, tmp: Path, kind: str, disk: Path, real: bool) -> None:
        self.kind, self.disk, self.real = kind, disk, real
        self.flag = tmp / "storage-fault"
        self.filler: Path | None = None

    def env(self) -> dict[str, str]:
        return {} if self.real else {"PIPEMON_STORAGE_FAULT": str(self.flag)}

    def on(self) -> None:
        if self.real:
            self.filler = fill(self.disk)
        else:
            self.flag.write_text(self.kind)

    def off(self) -> None:
        if self.real:
            assert self.filler is not None
            self.filler.unlink()
        else:
            self.flag.unlink()


@pytest.mark.parametrize("kind", ["full", "readonly"])
def test_disk_trouble_is_503_metrics_stay_up_and_it_recovers(tmp_path, kind):
    with small_tmpfs(tmp_path / "disk") as mounted:
        fault = Fault(tmp_path, kind, tmp_path / "disk", real=mounted and kind == "full")
        print(f"\n{kind}: {'real 1 MiB tmpfs' if fault.real else 'injected at the storage layer'}")
        with Exporter(tmp_path, state_dir=tmp_path / "disk" / "state", env=fault.env()) as exp:
            exp.start()
            url = f"{exp.url}/api/v1/runs"
            status, body = post_ndjson(url, batch("before", 50))
            assert status == 200 and body["accepted"] == 50
            acked = 50
            fault.on()

            # The disk is in trouble: some write fails (a full tmpfs may still fit a few pages of WAL first).
            rejected: list[list[dict]] = []
            before = pipeline_samples(scrape(exp.url))
            for attempt in range(400):
                events = batch(f"during{attempt}", 100)
                status, body = post_ndjson(url, events)
                if status == 200:
                    assert body["accepted"] == 100, body
                    acked += 100
                    before = pipeline_samples(scrape(exp.url))
                    continue
                assert status == 503, (status, body)
                assert body["error"]["reason"] == "storage_unavailable", body
                rejected.append(events)
                if len(rejected) == 5:
                    break
            assert len(rejected) == 5, "the exporter kept acknowledging writes to a full disk"
            single = {"pipeline": "disk_single", "run_id": "s1", "status": "failure", "duration_seconds": 1}
            status, body = request(url, single)
            assert (status, body["error"]["reason"]) == (503, "storage_unavailable")
            status, body = request(f"{exp.url}/api/v1/runs/start", {"pipeline": "disk_single", "run_id": "s2"})
            assert status == 503, body

            for _ in range(3):  # /metrics keeps working, nothing of a 503 request shows
                text = scrape(exp.url)
                assert pipeline_samples(text) == before
                assert runs_counted(text, "disk_") == acked
            errors = metric(text, "pipemon_storage_errors_total")
            assert errors >= 7, errors
            assert metric(text, "pipemon_events_rejected_total", reason="storage_unavailable") >= 5 * 100 + 2
            assert exp.proc.poll() is None, exp.tail()

            fault.off()
            # Recovery by itself: the next write reconnects; no restart, no admin action.
            status, body = request(url, single)
            assert (status, body["status"]) == (200, "accepted"), body
            for events in rejected:  # the client retries what got 503: accepted now, counted once
                status, body = post_ndjson(url, events)
                assert status == 200 and body["accepted"] == 100, body
                acked += 100
            text = scrape(exp.url)
            assert runs_counted(text, "disk_") == acked + 1
            assert metric(text, "pipemon_storage_errors_total") >= errors
            print(f"{kind}: {errors:.0f} storage errors, {len(rejected) * 100 + 2} events answered 503 and none"
                  f" kept; recovered without restart; {acked + 1} runs counted = acknowledged")
        # And the state survived the trouble: a restart shows the same counts.
        with Exporter(tmp_path, state_dir=tmp_path / "disk" / "state", env=fault.env()) as again:
            again.start()
            assert runs_counted(scrape(again.url), "disk_") == acked + 1
