"""Detection-quality benchmark (issue 11): a seeded fleet's histories through the real exporter, the rule files
evaluated by the real Prometheus tools, notifications from a model of the Alertmanager config, scored against
labelled incidents and benign traps.

    python bench/detection.py                      # ~50 pipelines, 28 days (14 warm-up), rules/ of the tree
    python bench/detection.py --quick              # ~20 pipelines, 10 days
    python bench/detection.py --rules-rev 7c93d63  # rules/ and alertmanager/ from a git revision

See bench/README.md, "Detection quality", for the method and its limits.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import prometheus_cost_rules  # noqa: E402
from detection import feed, fleet, notify, prom, report  # noqa: E402
from detection.report import EXPECTED  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class Phases:
    """Wall-clock time of each phase, printed as it ends."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.monotonic()

    def done(self, name: str, note: str = "") -> None:
        now = time.monotonic()
        self.times[name] = now - self._t
        self._t = now
        print(f"[{name}: {self.times[name]:.1f} s] {note}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipelines", type=int, default=50)
    ap.add_argument("--days", type=float, default=28, help="simulated days, ending now")
    ap.add_argument("--warmup-days", type=float, default=14, help="days before incidents and evaluation")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--end", type=fleet.parse_end, help="when the simulated history ends: a Unix time or an ISO 8601"
                    " UTC time (default: now). The noise is drawn in time order, so a seed gives one result"
                    " only with a fixed end")
    ap.add_argument("--quick", action="store_true", help="20 pipelines, 10 days (7 warm-up)")
    ap.add_argument("--rules-dir", type=Path, default=REPO / "rules")
    ap.add_argument("--alertmanager-config", type=Path, default=REPO / "alertmanager" / "alertmanager.yml")
    ap.add_argument("--rules-rev", help="take rules/ and alertmanager/alertmanager.yml from this git revision")
    ap.add_argument("--exporter-rev", help="run the exporter of this git revision (default: --rules-rev's, so old"
                    " rules read the metrics of their own exporter; 'tree' for the working tree's)")
    ap.add_argument("--registry-features", choices=("auto", "schedule", "none"), default="auto",
                    help="schedule: write schedule:/schedule_grace: to the registry; auto: if check-config takes it")
    ap.add_argument("--incident-types", default=",".join(fleet.INCIDENT_TYPES))
    ap.add_argument("--per-type", type=int, help="incidents per type (default: scales with pipelines x days)")
    ap.add_argument("--scrape-interval", type=float, default=60.0)
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--work-dir", type=Path, help="keep the work files here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    args.exporter_src = None
    if args.quick:
        args.pipelines, args.days, args.warmup_days = 20, 10, 7
    return args


