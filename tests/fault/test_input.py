"""Guarantee 3, hostile input: fuzzing (hypothesis, and schemathesis against the served OpenAPI spec) finds no
5xx, no label value that breaks the exposition, no state change from a rejected request; oversized and
compressed-bomb bodies are 413 without memory growth; slow-loris clients do not stop ingest or scrapes; 10,000
distinct random pipeline names meet the cardinality cap with flat memory."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import random
import socket
import string
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fault.common import Exporter, metric, pipeline_samples, post_ndjson, rss_kib, scrape
from tests.helpers import samples

pytestmark = [pytest.mark.fault, pytest.mark.slow]

MAX_BODY = 64 * 1024
FUZZ_EXAMPLES = int(os.environ.get("PIPEMON_FUZZ_EXAMPLES", "300"))


class Conn:
    """One keep-alive HTTP connection; reconnects if the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in range(2):
            try:
                self.conn.request(method, path, body, headers or {})
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def metrics(self) -> str:
        status, body = self.call("GET", "/metrics")
        assert status == 200
        return body.decode()

    def pipeline_names(self) -> set[str]:
        status, body = self.call("GET", "/api/v1/pipelines")
        assert status == 200
        return {p["pipeline"] for p in json.loads(body)["pipelines"]}


def assert_exposition_round_trips(conn: Conn) -> dict:
    """Every pipeline label in /metrics parses back to exactly a name pipemon tracks (escaping holds)."""
    text = conn.metrics()
    parsed = samples(text)  # raises on a broken line
    labels = {dict(lab)["pipeline"] for (name, lab), _ in parsed.items() if name.startswith("pipeline_")}
    names = conn.pipeline_names()
    assert labels == names
    for name in names:  # and escaped exactly as the text format says (a lenient parser forgives a lone backslash)
        escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        assert f'{{pipeline="{escaped}",' in text, f"pipeline {name!r} is not escaped right in /metrics"
    return {k: repr(v) for k, v in parsed.items() if k[0].startswith("pipeline_")}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("input")
    with Exporter(tmp, "--max-body-bytes", str(MAX_BODY)) as exp:
        exp.start()
        yield exp
        assert exp.proc.poll() is None, exp.tail()
        text = scrape(exp.url)
        promtool = "/usr/bin/promtool"
        if os.path.exists(promtool):
            import subprocess

            checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            assert "error" not in (checked.stdout + checked.stderr).lower(), checked.stdout + checked.stderr


# ---- hypothesis ----------------------------------------------------------------------------------------

NASTY = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ['"', "\\", "\n", '\\"', "a\\nb", "}", 'x"} 1\nfake_metric 2', "\u2028", "\x00", " ", "", "é" * 201, "a" * 201])
SCALAR = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | NASTY
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NASTY, inner, max_size=3),
                     max_leaves=6)
TIMESTAMP = st.sampled_from(["2024-01-01T00:00:00Z", "2999-01-01T00:00:00Z", "1970-01-01T00:00:00+00:00",
                             "2024-13-01T00:00:00Z", "not a date", "2024-01-01T00:00:00"]) | NASTY
FIELDS = {
    "pipeline": NASTY | VALUE, "run_id": NASTY | VALUE, "status": st.sampled_from(["success", "failure"]) | VALUE,
    "duration_seconds": st.floats() | st.integers(-10, 10**12) | VALUE,
    "records_processed": st.integers(-(2**65), 2**65) | VALUE, "started_at": TIMESTAMP, "finished_at": TIMESTAMP,
    "team": st.sampled_from(["alpha", "beta", "nope"]) | NASTY,
}
# Label values made of what the exposition format must escape (backslash, quote, newline) and what looks like
# its syntax: most of these are valid pipeline names, so they reach /metrics.
LABELISH = st.text(alphabet=st.sampled_from(["\\", '"', "n", "\n", "{", "}", "=", ",", " ", "#", "a", "é", "\u2028"]),
                   min_size=1, max_size=12)
VALID = st.fixed_dictionaries(
    {"pipeline": LABELISH | NASTY, "run_id": st.text(string.ascii_letters, min_size=1, max_size=8) | NASTY,
     "status": st.sampled_from(["success", "failure"]), "duration_seconds": st.floats(0, 1e6)},
    optional={"records_processed": st.integers(0, 10**9), "team": st.sampled_from(["alpha", "beta"]) | NASTY})
EVENT = st.fixed_dictionaries({}, optional={**FIELDS, "extra": VALUE}) | VALID


@st.composite
def bodies(draw) -> tuple[str, bytes, str]:
    path = draw(st.sampled_from(["/api/v1/runs", "/api/v1/runs/start", "/api/v1/lineage"]))
    kind = draw(st.sampled_from(["object", "array", "ndjson", "bytes", "value"]))
    if kind == "object":
        return path, json.dumps(draw(EVENT)).encode(), "application/json"
    if kind == "array":
        return path, json.dumps(draw(st.lists(EVENT | VALUE, max_size=5))).encode(), "application/json"
    if kind == "ndjson":
        lines = draw(st.lists(EVENT.map(json.dumps) | NASTY, max_size=5))
        return path, "\n".join(lines).encode(), "application/x-ndjson"
    if kind == "bytes":
        return path, draw(st.binary(max_size=200)), draw(st.sampled_from(["application/json", "application/x-ndjson",
                                                                           "text/plain"]))
    return path, json.dumps(draw(VALUE)).encode(), "application/json"


