"""Locks and elections: the revision-ordered queue of etcd's concurrency recipes, run by the client.

Key layout and order are those of etcd's Mutex/Election (and so of ``etcdctl lock`` / ``etcdctl elect``): each
waiter writes ``<name>/<lease hex>`` attached to its session's lease, in a txn guarded by ``create_revision ==
0``; its place in the queue is that key's create revision. It waits only for the deletion of its immediate
predecessor (the key with the largest create revision below its own), so hand-off is FIFO and wakes one waiter
(no thundering herd). When the predecessor is gone it reads the queue again, at the revision of the deletion:
an older key may still be there (the predecessor gave up waiting), and its own key must still be there — if
the lease expired while it waited, acquiring fails (etcd #11456).

Per hand-off the wire work is kept to what the algorithm needs:

* the enqueue txn also reads the two newest keys by create revision, the own key and its predecessor, so a
  waiter learns whom to wait for without a second call;
* every watch runs on the client's one multiplexed watch stream (see ``_watch``), and the watchers of a
  session's place — on its own key, on its predecessor — are kept for the session's next turn in the same
  queue (a hot lock costs no watch create/cancel per hand-off);
* the release txn also reads the oldest key left, i.e. the next owner. If that is a waiter of the same client,
  it is told at once and skips its own read; a waiter whose predecessor belongs to the same client follows that
  place's own-key watcher instead of watching the key a second time.

From the write of the own key until its removal, a place is watched: its own key (deletion = loss) and its
session (a callback, no task). A loss cancels the wait, or the body of ``async with``, which then raises
LockLost / LeadershipLost. Cancellation cannot recall side effects already sent, so the lock also exposes a
fencing token (the key's create revision) and an ``is_owner()`` compare for txns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _errors as errors
from ._pb import rpc_pb2
from ._session import Session, lock_key
from ._transport import CLOSE_BOUND
from ._txn import Compare, Delete, Get, Put, _op_pb, txn_request
from ._types import (
    EventType,
    Key,
    KeyValue,
    RangeResult,
    SortOrder,
    SortTarget,
    WatchBatch,
    WatchFilter,
    show_key,
    to_bytes,
)
from ._watch import _KeyWatcher

if TYPE_CHECKING:
    from ._client import Background, Client
    from ._watch import _WatchHub

log = logging.getLogger("coord")


_NO_PUT = (WatchFilter.NO_PUT.value,)


class _Place:
    """The watchers of a session's place in one queue: one on the own key, one on the latest predecessor.

    They outlive one acquisition: a session that takes the same lock again — a hot lock, workers in a loop —
    finds its own key and, as long as the queue keeps its order, its predecessor already watched, so a hand-off
    costs no watch create or cancel. Both watch deletions only (NOPUT) and are reused only when they cover the
    revisions the algorithm needs (they started no later than the revision read + 1). A session keeps at most
    ``PLACE_CACHE`` idle places, for at most ``PLACE_LINGER`` seconds (see ``_session``), and drops them all
    when it ends.

    When the predecessor is itself a place of this client, its own-key watcher already sees the deletion we
    wait for: the place follows that watcher instead of watching the same key a second time.
    """

    def __init__(self, session: Session, key: bytes) -> None:
        self.session = session
        self.key = key
        self.owner: _Queued | None = None
        self.idle_since = 0.0
        self.closed = False
        self.own: _KeyWatcher | None = None
        self.own_start = 0
        self.own_deleted = 0  # the latest deletion of the own key it saw
        self.followers: set[_Place] = set()  # places of this client waiting for the own key's deletion
        self.pred: _KeyWatcher | None = None
        self.pred_key = b""
        self.pred_start = 0
        self.pred_deleted = 0  # the latest deletion of the predecessor's key it saw
        self.pred_error: BaseException | None = None
        self.pred_signal = anyio.Event()
        self.head_at = 0  # a revision at which the own key (this incarnation) was the oldest: the lock is ours

    def _hub(self) -> _WatchHub:
        return self.session.client._watch_hub()

    # -- own key ------------------------------------------------------------------------------------
    def watch_own(self, after: int) -> None:
        """Make sure the own key's deletions after revision ``after`` are seen."""
        if self.own is not None and self.own_start <= after + 1:
            return
        self._drop(self.own)
        self.own = _KeyWatcher(self.key, after + 1, self._own_batch, self._own_error, filters=_NO_PUT)
        self.own_start, self.own_deleted = after + 1, 0
        self._hub().add(self.own)
        self._tell_followers()

    def covers(self, after: int) -> bool:
        """Whether the own-key watcher sees every deletion of the own key after revision ``after``."""
        return self.own is not None and self.own_start <= after + 1

    def _tell_followers(self) -> None:
        for f in self.followers:
            f.pred_signal.set()

    def _own_batch(self, w: _KeyWatcher, batch: WatchBatch) -> None:
        if w is not self.own or not _deletes(batch):
            return
        self.own_deleted = max(self.own_deleted, batch.revision)
        self._tell_followers()
        if self.owner is not None:
            self.owner._check_own_key()

    def _own_error(self, w: _KeyWatcher, exc: BaseException) -> None:
        if w is self.own:
            self.own = None
            self._tell_followers()
            if self.owner is not None:
                self.owner._monitor_failed(exc)

    # -- predecessor --------------------------------------------------------------------------------
    async def wait_deleted(self, key: bytes, after: int) -> int:
        """Wait until ``key`` (which existed at revision ``after``) is deleted, or the own key is known to be
        the oldest (:attr:`head_at`); the revision of a deletion after ``after`` (0 if the history from there
        was compacted — read the queue again — or if :attr:`head_at` was set). A checkpoint."""
        places: dict[bytes, _Place] = self.session.client._queue_places
        following: _Place | None = None
        try:
            while not self.head_at:
                src = places.get(key)
                if src is not None and src is not self and src.covers(after):
                    if src is not following:
                        self._drop(self.pred)
                        self.pred, self.pred_key = None, b""
                        if following is not None:
                            following.followers.discard(self)
                        following = src
                        src.followers.add(self)
                    if src.own_deleted > after:
                        return src.own_deleted
                else:
                    if following is not None:
                        following.followers.discard(self)
                        following = None
                    if (self.pred_key != key or self.pred_start > after + 1
                            or (self.pred is None and self.pred_error is None)):
                        self._drop(self.pred)
                        self.pred = _KeyWatcher(key, after + 1, self._pred_batch, self._pred_error, filters=_NO_PUT)
                        self.pred_key, self.pred_start, self.pred_deleted, self.pred_error = key, after + 1, 0, None
                        self._hub().add(self.pred)
                    if self.pred_deleted > after:
                        return self.pred_deleted
                    if self.pred is None:
                        exc = self.pred_error
                        if isinstance(exc, errors.Compacted):
                            return 0
                        assert exc is not None
                        raise exc
                self.pred_signal = anyio.Event()
                await self.pred_signal.wait()
            return 0
        finally:
            if following is not None:
                following.followers.discard(self)

    def _pred_batch(self, w: _KeyWatcher, batch: WatchBatch) -> None:
        if w is self.pred and _deletes(batch):
            self.pred_deleted = max(self.pred_deleted, batch.revision)
            self.pred_signal.set()

    def _pred_error(self, w: _KeyWatcher, exc: BaseException) -> None:
        if w is self.pred:
            self.pred = None
            self.pred_error = exc
            self.pred_signal.set()

    # -- lifetime -----------------------------------------------------------------------------------
    def _drop(self, w: _KeyWatcher | None) -> None:
        if w is not None and w.hub is not None:
            w.hub.remove(w)

    def close(self) -> None:
        """Remove both watchers and leave the client's registry (never raises)."""
        self.closed = True
        places: dict[bytes, _Place] = self.session.client._queue_places
        if places.get(self.key) is self:
            del places[self.key]
        own, pred, self.own, self.pred = self.own, self.pred, None, None
        self._drop(own)
        self._drop(pred)
        self._tell_followers()