def rules_from_rev(rev: str, into: Path) -> tuple[Path, Path]:
    """rules/ and alertmanager/alertmanager.yml of a git revision, extracted into `into`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "rules", "alertmanager/alertmanager.yml"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "rules", into / "alertmanager" / "alertmanager.yml"


def schedule_features(args: argparse.Namespace, work: Path) -> bool:
    if args.registry_features == "auto":
        return feed.exporter_accepts_schedule(work, args.exporter_src)
    return args.registry_features == "schedule"


def run_exporter(sim: fleet.Fleet, rules: prom.RuleSet, work: Path, features: bool, record_start: float,
                 args: argparse.Namespace) -> tuple[Path, feed.FeedStats]:
    registry = work / "pipelines.yaml"
    feed.write_registry(sim.pipelines, registry, features)
    om = work / "scrapes.om"
    names = rules.referenced_names() | {"up", "process_start_time_seconds"}
    with feed.exporter(work, registry, args.exporter_src) as port, om.open("w") as out:
        stats = feed.feed(sim, port, record_start, args.scrape_interval, names, out, rules.sample_density_matters())
    return om, stats


def evaluate_rules(rules: prom.RuleSet, om: Path, work: Path, levels: dict[int, float], alert_start: float,
                   end: float, phases: Phases) -> list[prom.Episode]:
    server = prom.Prometheus(work)
    blocks = work / "raw-blocks"
    prom.backfill_openmetrics(om, blocks)
    server.add_blocks(blocks)
    phases.done("promtool backfill", f"{om.stat().st_size / 1e6:.0f} MB of OpenMetrics")
    for level in sorted(levels):
        with server.serving():
            n = prom.materialise_level(server, rules, level, levels[level], end, work)
        server.add_blocks(work / f"level{level}-blocks")
        phases.done(f"recording rules, level {level}", f"{n} blocks")
    episodes: list[prom.Episode] = []
    with server.serving():
        for rule in rules.alerting:
            episodes += prom.evaluate_alert(server, rule, alert_start, end)
    phases.done("alerting rules", f"{len(rules.alerting)} rules, {len(episodes)} alert episodes")
    return episodes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phases = Phases()
    with ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pipemon-detect-")))
        if args.work_dir and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        rules_dir, am_config = args.rules_dir, args.alertmanager_config
        if args.rules_rev:
            rules_dir, am_config = rules_from_rev(args.rules_rev, work)
        exporter_rev = args.exporter_rev or args.rules_rev
        if exporter_rev and exporter_rev != "tree":
            args.exporter_src = prometheus_cost_rules.exporter_at(REPO, exporter_rev, work / "exporter-rev")
        return run(args, work, rules_dir, am_config, phases)


def run(args: argparse.Namespace, work: Path, rules_dir: Path, am_config: Path, phases: Phases) -> int:
    # events in the past: the exporter rejects timestamps in its future
    end = (args.end // 60) * 60 if args.end is not None else (time.time() // 60) * 60 - 120
    types = tuple(t for t in args.incident_types.split(",") if t)
    sim = fleet.simulate_fleet(args.pipelines, args.days, args.warmup_days, args.seed, end, types, args.per_type)
    phases.done("simulate", f"{len(sim.pipelines)} pipelines, {len(sim.runs)} runs, {len(sim.incidents)} incidents,"
                f" {len(sim.traps)} traps")
    all_rules = prom.load_rules(rules_dir)
    rules = all_rules.for_alerts()
    am = notify.load_config(am_config)
    hold = max((prom.parse_duration(r.body.get("for")) + prom.parse_duration(r.body.get("keep_firing_for"))
                for r in rules.alerting), default=0.0)
    alert_start = sim.eval_start - hold - 600  # pending states settle before the evaluation starts
    levels, raw_start = prom.needed_starts(rules, alert_start)
    record_start = max(sim.start, (raw_start // 60) * 60)
    features = schedule_features(args, work)
    phases.done("rules", f"{rules_dir} ({', '.join(rules.files)}): {len(rules.recording)} of"
                f" {len(all_rules.recording)} recording rules read by alerts, in"
                f" {len(levels)} levels, {len(rules.alerting)} alerting; registry schedule fields:"
                f" {'yes' if features else 'no'}; scrapes recorded from {(sim.end - record_start) / 86400:.1f}"
                " days before the end")
    om, stats = run_exporter(sim, rules, work, features, record_start, args)
    phases.done("exporter", f"{stats.sent} events sent ({stats.accepted} accepted, {stats.duplicate} duplicate,"
                f" {stats.rejected} rejected), {stats.scrapes} scrapes, {stats.samples} samples")
    for reason, n in stats.rejections.items():
        print(f"  rejected {n}: {reason}")
    episodes = evaluate_rules(rules, om, work, levels, alert_start, sim.end, phases)
    notes = notify.Dispatcher(am, episodes).run(sim.end)
    phases.done("alertmanager model", f"{len(notes)} notifications")
    result = report.score(sim, episodes, notes, EXPECTED)
    print_report(result, sim, args, rules_dir, features)
    if args.json:
        doc = report.to_json(result) | {"args": {k: str(v) for k, v in vars(args).items()},
                                        "phases_seconds": phases.times, "feed": vars(stats),
                                        "simulated_end": end, "alertmanager_config": str(am_config),
                                        "keep_firing_for": {r.name: prom.parse_duration(r.body.get("keep_firing_for"))
                                                            for r in rules.alerting},
                                        "evaluation_interval_seconds": min(r.interval for r in rules.alerting),
                                        "alert_episodes": [vars(ep) for ep in episodes]}
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    return 0


def print_report(result: report.Report, sim: fleet.Fleet, args: argparse.Namespace, rules_dir: Path,
                 features: bool) -> None:
    types = list(EXPECTED)
    print()
    exporter = args.exporter_rev or args.rules_rev or "tree"
    print(f"rules: {args.rules_rev or rules_dir}; exporter: {exporter}; {len(sim.pipelines)} pipelines,"
          f" {args.days:g} days ({args.warmup_days:g} warm-up), seed {args.seed}; registry schedule fields:"
          f" {'yes' if features else 'no'}")
    print()
    print("\n".join(report.incident_table(result, types)))
    print()
    print("\n".join(report.false_table(result)))
    print()
    print("\n".join(report.level_shift_table(result)))
    if result.unlabelled_alerts:
        print()
        print("alerts without a pipeline label:", dict(result.unlabelled_alerts))
    print()
    print("\n".join(report.targets_table(result)))
    missed = [r for r in result.incidents if not r.detected]
    if missed:
        print()
        print("missed incidents (alerts that did fire for them):")
        for r in missed:
            print(f"  {r.label.kind:16} {r.label.pipeline:22} {r.label.detail:22} {', '.join(r.alerts) or '-'}")


if __name__ == "__main__":
    sys.exit(main())
