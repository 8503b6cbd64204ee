"""The single serialized write path: apply a batch, make it durable, then make it visible.

Every state change goes through :meth:`Writer.submit`. The writer task takes all
queued jobs as one batch, applies them to the in-memory store (which records
what changed), appends those records plus the new consistent revision to the
write-ahead log as one synced record, and only then publishes the new
revision to readers and watchers and answers the callers. A job submitted
while a sync is in flight joins the next batch (group commit).

The LMDB backend receives the same ops lazily: every ``FLUSH_INTERVAL`` or
``FLUSH_OPS`` ops, in one synced transaction that also records the last log
index it holds; log segments below that index are then released. Start-up
replays the log above it (see :mod:`coord_server.wal`).

If the log or the backend fails, nothing of the batch is acknowledged and the
writer stops the server: the state on disk can no longer be trusted to match
memory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskStatus

from . import backend as be
from . import errors
from .counters import Counters
from .mvcc import Store
from .wal import Wal, WalError

log = logging.getLogger("coord_server.writer")

T = TypeVar("T")

MAX_BATCH = 1024
COMPACTION_CHUNK = 10_000
FLUSH_INTERVAL = 0.1  # seconds between backend commits while writes are pending
FLUSH_OPS = 20_000  # or sooner, when this many ops wait
# A log sync slower than this (a busy disk) sends the next lone writes' syncs to a worker thread
# instead of the event loop, so that a slow disk delays those writes but not every other request.
SLOW_SYNC = 0.02


@dataclass(eq=False)
class _Job(Generic[T]):
    fn: Callable[[], T]
    barrier: bool
    blocking: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    result: T | None = None
    error: BaseException | None = None


@dataclass
class _Compaction:
    rev: int
    keep: set[tuple[int, int]]
    cursor: bytes = b""
    done: anyio.Event = field(default_factory=anyio.Event)


PublishHook = Callable[[int], None]


class Writer:
    """Owns the store's mutations and the backend's write transactions.

    ``on_publish(rev)`` runs on the event loop after each durable commit, before
    callers are answered (the watch hub hangs off it). ``on_fatal(exc)`` is
    called once when the backend fails; the server must then stop.
    """

    def __init__(self, store: Store, backend: be.Backend, wal: Wal, counters: Counters, *, raft_index: int,
                 on_fatal: Callable[[BaseException], None]) -> None:
        self.store = store
        self.backend = backend
        self.wal = wal
        self._unflushed: list[be.Op] = []
        self._unflushed_index = 0
        self._flush_due = math.inf
        self._flushing: anyio.Event | None = None
        self._parked = False  # the writer task waits for work with nothing queued or in flight
        self._last_sync = 0.0  # seconds the newest log append + sync took
        # Requests open at the transports right now (set by the server); 0 when unknown.
        self.concurrency: Callable[[], int] = lambda: 0
        self.counters = counters
        self.visible_rev = store.rev
        self.raft_index = raft_index
        self.extra_ops: list[be.Op] = []
        self.publish_hooks: list[PublishHook] = []
        self._on_fatal = on_fatal
        self._send, self._recv = anyio.create_memory_object_stream[_Job[Any]](math.inf)
        self._carry: _Job[Any] | None = None
        self._compaction: _Compaction | None = None
        self._failed: BaseException | None = None

    # ------------------------------------------------------------------ API

    async def submit(self, fn: Callable[[], T], *, barrier: bool = False) -> T:
        """Run ``fn`` in the write path and return its result once durable and visible.

        ``fn`` runs on the event loop, alone, and may mutate the store or append
        to :attr:`extra_ops`; an :class:`~coord_server.errors.EtcdError` it raises
        is re-raised here and its changes are rolled back by the store.
        ``barrier`` jobs start a batch of their own, after every earlier write is
        visible (compaction needs that). A checkpoint. Raises STOPPED after a
        backend failure.
        """
        if self._failed is not None:
            raise errors.STOPPED
        if not barrier and self._parked and self.concurrency() <= 1 and self._last_sync < SLOW_SYNC:
            # A lone write with no other request open: apply, log and publish right here,
            # saving the hand-offs to the writer task. Under concurrency writes take the
            # queue, so that they share one sync (group commit).
            result = self._run_now(fn)
            await anyio.lowlevel.checkpoint()
            return result
        return await self._enqueue(_Job(fn, barrier))

    async def _enqueue(self, job: _Job[T]) -> T:
        self.counters.pending_writes += 1
        self._send.send_nowait(job)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _run_now(self, fn: Callable[[], T]) -> T:
        try:
            result = fn()
        except errors.EtcdError:
            raise
        except Exception as exc:  # a bug in one job must not take the writer down
            log.exception("write job failed")
            raise errors.EtcdError(errors.Code.UNKNOWN, str(exc)) from exc
        finally:
            self.raft_index += 1
        ops = self._pending_ops()
        if ops:
            started = time.perf_counter()
            try:
                index = self.wal.append(be.encode_ops(ops))
            except WalError as exc:
                self._fail(exc)
                raise errors.STOPPED from exc
            self._logged(1, ops, index, started)
            self.counters.lone_writes += 1
        self._publish()
        return result

    async def exclusive(self, fn: Callable[[], T]) -> T:
        """Run blocking ``fn`` in a worker thread with no write in flight (defragment). A checkpoint."""
        if self._failed is not None:
            raise errors.STOPPED
        return await self._enqueue(_Job(fn, True, True))

    async def wait_compaction(self) -> None:
        """Wait until the physical deletion of the last compaction is done. A checkpoint."""
        comp = self._compaction
        if comp is None:
            await anyio.lowlevel.checkpoint()
            return
        await comp.done.wait()

    def schedule_compaction(self, rev: int) -> None:
        """Queue the physical deletion for a compaction already applied to the store.

        A newer compaction supersedes one still in progress: its keep-set covers
        the older one, and the older one's waiters are released when it ends.
        """
        comp = _Compaction(rev, self.store.physical_keep(rev))
        if self._compaction is not None:
            comp.done = self._compaction.done
        self._compaction = comp

    # ------------------------------------------------------------------ loop

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    batch = await self._next_batch()
                    if batch is not None:
                        await self._process(batch)
                    if self._unflushed and self._flushing is None and (
                            batch is None or time.monotonic() >= self._flush_due or len(self._unflushed) >= FLUSH_OPS):
                        self._flushing = anyio.Event()
                        tg.start_soon(self._flush_in_background, self._take_unflushed(), self._flushing)
                    if self._compaction is not None:
                        await self._compact_step()
        except (be.BackendError, WalError) as exc:
            self._fail(exc)
        except BaseExceptionGroup as group:
            first = group.exceptions[0]
            log.error("write path failed", exc_info=first)
            self._fail(first)
        except Exception as exc:  # a bug here leaves memory and disk in an unknown relation: stop too
            log.exception("write path failed")
            self._fail(exc)

    async def _next_batch(self) -> list[_Job[Any]] | None:
        """The next batch of jobs, or None when background work (flush, compaction) is due first."""
        job = self._carry
        self._carry = None
        if job is None:
            try:
                job = self._recv.receive_nowait()
            except anyio.WouldBlock:
                if self._compaction is not None:
                    return None
                # Wake at least every FLUSH_INTERVAL: fast-path writes add unflushed ops meanwhile.
                wait = self._flush_due - time.monotonic() if self._unflushed else FLUSH_INTERVAL
                self._parked = True
                try:
                    with anyio.move_on_after(wait):
                        job = await self._recv.receive()
                finally:
                    self._parked = False
                if job is None:
                    return None
        batch = [job]
        if job.barrier:
            return batch
        while len(batch) < MAX_BATCH:
            try:
                nxt = self._recv.receive_nowait()
            except anyio.WouldBlock:
                break
            if nxt.barrier:
                self._carry = nxt
                break
            batch.append(nxt)
        return batch

    def _take_unflushed(self) -> tuple[list[be.Op], int]:
        ops, index = self._unflushed, self._unflushed_index
        ops.append((b"meta", be.WAL_INDEX, be.pack_i64(index)))
        self._unflushed = []
        self._flush_due = math.inf
        return ops, index

    async def _flush_ops(self, ops: list[be.Op], index: int) -> None:
        await anyio.to_thread.run_sync(self.backend.commit, ops)
        await anyio.to_thread.run_sync(self.wal.release, index)

    async def _flush_in_background(self, batch: tuple[list[be.Op], int], done: anyio.Event) -> None:
        # Runs beside the log appends: LMDB commits are off the acknowledgement path.
        try:
            await self._flush_ops(*batch)
        finally:
            self._flushing = None
            done.set()

    async def flush(self) -> None:
        """Wait for a background flush, then commit what is still unflushed. A checkpoint."""
        if self._flushing is not None:
            await self._flushing.wait()
        if self._unflushed:
            await self._flush_ops(*self._take_unflushed())
        else:
            await anyio.lowlevel.checkpoint()

    async def _process(self, batch: list[_Job[Any]]) -> None:
        if batch[0].barrier:
            # Compaction and exclusive backend work see every earlier write in the backend.
            await self.flush()
        try:
            for job in batch:
                try:
                    if job.blocking:
                        job.result = await anyio.to_thread.run_sync(job.fn)
                    else:
                        job.result = job.fn()
                except errors.EtcdError as exc:
                    job.error = exc
                except (be.BackendError, WalError):
                    raise
                except Exception as exc:  # a bug in one job must not take the writer down
                    log.exception("write job failed")
                    job.error = errors.EtcdError(errors.Code.UNKNOWN, str(exc))
            self.raft_index += len(batch)
            ops = self._pending_ops()
            if ops:
                payload = be.encode_ops(ops)
                started = time.perf_counter()
                if len(batch) == 1 and self._idle() and self._last_sync < SLOW_SYNC:
                    # A lone write under light load: syncing on the loop saves the ~100 us thread
                    # hand-off, and there is nothing else the loop could overlap with the sync.
                    index = self.wal.append(payload)
                else:
                    index = await anyio.to_thread.run_sync(self.wal.append, payload)
                self._logged(len(batch), ops, index, started)
        except BaseException:
            for job in batch:
                job.error = errors.STOPPED
                job.done.set()
            self.counters.pending_writes -= len(batch)
            raise
        self._publish()
        self.counters.pending_writes -= len(batch)
        for job in batch:
            job.done.set()

    def _pending_ops(self) -> list[be.Op]:
        """The backend ops for everything applied since the last call (empty if nothing changed)."""
        store = self.store
        ops: list[be.Op] = [(b"key", r.backend_key(), r.backend_value()) for r in store.take_pending()]
        ops.extend(self.extra_ops)
        self.extra_ops = []
        if ops:
            ops.append((b"meta", be.CONSISTENT_REV, be.pack_i64(store.rev)))
            ops.append((b"meta", be.CONSISTENT_INDEX, be.pack_i64(self.raft_index)))
        return ops

    def _logged(self, jobs: int, ops: list[be.Op], index: int, started: float) -> None:
        self._last_sync = time.perf_counter() - started
        self.counters.observe_commit(jobs, len(ops), self._last_sync)
        if not self._unflushed:
            self._flush_due = time.monotonic() + FLUSH_INTERVAL
        self._unflushed.extend(ops)
        self._unflushed_index = index

    def _publish(self) -> None:
        """Make the applied revision visible: reads, then watchers (hooks)."""
        self.visible_rev = self.store.rev
        for hook in self.publish_hooks:
            hook(self.store.rev)

    def _idle(self) -> bool:
        return self._carry is None and self._recv.statistics().current_buffer_used == 0

    async def _compact_step(self) -> None:
        comp = self._compaction
        if comp is None:
            return
        # Deletions go straight to the backend, so it must already hold the compaction itself.
        await self.flush()
        cursor = await anyio.to_thread.run_sync(
            self.backend.delete_compacted, comp.rev, comp.keep, comp.cursor, COMPACTION_CHUNK)
        if cursor is not None:
            comp.cursor = cursor
            return
        await anyio.to_thread.run_sync(
            self.backend.commit, [(b"meta", be.FINISHED_COMPACT, be.pack_i64(comp.rev))])
        self._compaction = None
        comp.done.set()

    def close(self) -> None:
        """Fail every queued job with STOPPED, release the queue, and (after a clean run) flush.

        Blocking; called at shutdown. Flushing is only a courtesy: the log already holds
        every acknowledged write.
        """
        if self._failed is None:
            self._failed = errors.STOPPED
            if self._unflushed:
                ops, index = self._take_unflushed()
                try:
                    self.backend.commit(ops)
                    self.wal.release(index)
                except (be.BackendError, OSError) as exc:
                    log.error("final flush failed (the log still holds the writes): %s", exc)
        self._fail_queued()
        self._send.close()
        self._recv.close()

    def _fail_queued(self) -> None:
        jobs = [] if self._carry is None else [self._carry]
        self._carry = None
        while True:
            try:
                jobs.append(self._recv.receive_nowait())
            except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.EndOfStream):
                break
        for job in jobs:
            job.error = errors.STOPPED
            job.done.set()
        self.counters.pending_writes -= len(jobs)

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        log.critical("backend failure, stopping: %s", exc)
        self._fail_queued()
        self._on_fatal(exc)
