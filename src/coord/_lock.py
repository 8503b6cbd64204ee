"""Locks and elections: the revision-ordered queue of etcd's concurrency recipes, run by the client.

Key layout and wire steps are those of etcd's Mutex/Election (and so of ``etcdctl lock`` / ``etcdctl
elect``): each waiter writes ``<name>/<lease hex>`` attached to its session's lease, in a txn guarded by
``create_revision == 0``; its place in the queue is that key's create revision. It then waits only for
the deletion of its immediate predecessor (the key with the largest create revision below its own),
so hand-off is FIFO and wakes one waiter (no thundering herd). After waiting it reads its own key again:
if the lease expired while it waited, the key is gone and acquiring fails (etcd #11456).

While held, the body of ``async with`` runs in a cancel scope that a monitor task cancels when the
session is lost or the key is deleted (revoked lease, an operator's ``etcdctl del``); the block then
raises LockLost / LeadershipLost. Cancellation cannot recall side effects already sent, so the lock
also exposes a fencing token (the key's create revision) and an ``is_owner()`` compare for txns.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _errors as errors
from ._session import Session, lock_key
from ._transport import CLOSE_BOUND
from ._txn import Compare, Delete, Get, Put, TxnResult, txn_request
from ._types import EventType, Key, KeyValue, RangeResult, SortOrder, SortTarget, to_bytes

if TYPE_CHECKING:
    from ._client import Background, Client

log = logging.getLogger("coord")


class _Queued:
    """A place in a revision-ordered queue, held by a session; the shared part of Lock and Term."""

    _lost_error: type[errors.CoordError] = errors.LockLost
    _what = "lock"

    def __init__(self, session: Session, name: Key) -> None:
        self.session = session
        self.name = to_bytes(name)
        self.prefix, self.key = lock_key(self.name, session.lease_id)
        self.revision = 0
        """Create revision of the own key: the fencing token (0 until acquired)."""
        self._held = False
        self._lost_reason: str | None = None
        self._body: anyio.CancelScope | None = None
        self._monitor: Background | None = None
        self._confirmed_at = 0

    @property
    def client(self) -> Client:
        return self.session.client

    @property
    def held(self) -> bool:
        """True between a successful acquire and the release (False once the loss was detected)."""
        return self._held and self._lost_reason is None

    def is_owner(self) -> Compare:
        """A txn compare that holds only while this key (this incarnation) still exists:
        ``Compare.create_revision(key) == fencing token``."""
        if not self.revision:
            raise RuntimeError(f"the {self._what} is not held")
        return Compare.create_revision(self.key) == self.revision

    # -- queue ----------------------------------------------------------------------------------
    async def _enqueue(self, value: bytes) -> TxnResult:
        owner = Get(self.prefix, prefix=True, limit=1, sort_order=SortOrder.ASCEND, sort_target=SortTarget.CREATE)
        req = txn_request(
            [Compare.create_revision(self.key) == 0],
            [Put(self.key, value, self.session.lease_id), owner],
            [Get(self.key), owner],
        )
        # Safe to repeat: once the put was applied, a repeat takes the failure branch and reads the same key.
        return TxnResult.from_pb(await self.client._call("Txn", req, idempotent=True))

    async def _wait_predecessors(self) -> None:
        client = self.client
        while True:
            res = await client.get_range(
                self.prefix,
                prefix=True,
                limit=1,
                sort_order=SortOrder.DESCEND,
                sort_target=SortTarget.CREATE,
                max_create_revision=self.revision - 1,
            )
            if not res.kvs:
                return
            pred = res.kvs[0].key
            try:
                async with client.watch(pred, start_revision=res.revision + 1) as events:
                    async for ev in events:
                        if ev.type is EventType.DELETE:
                            break
            except errors.Compacted:
                continue  # history moved on: read the queue again

    async def _acquire(self, value: bytes) -> None:
        self.session.check()
        self.session._claim(self.key)
        self._lost_reason = None
        self.revision = 0
        try:
            with anyio.CancelScope() as scope:
                loss = await self.client._spawn(_cancel_on_loss(self.session, scope))
                try:
                    res = await self._enqueue(value)
                    if res.succeeded:
                        self.revision = res.revision
                    else:
                        mine = res.responses[0]
                        assert isinstance(mine, RangeResult)
                        kv = mine.kvs[0]
                        self.revision = kv.create_revision
                        await self._existing(kv, value)
                    owner = res.responses[1]
                    assert isinstance(owner, RangeResult)
                    first = owner.kvs[0] if owner.kvs else None
                    if first is None or first.create_revision != self.revision:
                        await self._wait_predecessors()
                    # Re-check: a lease that expired while we waited took our key with it.
                    check = await self.client.get_range(self.key)
                finally:
                    await loss.aclose()
            if scope.cancelled_caught:
                raise errors.SessionExpired(f"session lost while waiting for {self.name!r}: "
                                            f"{self.session.lost_reason}")
            if not check.kvs or check.kvs[0].create_revision != self.revision:
                raise errors.SessionExpired(
                    f"own key {self.key!r} vanished while waiting for {self.name!r} (lease expired or key deleted)"
                )
            self._confirmed_at = check.revision
            self._held = True
        except BaseException:
            await self._cleanup()
            raise

    async def _existing(self, kv: KeyValue, value: bytes) -> None:
        """The own key already existed (a repeated txn): nothing to do for a lock."""

    async def _cleanup(self) -> None:
        """Remove the own key (fenced when its revision is known), shielded and bounded. Never raises."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_BOUND):
            try:
                if self.revision:
                    await self.client.txn([self.is_owner()], [Delete(self.key)])
                else:
                    await self.client.delete(self.key)
            except errors.CoordError as exc:
                log.debug("could not delete %r: %s (the lease will take it)", self.key, exc)
        self.session._release(self.key)
        self._held = False

    # -- holding --------------------------------------------------------------------------------
    async def _start_holding(self) -> None:
        self._body = anyio.CancelScope()
        self._monitor = await self.client._spawn(self._watch_loss)

    def _lose(self, reason: str) -> None:
        if self._lost_reason is None:
            self._lost_reason = reason
            if self._body is not None:
                self._body.cancel()

    async def _watch_loss(self) -> None:
        """Monitor: cancel the body when the session is lost or the own key is deleted. Never raises."""
        async with anyio.create_task_group() as tg:

            async def session_lost() -> None:
                await self.session.wait_lost()
                self._lose(f"session lost: {self.session.lost_reason}")
                tg.cancel_scope.cancel()

            tg.start_soon(session_lost)
            await self._watch_key()
            tg.cancel_scope.cancel()

    async def _watch_key(self) -> None:
        client = self.client
        start = self._confirmed_at + 1
        while True:
            try:
                async with client.watch(self.key, start_revision=start) as events:
                    async for ev in events:
                        if ev.type is EventType.DELETE:
                            self._lose(f"{self._what} key {self.key!r} was deleted at revision {ev.revision}")
                            return
                        start = ev.revision + 1
            except errors.Compacted:
                try:
                    res = await client.get_range(self.key)
                except errors.CoordError:
                    await anyio.sleep(0.1)
                    continue
                if not res.kvs or res.kvs[0].create_revision != self.revision:
                    self._lose(f"{self._what} key {self.key!r} is gone")
                    return
                start = res.revision + 1
            except errors.CoordError as exc:
                # The watch could not be resumed; the session's keep-alive still guards the lease.
                log.warning("cannot watch %r (%s); relying on the session alone", self.key, exc)
                await anyio.sleep_forever()

    def _enter_body(self) -> None:
        assert self._body is not None
        self._body.__enter__()

    async def _exit_body(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """Leave the body scope, stop the monitor, release; raise the loss error if the body was cut short."""
        assert self._body is not None
        swallowed = bool(self._body.__exit__(exc_type, exc, tb))
        self._body = None
        if self._monitor is not None:
            await self._monitor.aclose()
            self._monitor = None
        lost = self._lost_reason
        await self._release()
        if lost is not None and (swallowed or exc is None):
            raise self._lost_error(f"{self._what} {self.name!r} lost: {lost}") from exc
        return swallowed

    async def _release(self) -> None:
        await self._cleanup()


def _cancel_on_loss(session: Session, scope: anyio.CancelScope) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await session.wait_lost()
        scope.cancel()

    return run


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
        """Wait for the lock (a checkpoint). Prefer ``async with``, which also watches for its loss."""
        await self._acquire(b"")

    async def release(self) -> None:
        """Delete the own key if it is still this incarnation (shielded, bounded; never raises)."""
        await self._release()

    async def __aenter__(self) -> Lock:
        await self.acquire()
        try:
            await self._start_holding()
        except BaseException:
            await self._release()
            raise
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
            raise errors.LeadershipLost(f"not the leader of {self.name!r} any more")
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
            try:
                await term._start_holding()
            except BaseException:
                await term._release()
                raise
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

