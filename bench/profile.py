"""Profile pipemon's hot paths with py-spy under one of the benchmark's loads; prints the top functions.

    python bench/profile.py batch|single|full|incremental [--pipelines N] [--seconds S]

batch: NDJSON batches of 1,000 (wrk, 4 connections); single: one run per request (wrk, 32 connections);
full: /metrics after every pipeline changed; incremental: /metrics after 1% changed. The top lines
(own and inclusive samples per function) are what the optimisation commits quote.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench


def top(raw: str, limit: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [f.replace(str(Path(sys.prefix)), "<venv>") for f in frames]
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    lines = [f"{samples} samples; own% / total%  function (file)"]
    for name, n in own.most_common(limit):
        lines.append(f"{100 * n / samples:5.1f} / {100 * total[name] / samples:5.1f}  {name}")
    lines.append("-- by total --")
    for name, n in total.most_common(limit + 6)[6:]:  # skip the event loop's entry frames
        lines.append(f"{100 * own[name] / samples:5.1f} / {100 * n / samples:5.1f}  {name}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=("batch", "single", "full", "incremental"))
    parser.add_argument("--pipelines", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "pm").mkdir()
        pm = bench.Pipemon(directory / "pm")
        try:
            pm.send_runs(range(args.pipelines), "fill")
            bench.fetch(pm.url, "/metrics")
            out = directory / "profile.txt"
            spy = subprocess.Popen([pyspy, "record", "--pid", str(pm.proc.pid), "--format", "raw", "--output",
                                    str(out), "--duration", str(int(args.seconds)), "--rate", "250", "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            deadline = time.monotonic() + args.seconds - 1
            if args.load in ("batch", "single"):
                lua = bench.LUA_PIPEMON_BATCH if args.load == "batch" else bench.LUA_PIPEMON_SINGLE
                result = bench.wrk(pm.url, lua, ["p", str(args.pipelines)], 4 if args.load == "batch" else 32,
                                   args.seconds - 1)
                rate = result.rate * (1000 if args.load == "batch" else 1)
                print(f"{args.load}: {rate:,.0f} runs/s, p99 {result.p99_ms:.1f} ms")
            else:
                changed = args.pipelines if args.load == "full" else max(1, args.pipelines // 100)
                times, i = [], 0
                while time.monotonic() < deadline:
                    first = (i * changed) % args.pipelines
                    pm.send_runs(range(first, min(first + changed, args.pipelines)), f"r{i}")
                    times.append(bench.fetch(pm.url, "/metrics")[0])
                    i += 1
                print(f"{args.load}: median {bench.median(times) * 1000:.0f} ms over {len(times)} scrapes")
            spy.wait(60)
            print(top(out.read_text(), args.top))
        finally:
            pm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
