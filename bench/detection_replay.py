"""Replay a detection-bench run (`bench/detection.py --json FILE`) with other alert hold times or another
Alertmanager config, in seconds instead of a new run of the whole bench.

    python bench/detection_replay.py run.json                                  # the run's own figures again
    python bench/detection_replay.py run.json --keep-firing-for PipelineSuccessRateLow=30m
    python bench/detection_replay.py run.json --alertmanager-config other.yml

The fleet is simulated again from the run's seed and end (the simulation is deterministic); the alert
episodes are the run's, so the rules are not evaluated again. A longer `keep_firing_for` is exact on these
episodes: an alert stays firing that much longer after its condition last held, and two episodes of one
alert closer than that become one. A shorter one is not: where the run kept an alert firing through a gap,
whether its condition held is not in the file (run the bench with the shorter value instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from detection import fleet, notify, prom, report  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the --json file of a bench/detection.py run")
    ap.add_argument("--keep-firing-for", action="append", default=[], metavar="ALERT=DURATION",
                    help="keep_firing_for of an alert (at least the run's; repeatable)")
    ap.add_argument("--alertmanager-config", type=Path, help="default: the run's")
    ap.add_argument("--json", type=Path, help="write the replayed figures to this file")
    return ap.parse_args(argv)


def keep_firing_changes(texts: list[str], run: dict) -> dict[str, float]:
    """ALERT=DURATION options as seconds to add to each alert's keep_firing_for in the run."""
    held = run.get("keep_firing_for")
    if held is None:
        raise SystemExit("the run file has no keep_firing_for per alert: run bench/detection.py again")
    step = run["evaluation_interval_seconds"]
    changes: dict[str, float] = {}
    for text in texts:
        name, sep, duration = text.partition("=")
        if not sep or name not in held:
            raise SystemExit(f"--keep-firing-for {text!r}: expected ALERT=DURATION with ALERT one of"
                             f" {', '.join(sorted(held))}")
        added = prom.parse_duration(duration) - held[name]
        if added < 0:
            raise SystemExit(f"--keep-firing-for {text!r}: shorter than the run's {held[name]:g} s, which a replay"
                             " cannot undo (run bench/detection.py with it)")
        if added % step:
            raise SystemExit(f"--keep-firing-for {text!r}: not a whole number of evaluation intervals ({step:g} s)")
        changes[name] = added
    return changes


def hold_longer(episodes: list[prom.Episode], added: dict[str, float], end: float) -> list[prom.Episode]:
    """The episodes as Prometheus' rule manager would have made them with `added` seconds more
    keep_firing_for: each ends that much later (not after `end`), and one that then reaches the next episode
    of the same alert becomes one with it."""
    by_alert: dict[tuple, list[prom.Episode]] = {}
    for ep in sorted(episodes, key=lambda e: e.start):
        by_alert.setdefault(ep.key(), []).append(ep)
    out: list[prom.Episode] = []
    for series in by_alert.values():
        extra = added.get(series[0].alertname, 0.0)
        current: prom.Episode | None = None
        for ep in series:
            ends = ep.end if ep.open else min(ep.end + extra, end)
            if current is not None and not current.open and ep.active_at < current.end:
                current.end, current.open = max(current.end, ends), ep.open
                continue
            current = prom.Episode(ep.alertname, ep.labels, ep.active_at, ep.start, ends, ep.open)
            out.append(current)
    return out


def simulate_again(run: dict) -> fleet.Fleet:
    args = run["args"]
    per_type = None if args["per_type"] == "None" else int(args["per_type"])
    types = tuple(t for t in args["incident_types"].split(",") if t)
    end = run["simulated_end"]
    return fleet.simulate_fleet(int(args["pipelines"]), float(args["days"]), float(args["warmup_days"]),
                                int(args["seed"]), end, types, per_type)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = json.loads(args.run.read_text())
    if "simulated_end" not in run:
        raise SystemExit("the run file has no simulated_end: run bench/detection.py again")
    added = keep_firing_changes(args.keep_firing_for, run)
    sim = simulate_again(run)
    episodes = [prom.Episode(**{k: v for k, v in ep.items() if k != "incident"}) for ep in run["alert_episodes"]]
    episodes = hold_longer(episodes, added, sim.end)
    am_path = args.alertmanager_config or Path(run["alertmanager_config"])
    if not am_path.is_file():
        raise SystemExit(f"{am_path}: no such file (the run's was in its work dir?): pass --alertmanager-config")
    am = notify.load_config(am_path)
    notes = notify.Dispatcher(am, episodes).run(sim.end)
    result = report.score(sim, episodes, notes, report.EXPECTED)
    changes = ", ".join(args.keep_firing_for) or "none"
    print(f"replay of {args.run}: keep_firing_for changes: {changes}; Alertmanager config: {am_path}")
    print()
    for table in (report.incident_table(result, list(report.EXPECTED)), report.false_table(result),
                  report.targets_table(result)):
        print("\n".join(table))
        print()
    if args.json:
        args.json.write_text(json.dumps(report.to_json(result), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