def test_hypothesis_fuzzing_no_5xx_no_broken_exposition_no_change_on_rejection(served):
    conn = Conn(served.port)
    seen = {"examples": 0, "rejected": 0}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies())
    def check(case):
        path, body, ctype = case
        before = assert_exposition_round_trips(conn)
        status, answer = conn.call("POST", path, body, {"Content-Type": ctype})
        assert status < 500, (status, answer, case)
        seen["examples"] += 1
        after = assert_exposition_round_trips(conn)
        if status != 200:
            seen["rejected"] += 1
            assert after == before, f"rejected ({status}) and yet changed state: {case}"
        else:
            decoded = json.loads(answer)
            if decoded.get("rejected") == len(decoded.get("results", [None])) and decoded.get("results"):
                assert after == before, f"every item rejected and yet changed state: {case}"

    check()
    print(f"\nhypothesis: {seen['examples']} bodies, {seen['rejected']} rejected whole, 0 5xx")


# ---- schemathesis against the served spec --------------------------------------------------------------


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_against_the_served_openapi_spec(served, mode):
    """Schemathesis' generators over every operation of /api/v1/openapi.json, valid and invalid requests.
    (Its pytest plugin does not run under pytest 9 yet, so the strategies are driven by hypothesis directly.)"""
    api = schemathesis.openapi.from_url(f"{served.url}/api/v1/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/api/v1/runs", "/api/v1/runs/start"}
    conn = Conn(served.port)
    seen = {"cases": 0, "rejected": 0}
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations])

    @settings(max_examples=FUZZ_EXAMPLES // 2, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(case):
        before = assert_exposition_round_trips(conn)
        response = case.call(base_url=served.url)
        case.validate_response(response, checks=CHECKS)
        seen["cases"] += 1
        after = assert_exposition_round_trips(conn)
        if response.status_code != 200:
            seen["rejected"] += 1
            assert after == before, f"rejected ({response.status_code}) and yet changed state"

    check()
    print(f"\nschemathesis {mode.value}: {seen['cases']} requests, {seen['rejected']} rejected, 0 5xx, every"
          " response as the spec says")


# ---- bodies over the limit, compressed bombs, slow clients ---------------------------------------------


def raw_request(port: int, head: bytes, body_chunks, timeout: float = 10) -> bytes:
    """Send a request by hand; returns what came back (the server may answer before the body is done)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
                if b"\r\n\r\n" in reply and b"Content-Length" in reply:
                    head_part, _, rest = reply.partition(b"\r\n\r\n")
                    length = int(head_part.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    if len(rest) >= length:
                        break
        except (ConnectionResetError, TimeoutError):
            pass
        return reply


def test_bodies_over_the_limit_are_413_and_memory_stays_flat(served):
    port, url = served.port, served.url
    before_text = scrape(url)
    before = pipeline_samples(before_text)
    rss0 = rss_kib(served.proc.pid)
    line = json.dumps({"pipeline": "big", "run_id": "r", "status": "success", "duration_seconds": 1}).encode() + b"\n"
    tried = 0
    for _ in range(5):
        # Declared length over the limit, body sent in full (8 MiB).
        big = line * (8 * 1024 * 1024 // len(line))
        reply = raw_request(port, b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(big), [big[i:i + 65536] for i in range(0, len(big),
                                                                                                         65536)])
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        # Chunked, no length announced.
        chunks = [b"%x\r\n%s\r\n" % (len(big[i:i + 65536]), big[i:i + 65536]) for i in range(0, len(big), 65536)]
        reply = raw_request(port, b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n", [*chunks, b"0\r\n\r\n"])
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        # A gzip bomb: 64 KiB compressed that would be 64 MiB of NDJSON.
        bomb = gzip.compress(line * (64 * 1024 * 1024 // len(line)), 9)
        assert len(bomb) < MAX_BODY * 4
        reply = raw_request(port, b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                            b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb), [bomb])
        assert reply[:12] in (b"HTTP/1.1 413", b"HTTP/1.1 400"), reply[:200]
        tried += 3
    # Exactly at the limit is fine.
    fits = (line * (MAX_BODY // len(line)))[:MAX_BODY]
    fits = fits[:fits.rfind(b"\n") + 1]
    reply = raw_request(port, b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(fits), [fits])
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    rss1 = rss_kib(served.proc.pid)
    text = scrape(url)
    assert metric(text, "pipemon_events_rejected_total", reason="too_large") >= 10
    after = pipeline_samples(text)
    assert {k: v for k, v in after.items() if ("pipeline", "big") not in k[1]} == before
    print(f"\n{tried} oversized bodies (8 MiB, chunked 8 MiB, 64 MiB gzip bomb): 413; RSS {rss0 // 1024} ->"
          f" {rss1 // 1024} MiB")
    assert rss1 - rss0 < 40 * 1024, (rss0, rss1)


def test_slow_loris_clients_do_not_stop_ingest_or_scrapes(served):
    pid = served.proc.pid
    fds0 = len(os.listdir(f"/proc/{pid}/fd"))
    slow: list[socket.socket] = []
    try:
        for i in range(200):
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=5)
            if i % 2:  # headers that never finish
                sock.sendall(b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\n")
            else:  # a body that trickles
                sock.sendall(b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n{")
            slow.append(sock)
        conn = Conn(served.port)
        worst = 0.0
        deadline = time.monotonic() + 6
        n = 0
        while time.monotonic() < deadline:
            for sock in slow[n % 10::10]:  # keep trickling, a byte at a time
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-a: b\r\n" if slow.index(sock) % 2 else b" ")
            start = time.monotonic()
            status, body = conn.call("POST", "/api/v1/runs", json.dumps(
                {"pipeline": "loris_ok", "run_id": f"r{n}", "status": "success", "duration_seconds": 1}).encode(),
                {"Content-Type": "application/json"})
            assert status == 200, body
            assert conn.call("GET", "/metrics")[0] == 200
            worst = max(worst, time.monotonic() - start)
            n += 1
            time.sleep(0.05)
        assert worst < 2.0, worst
        print(f"\n200 slow clients held open 6 s: {n} events acknowledged meanwhile, worst ingest+scrape"
              f" {worst * 1000:.0f} ms")
        assert n >= 20
    finally:
        for sock in slow:
            sock.close()
    # Their connections are released when they go.
    fds = 0
    for _ in range(50):
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        if fds <= fds0 + 5:
            break
        time.sleep(0.1)
    assert fds <= fds0 + 5, (fds0, fds)


# ---- cardinality ---------------------------------------------------------------------------------------

CAP = 2000
ALPHABET = string.ascii_letters + string.digits + ' _-./:"\\{}=,é漢🙂'


def random_names(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 120))))
    return sorted(names)


def test_ten_thousand_random_pipeline_names_meet_the_cap_with_flat_memory(tmp_path):
    rng = random.Random(20240601)
    first = random_names(rng, 10_000)
    second = [n + "~2" for n in random_names(random.Random(99), 10_000)]  # 10,000 more, none of the first
    with Exporter(tmp_path, "--max-pipelines", str(CAP)) as exp:
        exp.start()
        url = f"{exp.url}/api/v1/runs"
        accepted = capped = 0
        rss_at_cap = None
        for phase, names in (("first", first), ("second", second)):
            for i in range(0, len(names), 500):
                events = [{"pipeline": n, "run_id": "1", "status": "success", "duration_seconds": 1}
                          for n in names[i:i + 500]]
                status, body = post_ndjson(url, events, timeout=30)
                assert status == 200, body
                accepted += body["accepted"]
                capped += sum(1 for r in body["results"] if r.get("error", {}).get("reason") == "pipeline_cap")
                if rss_at_cap is None and accepted >= CAP:
                    for _ in range(3):  # renders at the cap: the exposition's caches count in the baseline
                        scrape(exp.url, timeout=30)
                    rss_at_cap = exp.rss_kib()
            if phase == "first":
                rss_first = exp.rss_kib()
        rss_end = exp.rss_kib()
        text = scrape(exp.url, timeout=30)
        rss_scraped = exp.rss_kib()
        parsed = samples(text)
        tracked = {dict(labels)["pipeline"] for (name, labels), _ in parsed.items() if name == "pipeline_runs_total"}
        assert accepted == CAP and len(tracked) == CAP
        assert capped == 20_000 - CAP
        assert metric(text, "pipemon_pipelines") == CAP
        assert metric(text, "pipemon_events_rejected_total", reason="pipeline_cap") == capped
        assert tracked <= set(first)  # the label values came back exactly as sent
        print(f"\n20,000 random names, cap {CAP}: {accepted} tracked, {capped} answered 429; RSS at the cap"
              f" {rss_at_cap // 1024} MiB, after 10,000 {rss_first // 1024} MiB, after 20,000 {rss_end // 1024} MiB,"
              f" and scraped {rss_scraped // 1024} MiB")
        # What still grows: the registry's lookup cache remembers every name it resolved, rejected or not, up to
        # 100,000 names (~0.5 KiB each): ~9 MiB for the 18,000 names past the cap. Tracking them would cost
        # 18,000 pipeline states and their series, well over 100 MiB.
        assert rss_end - rss_at_cap < 16 * 1024, (rss_at_cap, rss_first, rss_end)
        assert rss_scraped - rss_at_cap < 20 * 1024, (rss_at_cap, rss_end, rss_scraped)
