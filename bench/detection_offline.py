"""Offline check of the run judgements: the detection bench's fleet through the exporter's model in-process,
judged after every successful run by the web UI's health conditions (the rules' definitions in Python, see
pipemon.model.health), no Prometheus: about a minute a seed, so that a threshold or a judgement change can be
tried on many seeds before the full bench (bench/detection.py) measures it end to end.

    python bench/detection_offline.py --seeds 1 2 3 4 5 --end 2026-12-03T11:00:00
    python bench/detection_offline.py --config /tmp/config.yaml   # a copy of rules/config.yaml, edited

It judges only the conditions about finished runs the health model has (slow: PipelineDurationAnomaly's
medium tier, volume low, throughput drop), one alert per run that meets one; not the high tier, the run in
progress, failures, staleness or Alertmanager. An alert belongs to an incident of its pipeline when its run
finished between the incident's start and one expected interval (at most 1 h) after its end, as in the bench.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from detection import feed, fleet  # noqa: E402
from detection.report import allowance  # noqa: E402

from pipemon.model import health  # noqa: E402
from pipemon.model.events import Finish, Start  # noqa: E402
from pipemon.model.registry import PipelineSpec, Registry, load_registry  # noqa: E402
from pipemon.model.state import Pipelines  # noqa: E402
from pipemon.render.rules import load_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONDITIONS = (health.SLOW, health.VOLUME_LOW, health.THROUGHPUT_DROP)
# the incidents each condition detects (bench/detection/report.py's EXPECTED, for these conditions)
DETECTS = {"slowdown": {health.SLOW}, "throughput_drop": {health.THROUGHPUT_DROP, health.SLOW},
           "volume_drop": {health.VOLUME_LOW}, "zero_records": {health.VOLUME_LOW}}


def judged_runs(sim: fleet.Fleet, registry: Registry, judge: health.HealthJudge) -> list[tuple[str, float, str]]:
    """(pipeline, finish time, condition) for every successful run after the warm-up that meets a condition."""
    def spec_for(name: str, team: str | None) -> PipelineSpec:
        return registry.lookup(name) or registry.default_spec(name)

    pipelines = Pipelines()
    found = []
    for _, finished, run in feed.event_stream(sim):
        if not finished:
            pipelines.apply(Start(run.pipeline, run.run_id, run.start), spec_for)
            continue
        pipelines.apply(Finish(run.pipeline, run.run_id, run.success, run.end, run.end - run.start, run.records),
                        spec_for)
        if run.success and run.end >= sim.eval_start:
            found += [(run.pipeline, run.end, c) for c in judge.prepare(pipelines.get(run.pipeline)).judged]
    return found


def score(sim: fleet.Fleet, found: list[tuple[str, float, str]]) -> tuple[Counter, dict[str, tuple[int, int]]]:
    """False alerts by condition, and (detected, total) by incident type."""
    by_pipeline: dict[str, list[fleet.Label]] = {}
    for incident in sim.incidents:
        by_pipeline.setdefault(incident.pipeline, []).append(incident)
    false: Counter = Counter()
    detected: set[int] = set()
    for pipeline, at, condition in found:
        owners = [i for i in by_pipeline.get(pipeline, ()) if i.start <= at <= i.end + allowance(i)]
        if not owners:
            false[condition] += 1
        detected.update(id(i) for i in owners if condition in DETECTS.get(i.kind, ()))
    idle = {p.name for p in sim.pipelines if p.has_idle_runs}
    recall = {}
    for kind in DETECTS:
        for column, incidents in ((kind, [i for i in sim.incidents if i.kind == kind]),
                                  (f"{kind}, idle pipeline", [i for i in sim.incidents
                                                              if i.kind == kind and i.pipeline in idle])):
            recall[column] = (sum(id(i) in detected for i in incidents), len(incidents))
    return false, recall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--end", type=fleet.parse_end, required=True,
                    help="when the simulated history ends (as the bench's --end)")
    ap.add_argument("--pipelines", type=int, default=50)
    ap.add_argument("--days", type=float, default=28)
    ap.add_argument("--warmup-days", type=float, default=14)
    ap.add_argument("--incident-types", default=",".join(fleet.INCIDENT_TYPES), help="comma-separated")
    ap.add_argument("--per-type", type=int, help="incidents of each type (default: as the bench's)")
    ap.add_argument("--config", type=Path, default=REPO / "rules" / "config.yaml", help="the rules config")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    judge = health.HealthJudge(load_config(args.config), str(args.config))
    types = tuple(args.incident_types.split(","))
    print(f"config: {args.config}; {args.pipelines} pipelines, {args.days:g} days ({args.warmup_days:g} warm-up)")
    recall_columns = [c for kind in DETECTS for c in (kind, f"{kind}, idle pipeline")]
    print(f"| seed | {' | '.join(f'false {c} per pipeline-month' for c in CONDITIONS)} | "
          f"{' | '.join(recall_columns)} |")
    print(f"|---|{'---|' * (len(CONDITIONS) + len(recall_columns))}")
    results = {}
    for seed in args.seeds:
        sim = fleet.simulate_fleet(args.pipelines, args.days, args.warmup_days, seed, args.end, types, args.per_type)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pipelines.yaml"
            feed.write_registry(sim.pipelines, path, schedule_features=True)
            registry = load_registry(path)
        false, recall = score(sim, judged_runs(sim, registry, judge))
        months = len(sim.pipelines) * (sim.end - sim.eval_start) / (30 * fleet.DAY)
        results[seed] = {"false_per_pipeline_month": {c: false[c] / months for c in CONDITIONS},
                         "false": {c: false[c] for c in CONDITIONS}, "recall": recall}
        cells = [f"{false[c] / months:.2f} ({false[c]})" for c in CONDITIONS]
        cells += [f"{hit}/{total}" for hit, total in recall.values()]
        print(f"| {seed} | {' | '.join(cells)} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
