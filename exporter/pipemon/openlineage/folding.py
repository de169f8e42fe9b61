"""Child runs folded into their root run: what the children of a run in progress said, until the root ends.

A DAG's tasks, a dbt invocation's models, a Dagster job's steps are child runs (their events carry
`run.facets.parent`). They are not pipelines; what they say serves their root run: the rows their outputs wrote add
to its records, the names of the children that failed for good are kept with it, and children that are tracked as
pipelines of their own (opted in by the registry) and still in progress when the root ends are closed with it.

A request uses the folds through a FoldSession: a root run's fold is forgotten only once the root's finish is
stored, so a finish refused or answered 503 and retried loses nothing, and a child event retried adds nothing twice.

This is memory only: children seen before a restart of pipemon whose root ends after it are not folded (the root
run itself still counts). Bounded: at most MAX_ROOTS root runs in progress are remembered, oldest dropped first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RootKey = tuple[str, str]  # (root pipeline, root run id)
MAX_ROOTS = 10_000
MAX_CHILD_RUNS = 100_000
MAX_FAILED_NAMES = 20  # failed children kept per root run (the API shows them, no label carries them)


@dataclass
class RootFold:
    """What the children of one root run said so far."""

    records: int | None = None
    failed: dict[str, None] = field(default_factory=dict)  # ordered set of child job names
    tracked: dict[tuple[str, str], float] = field(default_factory=dict)  # (child pipeline, run id) -> start
    finished: set[str] = field(default_factory=set)  # child run ids whose terminal event was folded


class Folds:
    """The folds of all root runs in progress, and which root each child run belongs to."""

    def __init__(self) -> None:
        self._roots: dict[RootKey, RootFold] = {}
        self._root_of_child: dict[str, RootKey] = {}  # child run id -> its root (nested children: dbt SQL)

    def __len__(self) -> int:
        return len(self._roots)

    def root_of(self, parent_run_id: str, top: RootKey) -> RootKey:
        """The root of a child whose direct parent is `parent_run_id`: a known child run's root (a grandchild
        without a `root` facet), else `top` as the facets say."""
        return self._root_of_child.get(parent_run_id, top)

    def get(self, root: RootKey) -> RootFold | None:
        """The fold of a root run in progress, if its children said anything."""
        return self._roots.get(root)

    def _fold(self, root: RootKey, child_run_id: str) -> RootFold:
        fold = self._roots.get(root)
        if fold is None:
            if len(self._roots) >= MAX_ROOTS:
                del self._roots[next(iter(self._roots))]
            fold = self._roots[root] = RootFold()
        if child_run_id not in self._root_of_child:
            if len(self._root_of_child) >= MAX_CHILD_RUNS:
                del self._root_of_child[next(iter(self._root_of_child))]
            self._root_of_child[child_run_id] = root
        return fold

    def child_event(self, root: RootKey, child: str, run_id: str, event_type: str, rows: int | None,
                    final_failure: bool) -> None:
        """Fold one child event. A repeated terminal event of the same child run changes nothing."""
        fold = self._fold(root, run_id)
        if event_type not in ("COMPLETE", "FAIL", "ABORT") or run_id in fold.finished:
            return
        fold.finished.add(run_id)
        if rows is not None:
            fold.records = (fold.records or 0) + rows
        if event_type == "COMPLETE":
            fold.failed.pop(child, None)  # retried (or cleared and re-run) to success
        elif final_failure and len(fold.failed) < MAX_FAILED_NAMES:
            fold.failed[child] = None

    def track(self, root: RootKey, child_pipeline: str, run_id: str, started: float) -> None:
        self._fold(root, run_id).tracked[(child_pipeline, run_id)] = started

    def untrack(self, root: RootKey, child_pipeline: str, run_id: str) -> None:
        fold = self._roots.get(root)
        if fold is not None:
            fold.tracked.pop((child_pipeline, run_id), None)

    def close(self, root: RootKey) -> RootFold | None:
        """The fold of a root run that ended, forgotten here."""
        return self._roots.pop(root, None)


class FoldSession:
    """One request's use of the folds. Child events change the shared folds at once, so a concurrent request's
    root finish sees them (a terminal child event counts once by its run id: a retried request adds nothing
    twice). A root's fold is only read by its finish and forgotten by commit(), once the request's records are
    stored: a root finish refused (rollback to a savepoint) or answered 503 (no commit) keeps it for the retry."""

    def __init__(self, shared: Folds) -> None:
        self._shared = shared
        self._closing: list[RootKey] = []

    def root_of(self, parent_run_id: str, top: RootKey) -> RootKey:
        return self._shared.root_of(parent_run_id, top)

    def child_event(self, root: RootKey, child: str, run_id: str, event_type: str, rows: int | None,
                    final_failure: bool) -> None:
        self._shared.child_event(root, child, run_id, event_type, rows, final_failure)

    def track(self, root: RootKey, child_pipeline: str, run_id: str, started: float) -> None:
        self._shared.track(root, child_pipeline, run_id, started)

    def untrack(self, root: RootKey, child_pipeline: str, run_id: str) -> None:
        self._shared.untrack(root, child_pipeline, run_id)

    def close(self, root: RootKey) -> RootFold | None:
        """The fold of a root run that ended; forgotten at commit()."""
        self._closing.append(root)
        return self._shared.get(root)

    def savepoint(self) -> int:
        return len(self._closing)

    def rollback(self, savepoint: int) -> None:
        """The roots closed since the savepoint stay open (their finish was refused)."""
        del self._closing[savepoint:]

    def commit(self) -> None:
        for root in self._closing:
            self._shared.close(root)
        self._closing.clear()
