"""The write path: records are committed to storage in groups, then applied to the in-memory state.

Handlers submit records and wait; one writer task drains everything queued meanwhile into a single
transaction (group commit), so durability costs one commit per group, not per event. State changes only
after the commit succeeds: a failed write leaves memory and disk as they were, and the caller answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec

from pipemon.backends import Loaded, LogGap, Row, StateBackend, StorageError
from pipemon.backends.sqlite import state_path
from pipemon.model.events import RECORD_DECODER, RECORD_ENCODER, Abandon, Forget, Record
from pipemon.model.recent import RECENT_RUNS
from pipemon.model.registry import PipelineSpec, Registry
from pipemon.model.state import Pipelines, PipelineState, Snapshot
from pipemon.service.selfmetrics import ExporterMetrics

log = logging.getLogger("pipemon.service.recorder")
SNAPSHOT_DECODER = msgspec.msgpack.Decoder(Snapshot)
CHECKPOINT_CHUNK = 200  # snapshots encoded between two yields to the event loop
CHECKPOINT_WRITE_CHUNK = 500  # snapshots per transaction: log appends wait for one chunk at most
GROUP_DECODER = msgspec.msgpack.Decoder(list[Record])
FOLLOW_POLL_SECONDS = 2.0  # a replica catches up at least this often, notifications or not


def decode_log_row(blob: bytes) -> list[Record]:
    """The records of one log row: a committed group, or one record (the format before groups)."""
    try:
        return GROUP_DECODER.decode(blob)
    except msgspec.DecodeError:
        return [RECORD_DECODER.decode(blob)]


@dataclasses.dataclass(frozen=True)
class RecorderSettings:
    baseline_size: int = 30
    history_size: int = 336
    dedup_window: int = 1000
    recent_runs: int = RECENT_RUNS  # runs of any outcome kept per pipeline for the web UI
    checkpoint_interval: float = 10.0  # seconds between checkpoints while records arrive
    checkpoint_records: int = 500_000  # or after this many records, whichever comes first (bounds the replay)
    sweep_interval: float = 30.0  # how often to look for abandoned runs
    abandon_after_factor: float = 3.0  # a run in progress this many max runtimes (in the data's time) is abandoned


@dataclasses.dataclass(eq=False)
class _Submission:
    records: list[Record]
    done: asyncio.Future[list[str]]


@dataclasses.dataclass
class _Checkpoint:
    upto: int  # the log up to here is held by snapshots (this one's or earlier ones)
    snapshots: list[tuple[str, int, bytes]]  # (pipeline, the log position it holds, snapshot)
    dirty: set[str]
    forgotten: set[str]




class Recorder:
    def __init__(self, registry: Registry, storage: StateBackend, metrics: ExporterMetrics,
                 settings: RecorderSettings = RecorderSettings(), clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.storage = storage
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.pipelines = Pipelines(settings.baseline_size, settings.dedup_window, settings.history_size,
                                   settings.recent_runs)
        # Submissions wait in a plain list; the writer takes all of them at once (a group commit).
        self._pending: list[_Submission] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._applied_seq = 0  # the log sequence of the last group applied to `pipelines`
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipemon-storage")
        self._tasks: list[asyncio.Task[None]] = []
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        # Applying is serialised: the writer's own groups and other writers' rows go in log order.
        self._apply_lock = asyncio.Lock()
        self._follow = asyncio.Event()
        self._truncate_next = 0  # shared log: truncated one checkpoint late, so slow replicas need no reload

    # ---- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        loaded = await self._in_thread(self.storage.open)
        self._restore(loaded)
        self._add_registered()
        self._tasks = [asyncio.create_task(self._write_loop(), name="pipemon-writer"),
                       asyncio.create_task(self._sweep_loop(), name="pipemon-sweeper")]
        if self.storage.shared:
            loop = asyncio.get_running_loop()
            self.storage.watch(lambda seq: loop.call_soon_threadsafe(self._notified, seq))
            self._tasks.append(asyncio.create_task(self._follow_loop(), name="pipemon-follower"))
        log.info("state loaded: %d pipelines (%d snapshots, %d log records replayed)",
                 len(self.pipelines), len(loaded.snapshots), len(loaded.records))

    async def close(self) -> None:
        """Finish every queued write, checkpoint and close. The writer is stopped by a flag, never
        cancelled, so a group that is committed is always applied before the checkpoint empties the log."""
        writer, sweeper, *follower = self._tasks
        for task in (sweeper, *follower):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._stopping = True
        self._wake.set()
        await writer
        if self._checkpoint_task is not None:
            await self._checkpoint_task
        if await self._in_thread(self.storage.try_lead):
            await self._checkpoint()  # a failure is logged; the log still holds every acknowledged record
        await self._in_thread(self.storage.close)
        self._thread.shutdown(wait=True)

    def _restore(self, loaded: Loaded) -> None:
        covers: dict[str, int] = {}  # pipeline -> the last log sequence its snapshot holds
        for name, blob in loaded.snapshots:
            try:
                snap = SNAPSHOT_DECODER.decode(blob)
            except msgspec.DecodeError as exc:
                log.error("checkpoint of pipeline %r is unreadable (%s): it starts from zero", name, exc)
                continue
            state = PipelineState.restore(snap, self.spec_for(name, snap.team), self.settings.baseline_size,
                                          self.settings.history_size, self.settings.recent_runs)
            state.team = state.spec.team  # the registry may have moved the pipeline meanwhile
            self.pipelines.by_name[name] = state
            covers[name] = snap.covers_seq
        for seq, blob in loaded.records:
            try:
                rows = decode_log_row(blob)
            except msgspec.DecodeError as exc:
                log.error("skipping an unreadable record of the log (%s)", exc)
                continue
            for record in rows:
                if covers.get(record.pipeline, 0) < seq:  # else its snapshot holds it already
                    self._apply(record)
        self._applied_seq = max([seq for seq, _ in loaded.records] + list(covers.values()) + [loaded.floor])
        self.pipelines.dirty.clear()
        self.pipelines.dirty.update(self.pipelines.by_name)  # the next checkpoint folds the replayed log

    async def _reload(self) -> None:
        """Start over from the checkpoints: the log was truncated past what this replica applied (it stalled
        for longer than a checkpoint interval). The whole state is swapped with no await in between."""
        loaded = await self._in_thread(self.storage.open)
        log.warning("the log moved past this replica's position %d: state reloaded from the checkpoints",
                    self._applied_seq)
        self.pipelines.by_name.clear()
        self.pipelines.forgotten.clear()
        self._restore(loaded)
        self._add_registered()

    def _add_registered(self) -> None:
        for spec in self.registry.registered_specs():
            self.pipelines.ensure(spec)

    # ---- registry ------------------------------------------------------------------------------------

    def spec_for(self, name: str, team: str | None) -> PipelineSpec:
        """The registry's spec for a pipeline; an unlisted one keeps the team its events named."""
        spec = self.registry.lookup(name) or self.registry.default_spec(name)
        if not spec.registered and team:
            spec = dataclasses.replace(spec, team=team)
        return spec

    def set_registry(self, registry: Registry) -> None:
        """Swap in a reloaded registry; counters and baselines stay, teams and expectations follow it."""
        self.registry = registry
        for state in list(self.pipelines):
            spec = self.spec_for(state.name, None if state.spec.registered else state.team)
            never_ran = not (state.runs_success or state.runs_failure or state.in_progress)
            if not spec.registered and state.spec.registered and never_ran:
                self.pipelines.forget(state.name)  # only ever a placeholder of the old registry
                continue
            state.spec, state.team = spec, spec.team
            state.version += 1
            self.pipelines.dirty.add(state.name)
        self._add_registered()

    # ---- writing -------------------------------------------------------------------------------------

    async def submit(self, records: list[Record]) -> list[str]:
        """Commit and apply records; returns "accepted"/"duplicate" per record or raises StorageError."""
        done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Submission(records, done))
        self._wake.set()
        return await done

    async def _write_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.checkpoint_interval)
            self._wake.clear()
            group, self._pending = self._pending, []
            if group:
                try:
                    await self._commit_group(group)
                except Exception:  # a bug must not stop the writer: every later request would hang
                    log.exception("unexpected error while committing %d submissions", len(group))
                    for sub in group:
                        if not sub.done.done():
                            sub.done.set_exception(StorageError("internal error while storing; see the log"))
            if self._stopping and not self._pending:
                return  # close() takes the final checkpoint
            await self._maybe_checkpoint()

    async def _commit_group(self, group: list[_Submission]) -> None:
        # The whole group is one row of the log (a msgpack array of records): one insert per commit.
        records = [r for sub in group for r in sub.records]
        blob = RECORD_ENCODER.encode(records)
        async with self._apply_lock:
            started = time.perf_counter()
            try:
                seq, earlier = await self._append(blob)
            except StorageError as exc:
                self.metrics.storage_errors.inc()
                log.error("could not store %d records: %s", len(records), exc)
                for sub in group:
                    if not sub.done.done():
                        sub.done.set_exception(StorageError(str(exc)))
                return
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            self._since_checkpoint += len(records)
            self._apply_rows(earlier)  # other replicas' rows that committed before this group
            self._applied_seq = seq  # applied right below, with no await in between
            reverted = self.pipelines.reverted
            for sub in group:
                outcomes = [self._apply(r) for r in sub.records]
                if not sub.done.done():
                    sub.done.set_result(outcomes)
            self._count_reverted(reverted)

    async def _append(self, blob: bytes) -> tuple[int, list[Row]]:
        try:
            return await self._in_thread(self.storage.append, blob, self._applied_seq)
        except LogGap:  # nothing was written: reload from the checkpoints and try once more
            await self._reload()
            return await self._in_thread(self.storage.append, blob, self._applied_seq)

    def _apply(self, record: Record) -> str:
        outcome = self.pipelines.apply(record, self.spec_for)
        if isinstance(record, Forget) and outcome == "accepted":
            spec = self.registry.lookup(record.pipeline)
            if spec is not None and spec.registered:
                self.pipelines.ensure(spec)  # a registered pipeline starts again from zero, on every replica
        return outcome

    def _apply_rows(self, rows: list[Row]) -> None:
        """Apply committed log rows (of other writers) in order; never one at or below `_applied_seq`."""
        reverted = self.pipelines.reverted
        for seq, blob in rows:
            if seq <= self._applied_seq:
                continue
            try:
                records = decode_log_row(blob)
            except msgspec.DecodeError as exc:
                log.error("skipping an unreadable record of the log at %d (%s)", seq, exc)
                records = []
            for record in records:
                self._apply(record)
            self._applied_seq = seq
            self._since_checkpoint += len(records)
        self._count_reverted(reverted)

    def _count_reverted(self, before: int) -> None:
        if self.pipelines.reverted != before:
            self.metrics.abandonment_reverted.inc(self.pipelines.reverted - before)

    # ---- following the shared log ------------------------------------------------------------------

    @property
    def applied_seq(self) -> int:
        """The log position the state holds."""
        return self._applied_seq

    async def catch_up(self) -> bool:
        """Apply everything committed to the log up to now (other replicas' rows); False when the database
        cannot be read, and the state stays what it was. A no-op for an unshared backend."""
        if not self.storage.shared:
            return True
        async with self._apply_lock:
            try:
                rows = await self._read_log()
            except StorageError:  # the connection may have been cut: once more, on a fresh one
                try:
                    rows = await self._read_log()
                except StorageError as exc:
                    log.warning("cannot catch up with the log, serving the state at position %d: %s",
                                self._applied_seq, exc)
                    return False
            self._apply_rows(rows)
            return True

    async def _read_log(self) -> list[Row]:
        """The log's rows after the position applied; the checkpoints first when the log was truncated past it."""
        try:
            return await self._in_thread(self.storage.read_since, self._applied_seq)
        except LogGap:
            await self._reload()
            return await self._in_thread(self.storage.read_since, self._applied_seq)

    def _notified(self, seq: int) -> None:
        if seq == 0 or seq > self._applied_seq:
            self._follow.set()

    async def _follow_loop(self) -> None:
        """Catch up as soon as another replica commits (NOTIFY), and every few seconds in case a notification
        was lost while the listening connection was down."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._follow.wait(), FOLLOW_POLL_SECONDS)
            self._follow.clear()
            try:
                await self.catch_up()
            except Exception:  # a bug must not stop following
                log.exception("unexpected error while catching up with the log")
                await asyncio.sleep(FOLLOW_POLL_SECONDS)

    async def _maybe_checkpoint(self) -> None:
        if self._checkpoint_task is not None and not self._checkpoint_task.done():
            return  # one at a time
        due = time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_interval
        changed = self._since_checkpoint or self.pipelines.dirty or self.pipelines.forgotten
        if self._since_checkpoint >= self.settings.checkpoint_records or (due and changed):
            # In the background: groups keep committing while it is encoded and between its transactions.
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
            self._checkpoint_task = asyncio.create_task(self._checkpoint_if_leading())

    async def _checkpoint_if_leading(self) -> None:
        """Checkpoints run on one replica: the others keep their changed sets (a superset of what the leader
        folds), so whichever takes over later checkpoints everything it must."""
        if await self._in_thread(self.storage.try_lead):
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        await self._write_checkpoint(await self._take_checkpoint())

    async def _take_checkpoint(self) -> _Checkpoint:
        """Encode the changed pipelines. Groups are applied right after their commit with no await between,
        so at every await here the state holds exactly the log up to `_applied_seq`: each snapshot records
        the sequence it holds, and the log can go up to where the changed set was taken."""
        pipelines = self.pipelines
        dirty, pipelines.dirty = pipelines.dirty, set()
        forgotten, pipelines.forgotten = pipelines.forgotten, set()
        upto = self._applied_seq
        snapshots = []
        for count, name in enumerate(dirty, 1):
            state = pipelines.by_name.get(name)
            if state is not None:
                covers = self._applied_seq
                snapshots.append((name, covers, msgspec.msgpack.encode(state.snapshot(covers))))
            if count % CHECKPOINT_CHUNK == 0:
                await asyncio.sleep(0)  # thousands of snapshots must not stall the event loop in one go
        return _Checkpoint(upto, snapshots, dirty, forgotten)

    async def _write_checkpoint(self, checkpoint: _Checkpoint) -> None:
        try:
            await self._in_thread(self.storage.delete_pipelines, sorted(checkpoint.forgotten), checkpoint.upto)
            for start in range(0, len(checkpoint.snapshots), CHECKPOINT_WRITE_CHUNK):
                chunk = checkpoint.snapshots[start:start + CHECKPOINT_WRITE_CHUNK]
                await self._in_thread(self.storage.write_snapshots, chunk)
            # A shared log is truncated one checkpoint late: a replica a little behind still finds its
            # next rows there instead of reloading everything.
            upto = self._truncate_next if self.storage.shared else checkpoint.upto
            self._truncate_next = checkpoint.upto
            if upto:
                await self._in_thread(self.storage.truncate_log, upto)
        except StorageError as exc:
            self.metrics.storage_errors.inc()
            log.error("checkpoint failed, the next one retries (the log keeps every record): %s", exc)
            self.pipelines.dirty |= checkpoint.dirty & self.pipelines.by_name.keys()
            self.pipelines.forgotten |= checkpoint.forgotten - self.pipelines.by_name.keys()

    # ---- abandoned runs ------------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            if not await self._in_thread(self.storage.try_lead):
                continue  # another replica sweeps; its abandonments reach this one through the log
            abandoned = self.find_abandoned(self.clock())
            if not abandoned:
                continue
            try:
                outcomes = await self.submit(abandoned)
            except StorageError:
                continue  # counted by the writer; retried at the next sweep
            self.metrics.abandoned.inc(outcomes.count("accepted"))

    def find_abandoned(self, now: float) -> list[Record]:
        """Abandon records for the runs whose finish can no longer be expected (PipelineState.overdue), each
        at its own start time: the log then replays the same abandonment whatever the clock says."""
        factor = self.settings.abandon_after_factor
        return [
            Abandon(state.name, run_id, started)
            for state in self.pipelines if state.in_progress
            for run_id, started in state.overdue(now, factor * state.spec.max_runtime_seconds)
        ]

    async def _in_thread(self, fn: Callable, *args: object):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)


__all__ = ["Recorder", "RecorderSettings", "state_path"]