def _deletes(batch: WatchBatch) -> bool:
    return any(ev.type is EventType.DELETE for ev in batch.events)


def _take_place(session: Session, key: bytes, owner: _Queued) -> _Place:
    places: dict[bytes, _Place] = session._places
    place = places.pop(key, None)
    if place is None:
        place = _Place(session, key)
        session.client._queue_places[key] = place
    places[key] = place  # most recently used last
    place.owner = owner
    return place


def _leave_place(place: _Place) -> None:
    place.owner = None
    place.idle_since = anyio.current_time()
    place.session._sweep_places()


class _Queued:
    """A place in a revision-ordered queue, held by a session; the shared part of Lock and Term.

    From the moment its key is written until it is removed, a place is watched: its own key on the client's
    shared watch stream, and its session by a callback. Losing either — the key deleted, the session lost —
    cancels whatever waits or runs under the place (the wait for the predecessors, then the body), so a waiter
    whose key vanished stops waiting at once, and a holder's body is cut short.
    """

    _lost_error: type[errors.CoordError] = errors.LockLost
    _what = "lock"

    def __init__(self, session: Session, name: Key) -> None:
        self.session = session
        self.name = to_bytes(name)
        self.prefix, self.key = lock_key(self.name, session.lease_id)
        self.revision = 0
        """Create revision of the own key: the fencing token (0 until acquired)."""
        self.acquired_revision = 0
        """The store revision at which the place became first in the queue (the predecessor's deletion, or the
        own key's creation when the queue was empty): etcdctl's ETCD_LOCK_REV. 0 until acquired."""
        self._held = False
        self._lost_reason: str | None = None
        self._scope: anyio.CancelScope | None = None  # cancelled on loss: the wait, then the body
        self._body: anyio.CancelScope | None = None
        self._place: _Place | None = None  # between the start of an acquisition and the cleanup
        self._forget_session: Callable[[], None] | None = None
        self._recheck: Background | None = None
        self._enqueue_pb: tuple[bytes, Any] | None = None
        self._release_ops: tuple[Any, Any] | None = None

    @property
    def client(self) -> Client:
        return self.session.client

    @property
    def held(self) -> bool:
        """True between a successful acquire and the release (False once the loss was detected)."""
        return self._held and self._lost_reason is None

    def check(self) -> None:
        """Raise LockLost (LeadershipLost for a term) if the loss was detected, RuntimeError if not held. Not a
        checkpoint: for code that cannot be cancelled midway (a worker thread, a synchronous section) and stops
        at safe points of its own. The body of ``async with`` needs no check; it is cancelled on loss."""
        if self._lost_reason is not None:
            raise self._loss(self._lost_reason)
        if not self._held:
            raise RuntimeError(f"the {self._what} is not held")

    def _loss(self, reason: str) -> errors.CoordError:
        """The error that reports this place lost (LockLost or LeadershipLost)."""
        return self._lost_error(f"{self._what} {show_key(self.name)} lost: {reason}")

    def is_owner(self) -> Compare:
        """A txn compare that holds only while this key (this incarnation) still exists:
        ``Compare.create_revision(key) == fencing token``."""
        if not self.revision:
            raise RuntimeError(f"the {self._what} is not held")
        return Compare.create_revision(self.key) == self.revision

    # -- queue ----------------------------------------------------------------------------------
    async def _enqueue(self, value: bytes) -> Any:
        """Write the own key if it does not exist, and read where it stands, in one txn. Success branch: the
        put and the two newest keys by create revision (the own key, just written, and its predecessor).
        Failure branch (the key exists): the own key and the oldest key (the owner)."""
        if self._enqueue_pb is None or self._enqueue_pb[0] != value:
            newest = Get(self.prefix, prefix=True, limit=2, sort_order=SortOrder.DESCEND,
                         sort_target=SortTarget.CREATE)
            owner = Get(self.prefix, prefix=True, limit=1, sort_order=SortOrder.ASCEND, sort_target=SortTarget.CREATE)
            req = txn_request(
                [Compare.create_revision(self.key) == 0],
                [Put(self.key, value, self.session.lease_id), newest],
                [Get(self.key), owner],
            )
            self._enqueue_pb = (value, req)
        # Safe to repeat: once the put was applied, a repeat takes the failure branch and reads the same key.
        return await self.client._call("Txn", self._enqueue_pb[1], idempotent=True)

    def _older(self, kvs: Iterable[Any]) -> KeyValue | None:
        """The newest key created before the own key among ``kvs`` (KeyValues or their messages, sorted
        newest first)."""
        for kv in kvs:
            if kv.create_revision < self.revision:
                return kv if isinstance(kv, KeyValue) else KeyValue.from_pb(kv)
        return None

    async def _read_queue(self, revision: int) -> tuple[KeyValue | None, int]:
        """(the newest key older than the own key, or None; the revision read), reading at ``revision``
        (0: now). Raises SessionExpired if the own key is gone: its lease expired, or it was deleted.

        One Range answers both questions: the two newest keys created up to the own key's revision are the
        own key and its predecessor. At the revision of the predecessor's deletion the answer is final (keys
        created later are newer than ours; a later loss of the own key is seen by its watcher), so that read
        may be served by any member that applied the revision (serializable), without a quorum round."""
        req = Get(self.prefix, prefix=True, limit=2, sort_order=SortOrder.DESCEND, sort_target=SortTarget.CREATE,
                  max_create_revision=self.revision, revision=revision, serializable=bool(revision)).to_pb()
        try:
            res = RangeResult.from_pb(await self.client._call("Range", req, idempotent=True))
        except (errors.Compacted, errors.FutureRevision):
            if not revision:
                raise
            return await self._read_queue(0)  # history moved on, or a member behind the watch: read now
        read_at = revision or res.revision
        if not any(kv.key == self.key and kv.create_revision == self.revision for kv in res.kvs):
            raise errors.SessionExpired(
                f"own key {show_key(self.key)} vanished while waiting for {show_key(self.name)}"
                " (lease expired or key deleted)"
            )
        older = self._older(res.kvs)
        if older is None and res.more:  # keys sharing the own key's create revision hid the predecessor
            req.limit, req.max_create_revision = 1, self.revision - 1
            res = RangeResult.from_pb(await self.client._call("Range", req, idempotent=True))
            older = self._older(res.kvs)
        return older, read_at

    async def _queue_up(self, place: _Place, value: bytes) -> int:
        """Write the own key, then wait until no older key is left (etcd's Mutex/Election algorithm). Returns the
        revision at which none was left."""
        res = await self._enqueue(value)  # the TxnResponse message (parsed here: this is the hot path)
        read_at: int = res.header.revision
        if res.succeeded:
            self.revision = read_at
            place.watch_own(read_at)
            self._check_own_key()
            newest = res.responses[1].response_range
            older = self._older(newest.kvs)
            if older is None and newest.more:
                older, read_at = await self._read_queue(0)
        else:
            kv = KeyValue.from_pb(res.responses[0].response_range.kvs[0])
            self.revision = kv.create_revision
            place.watch_own(read_at)
            self._check_own_key()
            await self._existing(kv, value)
            owner = res.responses[1].response_range.kvs
            older = None
            if not owner or owner[0].create_revision != self.revision:
                older, read_at = await self._read_queue(0)
        while older is not None:
            deleted_at = await place.wait_deleted(older.key, read_at)
            if not place.head_at:
                # If the predecessor is a place of this client that is being released, its release txn reads
                # the new head of the queue: wait for that answer rather than read the queue ourselves.
                releasing = self.client._queue_releasing.get(older.key)
                if releasing is not None:
                    await releasing.wait()
            if place.head_at:  # a releaser of this client saw us first in the queue: nothing left to read
                return place.head_at
            older, read_at = await self._read_queue(deleted_at)
        return read_at

    async def _acquire(self, value: bytes) -> None:
        self.session.check()
        self.session._claim(self.key)
        self._lost_reason = None
        self.revision = self.acquired_revision = 0
        self._place = place = _take_place(self.session, self.key, self)
        place.head_at = 0
        waiters = self.client._queue_waiters
        try:
            self._forget_session = self.session._call_on_lost(self._session_lost)
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self._lost_reason is None:
                    waiters[self.key] = self
                    try:
                        self.acquired_revision = await self._queue_up(place, value)
                    finally:
                        if waiters.get(self.key) is self:
                            del waiters[self.key]
            self._scope = None
            if self._lost_reason is not None:
                raise errors.SessionExpired(f"{self._what} {show_key(self.name)} not acquired: {self._lost_reason}")
            self._held = True
        except BaseException:
            self._scope = None
            await self._cleanup()
            raise

    async def _existing(self, kv: KeyValue, value: bytes) -> None:
        """The own key already existed (a repeated txn): nothing to do for a lock."""

    def _first_at(self, create_revision: int, revision: int) -> None:
        """Another place of this client read, at ``revision``, that the oldest key of the queue is ours with
        ``create_revision``: if that is this incarnation, the lock is ours (stop waiting)."""
        place = self._place
        if place is not None and self.revision and create_revision == self.revision and not place.head_at:
            place.head_at = revision
            place.pred_signal.set()

    # -- loss -------------------------------------------------------------------------------------
    def _lose(self, reason: str) -> None:
        if self._lost_reason is None and self._place is not None:
            self._lost_reason = reason
            if self._scope is not None:
                self._scope.cancel()

    def _session_lost(self) -> None:
        self._lose(f"session lost: {self.session.lost_reason}")

    def _check_own_key(self) -> None:
        """Lose the place if its watcher saw this incarnation of the own key deleted."""
        place = self._place
        if place is not None and self.revision and place.own_deleted > self.revision:
            self._lose(f"{self._what} key {show_key(self.key)} was deleted at revision {place.own_deleted}")

    def _monitor_failed(self, exc: BaseException) -> None:
        if isinstance(exc, errors.Compacted):
            if self._recheck is None:
                self._recheck = self.client._start_soon(self._recheck_own_key)
        elif not isinstance(exc, errors.ClientClosed):
            # The watch could not be resumed; the session's keep-alive still guards the lease.
            log.warning("cannot watch %r (%s); relying on the session alone", self.key, exc)

    async def _recheck_own_key(self) -> None:
        """After the own key's history was compacted under its watcher: is the key still ours?"""
        while True:
            try:
                res = await self.client.get_range(self.key)
            except errors.CoordError:
                await anyio.sleep(0.1)
                continue
            self._recheck = None
            if not res.kvs or res.kvs[0].create_revision != self.revision:
                self._lose(f"{self._what} key {show_key(self.key)} is gone")
            elif self._place is not None:
                self._place.watch_own(res.revision)
            return

    async def _cleanup(self) -> None:
        """Leave the place and remove the own key (fenced when its revision is known), shielded and bounded.
        Never raises."""
        place, self._place = self._place, None
        if self._forget_session is not None:
            self._forget_session()
            self._forget_session = None
        recheck, self._recheck = self._recheck, None
        if recheck is not None:
            recheck.scope.cancel()
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + CLOSE_BOUND):
            try:
                # Both forms are safe to repeat: the key is this session's, and the txn only deletes this
                # incarnation of it. The txn also reads the oldest key left, the next owner: if that is a waiter
                # of this client, it learns so now, without a read of its own.
                if self.revision:
                    if self._release_ops is None:
                        head = _op_pb(Get(self.prefix, prefix=True, limit=1, sort_order=SortOrder.ASCEND,
                                          sort_target=SortTarget.CREATE))
                        self._release_ops = (_op_pb(Delete(self.key)), head)
                    delete, head = self._release_ops
                    mine = self.is_owner().to_pb()
                    req = rpc_pb2.TxnRequest(compare=[mine], success=[delete, head], failure=[head])
                    releasing = self.client._queue_releasing
                    done = releasing[self.key] = anyio.Event()

                    def tell_next(res: Any) -> None:
                        # As soon as the answer arrives (before this task runs again): the next owner may start.
                        self._tell_next(res)
                        done.set()

                    try:
                        await self.client._call("Txn", req, idempotent=True, on_response=tell_next)
                    finally:
                        if releasing.get(self.key) is done:
                            del releasing[self.key]
                        done.set()
                else:
                    await self.client._call("DeleteRange", Delete(self.key).to_pb(), idempotent=True)
            except errors.CoordError as exc:
                log.debug("could not delete %r: %s (the lease will take it)", self.key, exc)
            if recheck is not None:
                await recheck.aclose()
        if place is not None:
            _leave_place(place)
        self.session._release(self.key)
        self._held = False

    def _tell_next(self, res: Any) -> None:
        """From the release's TxnResponse: if the oldest key left is a waiter of this client, it owns the lock.
        Runs where the transport's ``on_response`` runs: only non-blocking work."""
        head = res.responses[-1].response_range.kvs
        if head:
            nxt = self.client._queue_waiters.get(head[0].key)
            if nxt is not None:
                nxt._first_at(head[0].create_revision, res.header.revision)

    # -- holding --------------------------------------------------------------------------------
    def _start_holding(self) -> None:
        self._body = anyio.CancelScope()
        self._scope = self._body
        if self._lost_reason is not None:
            self._body.cancel()

    def _enter_body(self) -> None:
        assert self._body is not None
        self._body.__enter__()

    async def _exit_body(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """Leave the body scope and release; raise the loss error if the body was cut short."""
        assert self._body is not None
        swallowed = bool(self._body.__exit__(exc_type, exc, tb))
        self._body = None
        self._scope = None
        lost = self._lost_reason
        await self._release()
        if lost is not None and (swallowed or exc is None):
            raise self._loss(lost) from exc
        return swallowed

    async def _release(self) -> None:
        await self._cleanup()


class Lock(_Queued):
    """A fair distributed lock owned by a session. ``async with session.lock("name") as lock:``.

    Entering waits in the queue (a checkpoint; cancel it with ``fail_after`` and its key is removed, the body
    never runs). Raises SessionExpired if the session is or gets lost before the lock is held. The body runs
    while the lock is held; if the session is lost or the key deleted meanwhile, the body is cancelled and
    LockLost is raised when the block exits. Leaving the block releases the lock (fenced by the token).

    ``lock.fencing_token`` (the key's create revision) only grows from one holder to the next: pass it to the
    resource you protect, and have it refuse tokens lower than the highest it has seen. ``lock.is_owner()`` is a
    compare for ``client.txn`` that fails once the lock was lost.
    """

    _lost_error = errors.LockLost
    _what = "lock"

    @property
    def fencing_token(self) -> int:
        """The own key's create revision (0 until acquired)."""
        return self.revision

    async def acquire(self) -> None:
        """Wait for the lock (a checkpoint). Raises SessionExpired as ``async with`` does. Prefer ``async with``:
        after a bare acquire a loss only turns :attr:`held` False (there is no body to cancel) until
        :meth:`release`."""
        await self._acquire(b"")

    async def release(self) -> None:
        """Delete the own key if it is still this incarnation (shielded, bounded; never raises)."""
        await self._release()

    async def __aenter__(self) -> Lock:
        await self.acquire()
        self._start_holding()
        self._enter_body()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        return await self._exit_body(exc_type, exc, tb)


@contextlib.asynccontextmanager
async def open_client_lock(client: Client, name: Key, ttl: int) -> AsyncIterator[Lock]:
    async with client.session(ttl) as session, session.lock(name) as lock:
        yield lock


class Term(_Queued):
    """A term of office won by :meth:`Election.campaign`. ``term.revision`` is the fencing token;
    ``term.value`` the value last proclaimed."""

    _lost_error = errors.LeadershipLost
    _what = "leadership"

    def __init__(self, session: Session, name: Key, value: bytes) -> None:
        super().__init__(session, name)
        self.value = value

    def is_leader(self) -> Compare:
        """A txn compare that holds only while this term lasts."""
        return self.is_owner()

    async def _existing(self, kv: KeyValue, value: bytes) -> None:
        if kv.value != value:
            await self.proclaim(value)

    async def proclaim(self, value: Key) -> None:
        """Publish a new value as the leader (a checkpoint). Raises LeadershipLost if this term is over."""
        v = to_bytes(value)
        res = await self.client.txn([self.is_owner()], [Put(self.key, v, self.session.lease_id)])
        if not res.succeeded:
            self._lose("the leader key is gone (proclaim failed)")
            raise errors.LeadershipLost(f"not the leader of {show_key(self.name)} any more")
        self.value = v


class Election:
    """An election named ``name``: ``campaign`` to lead, ``leader()`` / ``observe()`` to follow."""

    def __init__(self, client: Client, name: Key, *, session: Session | None = None, ttl: int = 10) -> None:
        self.client = client
        self.name = to_bytes(name)
        self.prefix = self.name + b"/"
        self._session = session
        self._ttl = ttl

    @contextlib.asynccontextmanager
    async def campaign(self, value: Key) -> AsyncIterator[Term]:
        """``async with election.campaign(b"me") as term:`` — wait to become leader (a checkpoint; cancelling it
        leaves the queue), then run the body as the term of office. If the session is lost or the key deleted, the
        body is cancelled and LeadershipLost is raised. Leaving the block resigns."""
        async with contextlib.AsyncExitStack() as stack:
            session = self._session
            if session is None:
                session = await stack.enter_async_context(self.client.session(self._ttl))
            term = Term(session, self.name, to_bytes(value))
            await term._acquire(term.value)
            term._start_holding()
            term._enter_body()
            try:
                yield term
            except BaseException as exc:
                if not await term._exit_body(type(exc), exc, exc.__traceback__):
                    raise
            else:
                await term._exit_body(None, None, None)

    async def leader(self) -> KeyValue | None:
        """The current leader's key and value (the oldest candidate), or None. A checkpoint."""
        res = await self.client.get_range(
            self.prefix, prefix=True, limit=1, sort_order=SortOrder.ASCEND, sort_target=SortTarget.CREATE
        )
        return res.kvs[0] if res.kvs else None

    @contextlib.asynccontextmanager
    async def observe(self) -> AsyncIterator[LeaderObserver]:
        """``async with election.observe() as leaders: async for kv in leaders:`` — the leader's KeyValue now
        (if there is one) and on every change of leader or proclamation."""
        send, receive = anyio.create_memory_object_stream[KeyValue | BaseException](64)
        observer = LeaderObserver(receive)
        with receive:
            bg = await self.client._spawn(lambda: _observe(self.client, self.prefix, send))
            try:
                yield observer
            finally:
                await bg.aclose()


class LeaderObserver:
    """Receives the leader's KeyValue on each change (``async for``; ``receive`` is a checkpoint)."""

    def __init__(self, receive: MemoryObjectReceiveStream[KeyValue | BaseException]) -> None:
        self._receive = receive

    async def receive(self) -> KeyValue:
        try:
            item = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError) as exc:
            raise errors.ClientClosed("the observer is closed") from exc
        if isinstance(item, BaseException):
            raise item
        return item

    def __aiter__(self) -> LeaderObserver:
        return self

    async def __anext__(self) -> KeyValue:
        return await self.receive()


