"""Child runs folded into their root run: what the children of a run in progress said, until the root ends.

A DAG's tasks, a dbt invocation's models, a Dagster job's steps are child runs (their events carry
`run.facets.parent`). They are not pipelines; what they say serves their root run: the rows their outputs wrote add
to its records, the names of the children that failed for good are kept with it, and children that are tracked as
pipelines of their own (opted in by the registry) and still in progress when the root ends are closed with it.

A request changes the folds through a FoldSession: it sees its own changes at once, and they are made for everyone
only once its records are stored. So an event refused, or a request answered 503 and retried, folds nothing twice
and loses nothing.

This is memory only: children seen before a restart of pipemon whose root ends after it are not folded (the root
run itself still counts). Bounded: at most MAX_ROOTS root runs in progress are remembered, oldest dropped first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

    def _existing(self, root: RootKey) -> RootFold | None:
        return self._roots.get(root)

    def _fold(self, root: RootKey, child_run_id: str) -> RootFold:
        fold = self._existing(root)
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
        fold = self._existing(root)
        if fold is not None:
            fold.tracked.pop((child_pipeline, run_id), None)

    def close(self, root: RootKey) -> RootFold | None:
        """The fold of a root run that ended, forgotten here."""
        fold = self._existing(root)
        self._roots.pop(root, None)
        return fold


class _Overlay(Folds):
    """The shared folds as one request sees them: the roots it touches are copies, changed by it alone."""

    def __init__(self, shared: Folds) -> None:
        super().__init__()
        self._shared = shared
        self._closed: set[RootKey] = set()

    def root_of(self, parent_run_id: str, top: RootKey) -> RootKey:
        own = self._root_of_child.get(parent_run_id)
        return own if own is not None else self._shared.root_of(parent_run_id, top)

    def _existing(self, root: RootKey) -> RootFold | None:
        if root not in self._roots and root not in self._closed:
            shared = self._shared._existing(root)
            if shared is not None:  # a copy, but not of its finished children: a big dbt run has thousands
                self._roots[root] = RootFold(shared.records, dict(shared.failed), dict(shared.tracked),
                                             _SetOver(shared.finished))
        return self._roots.get(root)

    def close(self, root: RootKey) -> RootFold | None:
        fold = super().close(root)
        self._closed.add(root)  # not seeded from the shared folds again
        return fold


class _SetOver(set):
    """A set over a shared one it leaves alone: what is added goes here, membership is either's."""

    def __init__(self, shared: set[str]) -> None:
        super().__init__()
        self._shared = shared

    def __contains__(self, item: object) -> bool:
        return super().__contains__(item) or item in self._shared


class FoldSession:
    """One request's changes to the folds: applied at once to the request's own view, and to the shared folds
    only by commit() (after its records are stored). rollback() to a savepoint undoes an event that was refused."""

    def __init__(self, shared: Folds) -> None:
        self._shared = shared
        self._view = _Overlay(shared)
        self._changes: list[tuple[str, tuple[Any, ...]]] = []

    def root_of(self, parent_run_id: str, top: RootKey) -> RootKey:
        return self._view.root_of(parent_run_id, top)

    def child_event(self, root: RootKey, child: str, run_id: str, event_type: str, rows: int | None,
                    final_failure: bool) -> None:
        self._change("child_event", root, child, run_id, event_type, rows, final_failure)

    def track(self, root: RootKey, child_pipeline: str, run_id: str, started: float) -> None:
        self._change("track", root, child_pipeline, run_id, started)

    def untrack(self, root: RootKey, child_pipeline: str, run_id: str) -> None:
        self._change("untrack", root, child_pipeline, run_id)

    def close(self, root: RootKey) -> RootFold | None:
        return self._change("close", root)

    def _change(self, method: str, *args: Any) -> Any:
        self._changes.append((method, args))
        return getattr(self._view, method)(*args)

    def savepoint(self) -> int:
        return len(self._changes)

    def rollback(self, savepoint: int) -> None:
        """Undo the changes made since the savepoint (the view is rebuilt from the changes kept)."""
        if savepoint == len(self._changes):
            return
        kept = self._changes[:savepoint]
        self._view, self._changes = _Overlay(self._shared), []
        for method, args in kept:
            self._change(method, *args)

    def commit(self) -> None:
        """Make this request's changes for everyone (once: a second commit changes nothing)."""
        for method, args in self._changes:
            getattr(self._shared, method)(*args)
        self._changes.clear()
        self._view = _Overlay(self._shared)
