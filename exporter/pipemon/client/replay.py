"""`pipemon replay FILE…`: send NDJSON files of events to pipemon, for what was kept while it was unreachable.

Each line is an OpenLineage RunEvent (the OpenLineage file transport's output, e.g. the file half of a composite
transport), a native event (`POST /api/v1/runs` with a `status`, `/api/v1/runs/start` without), or a line of the
pipemon client's spool (`{"path": …, "event": …}`). Lines go in file order, in NDJSON batches, to their endpoint.
Replaying is idempotent: pipemon counts each (pipeline, run id) start and finish once, so a file sent twice, or
events that did arrive before pipemon went down, come back `duplicate`. Progress goes to stderr; the summary counts
accepted / duplicate / ignored / rejected, with reasons. Exit status: 0, 1 when some events were rejected, 2 when
pipemon could not be reached (running it again is safe).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

LINEAGE, FINISH, START = "/api/v1/lineage", "/api/v1/runs", "/api/v1/runs/start"
BATCH_EVENTS = 500
BATCH_BYTES = 1 << 20  # well under the exporter's default --max-body-bytes (10 MiB)
RETRIES = 5


class Unreachable(Exception):
    """pipemon did not answer, or answered 5xx, after the retries."""


@dataclass
class Summary:
    counts: Counter[str] = field(default_factory=Counter)  # accepted, duplicate, ignored, rejected
    reasons: Counter[str] = field(default_factory=Counter)  # "ignored: child_run", "rejected: malformed"…

    def add(self, result: dict[str, Any]) -> None:
        status = str(result.get("status", "rejected"))
        self.counts[status] += 1
        if status == "ignored":
            self.reasons[f"ignored: {result.get('reason', '?')}"] += 1
        elif status == "rejected":
            self.reasons[f"rejected: {result.get('error', {}).get('reason', '?')}"] += 1

    def text(self) -> str:
        head = ", ".join(f"{self.counts[s]} {s}" for s in ("accepted", "duplicate", "ignored", "rejected"))
        return head + "".join(f"\n  {reason}: {n}" for reason, n in sorted(self.reasons.items()))


def endpoint_of(line: bytes) -> tuple[str, bytes] | None:
    """The endpoint a line goes to, and the event to send; None for a line that is not a JSON object."""
    try:
        item = json.loads(line)
    except ValueError:
        return None
    if not isinstance(item, dict):
        return None
    if set(item) == {"path", "event"} and item["path"] in (LINEAGE, FINISH, START):  # the client's spool
        return item["path"], json.dumps(item["event"]).encode()
    if "eventType" in item or "run" in item:
        return LINEAGE, line
    return (FINISH if "status" in item else START), line


class Sender:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0, retries: int = RETRIES) -> None:
        self.url, self.token, self.timeout, self.retries = url.rstrip("/"), token, timeout, retries

    def post(self, path: str, lines: list[bytes]) -> list[dict[str, Any]]:
        """One NDJSON batch; the results per line. Retries with backoff while pipemon is unreachable."""
        headers = {"Content-Type": "application/x-ndjson"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        body = b"\n".join(lines) + b"\n"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["results"]
            except urllib.error.HTTPError as exc:
                answer = _json(exc.read())
                if exc.code < 500:  # the whole request refused (token, size): every line is rejected alike
                    error = answer.get("error", {"reason": f"http_{exc.code}"})
                    return [{"status": "rejected", "error": error}] * len(lines)
                problem: str = f"HTTP {exc.code}: {answer.get('error', {}).get('message', '')}"
            except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
                problem = str(getattr(exc, "reason", exc))
            if attempt < self.retries:
                time.sleep(min(8.0, 0.5 * 2**attempt))
        raise Unreachable(f"{self.url}{path}: {problem}")


def _json(body: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def lines_of(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as f:
            for line in f:
                if line.strip():
                    yield line.strip()


def replay(paths: list[Path], sender: Sender, progress: TextIO | None = None) -> Summary:
    """Send every line of `paths`, in order; batches break where the endpoint changes."""
    total = sum(1 for _ in lines_of(paths))
    summary, done = Summary(), 0
    batch: list[bytes] = []
    batch_path, batch_bytes = "", 0

    def flush() -> None:
        nonlocal done, batch, batch_bytes
        if batch:
            for result in sender.post(batch_path, batch):
                summary.add(result)
            done += len(batch)
            batch, batch_bytes = [], 0
            _show(progress, done, total)

    for line in lines_of(paths):
        target = endpoint_of(line)
        if target is None:
            summary.add({"status": "rejected", "error": {"reason": "malformed"}})
            done += 1
            continue
        path, event = target
        if path != batch_path or len(batch) >= BATCH_EVENTS or batch_bytes + len(event) > BATCH_BYTES:
            flush()
            batch_path = path
        batch.append(event)
        batch_bytes += len(event) + 1
    flush()
    if progress is not None and progress.isatty():
        progress.write("\n")
    return summary


def _show(progress: TextIO | None, done: int, total: int) -> None:
    if progress is None:
        return
    width = 30
    filled = width * done // max(total, 1)
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} events"
    progress.write(f"\r{line}" if progress.isatty() else f"{line}\n")
    progress.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE",
                        help="NDJSON files: OpenLineage events, native events, or pipemon client spool lines")
    parser.add_argument("--url", default=os.environ.get("PIPEMON_URL", "http://127.0.0.1:9464"),
                        help="exporter URL (default: $PIPEMON_URL, else %(default)s)")
    parser.add_argument("--token-file", type=Path, help="file holding a bearer token (default: $PIPEMON_TOKEN)")
    parser.add_argument("--retries", type=int, default=RETRIES,
                        help="retries of a batch while pipemon is unreachable, with backoff (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress, only the summary")


def run(args: argparse.Namespace) -> int:
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("PIPEMON_TOKEN")
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"pipemon replay: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        summary = replay(args.files, Sender(args.url, token, retries=args.retries), None if args.quiet else sys.stderr)
    except Unreachable as exc:
        print(f"\npipemon replay: pipemon unreachable ({exc}); what was sent is kept, run it again", file=sys.stderr)
        return 2
    print(summary.text())
    return 1 if summary.counts["rejected"] else 0