async def _observe(client: Client, prefix: bytes, send: MemoryObjectSendStream[KeyValue | BaseException]) -> None:
    """Track every candidate under the prefix; emit the oldest whenever it or its value changes."""
    with send:
        last: tuple[bytes, int] | None = None
        while True:
            try:
                res = await client.get_range(prefix, prefix=True)
                candidates = {kv.key: kv for kv in res.kvs}
                start = res.revision + 1
                while True:
                    if candidates:
                        lead = min(candidates.values(), key=lambda kv: kv.create_revision)
                        if (lead.key, lead.mod_revision) != last:
                            last = (lead.key, lead.mod_revision)
                            await send.send(lead)
                    async with client.watch(prefix, prefix=True, start_revision=start) as events:
                        async for batch in events.batches():
                            for ev in batch.events:
                                if ev.type is EventType.PUT:
                                    candidates[ev.key] = ev.kv
                                else:
                                    candidates.pop(ev.key, None)
                            start = batch.revision + 1
                            if candidates:
                                lead = min(candidates.values(), key=lambda kv: kv.create_revision)
                                if (lead.key, lead.mod_revision) != last:
                                    last = (lead.key, lead.mod_revision)
                                    await send.send(lead)
            except errors.Compacted:
                continue  # re-read the candidates
            except errors.CoordError as exc:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await send.send(exc)
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return

