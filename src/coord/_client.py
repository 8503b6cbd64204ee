"""The Client: KV, leases, and the factories of watches, sessions, locks and elections.

Every ``async def`` method here is a checkpoint (it may be cancelled, and it yields to other tasks). None
takes a timeout: wrap calls in ``anyio.fail_after`` / ``move_on_after``; the deadline is passed to the
server as the gRPC timeout.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from . import _errors as errors
from ._pb import rpc_pb2
from ._transport import METHODS, Transport, open_transport
from ._txn import Compare, Delete, Get, Op, Put, Txn, TxnResult, txn_request
from ._types import (
    DeleteResult,
    Key,
    KeyValue,
    LeaseGrant,
    LeaseInfo,
    LeaseLike,
    PutResult,
    RangeResult,
    SortOrder,
    SortTarget,
    WatchFilter,
    lease_id_of,
)

if TYPE_CHECKING:
    from ._lock import Election, Lock, _Place, _Queued
    from ._session import Session
    from ._watch import Watch, _WatchHub

log = logging.getLogger("coord")


@dataclass(frozen=True, slots=True)
class Status:
    """Maintenance/Status of the endpoint that answered."""

    endpoint: str
    version: str
    member_id: int
    leader: int
    revision: int
    raft_term: int
    db_size: int


class Background:
    """A task the client runs for a session, watch or lock. ``aclose`` cancels it and waits for its end."""

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()

    async def aclose(self) -> None:
        """Cancel the task and wait until it has finished its cleanup (shielded)."""
        self.scope.cancel()
        with anyio.CancelScope(shield=True):
            await self.done.wait()


async def _run_background(
    fn: Callable[[], Awaitable[None]], *, task_status: TaskStatus[Background] = anyio.TASK_STATUS_IGNORED
) -> None:
    await _run_started(fn, Background(), task_status=task_status)


async def _run_started(
    fn: Callable[[], Awaitable[None]], bg: Background, *,
    task_status: TaskStatus[Background] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``fn`` as the task ``bg`` (``task_status`` reports ``bg`` once its scope is entered); never raises."""
    try:
        with bg.scope:
            task_status.started(bg)
            try:
                await fn()
            except Exception:  # background tasks never raise: their owners turn failure into state
                log.exception("coord background task failed")
    finally:
        bg.done.set()


def _read_only(ops: Iterable[Op]) -> bool:
    for op in ops:
        if isinstance(op, Put | Delete):
            return False
        if isinstance(op, Txn) and not (_read_only(op.success) and _read_only(op.failure)):
            return False
    return True


class Client:
    """A connection to an etcd v3 cluster (or coord-server). Made by :func:`open_client`."""

    def __init__(self, transport: Transport, tg: TaskGroup, *, watch_probe_interval: float = 10.0) -> None:
        self._transport = transport
        self._tg = tg
        self._closed = False
        self._hub: _WatchHub | None = None
        self._queue_waiters: dict[bytes, _Queued] = {}  # own key -> lock/campaign waiting in its queue
        self._queue_releasing: dict[bytes, anyio.Event] = {}  # own key -> set once its release txn answered
        self._queue_places: dict[bytes, _Place] = {}  # own key -> the place (and watchers) of a session
        self.watch_probe_interval = watch_probe_interval

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def current_endpoint(self) -> str:
        """The endpoint (host:port) requests go to right now (it changes on failover)."""
        return self._transport.current_endpoint

    @property
    def transport(self) -> Transport:
        return self._transport

    async def _call(
        self, name: str, request: Any, *, idempotent: bool, on_response: Callable[[Any], None] | None = None
    ) -> Any:
        if self._closed:
            raise errors.ClientClosed("the client is closed")
        return await self._transport.unary(METHODS[name], request, idempotent=idempotent, on_response=on_response)

    async def _spawn(self, fn: Callable[[], Awaitable[None]]) -> Background:
        """Run ``fn`` as a background task in the client's task group. A checkpoint."""
        if self._closed:
            raise errors.ClientClosed("the client is closed")
        bg: Background = await self._tg.start(_run_background, fn)
        return bg

    def _start_soon(self, fn: Callable[[], Awaitable[None]]) -> Background:
        """Like :meth:`_spawn`, without waiting for the task to start (so not a checkpoint)."""
        if self._closed:
            raise errors.ClientClosed("the client is closed")
        bg = Background()
        self._tg.start_soon(_run_started, fn, bg)
        return bg

    def _watch_hub(self) -> _WatchHub:
        """The hub that runs every watch of this client on one stream (started on first use)."""
        if self._closed:
            raise errors.ClientClosed("the client is closed")
        hub = self._hub
        if hub is None or hub.closed:
            from ._watch import _WatchHub

            hub = self._hub = _WatchHub(self)
            self._tg.start_soon(hub.run)
        return hub

    # -- KV --------------------------------------------------------------------------------------
    async def get(self, key: Key, *, revision: int = 0, serializable: bool = False) -> KeyValue | None:
        """The key's current value (or at ``revision``), or None. Raises Compacted / FutureRevision for a
        revision outside the history."""
        res = await self.get_range(key, revision=revision, serializable=serializable)
        return res.kvs[0] if res.kvs else None

    async def get_range(
        self,
        key: Key,
        *,
        prefix: bool = False,
        range_end: Key | None = None,
        limit: int = 0,
        revision: int = 0,
        sort_order: SortOrder = SortOrder.NONE,
        sort_target: SortTarget = SortTarget.KEY,
        keys_only: bool = False,
        count_only: bool = False,
        serializable: bool = False,
        min_mod_revision: int = 0,
        max_mod_revision: int = 0,
        min_create_revision: int = 0,
        max_create_revision: int = 0,
    ) -> RangeResult:
        """Read a key, a ``prefix`` (``prefix=True``), or ``[key, range_end)``. Retried on failover."""
        op = Get(
            key, prefix, range_end, limit, revision, keys_only, count_only, serializable, sort_order, sort_target,
            min_mod_revision, max_mod_revision, min_create_revision, max_create_revision,
        )
        return RangeResult.from_pb(await self._call("Range", op.to_pb(), idempotent=True))

    async def get_prefix(self, prefix: Key, **kw: Any) -> RangeResult:
        """``get_range(prefix, prefix=True, ...)``."""
        return await self.get_range(prefix, prefix=True, **kw)

    async def put(self, key: Key, value: Key, *, lease: LeaseLike = 0, prev_kv: bool = False) -> PutResult:
        """Write ``value`` at ``key``. Never retried once sent: raises OutcomeUnknown if the answer was lost;
        LeaseNotFound for an unknown lease."""
        req = Put(key, value, lease, prev_kv).to_pb()
        return PutResult.from_pb(await self._call("Put", req, idempotent=False))

    async def delete(
        self, key: Key, *, prefix: bool = False, range_end: Key | None = None, prev_kv: bool = False
    ) -> DeleteResult:
        """Delete a key, a prefix or a range. Raises OutcomeUnknown if the answer was lost."""
        req = Delete(key, prefix, range_end, prev_kv).to_pb()
        return DeleteResult.from_pb(await self._call("DeleteRange", req, idempotent=False))

    async def txn(
        self, compare: Iterable[Compare] = (), success: Iterable[Op] = (), failure: Iterable[Op] = ()
    ) -> TxnResult:
        """Run ``success`` if every compare holds, else ``failure``, atomically. Read-only txns are retried
        on failover; one that writes raises OutcomeUnknown if the answer was lost."""
        compare, success, failure = list(compare), list(success), list(failure)
        req = txn_request(compare, success, failure)
        ro = _read_only(success) and _read_only(failure)
        return TxnResult.from_pb(await self._call("Txn", req, idempotent=ro))

    async def compact(self, revision: int, *, physical: bool = False) -> int:
        """Drop the history before ``revision``; returns the header revision. Raises Compacted if it already
        was, FutureRevision if ``revision`` is ahead of the store."""
        resp = await self._call("Compact", rpc_pb2.CompactionRequest(revision=revision, physical=physical),
                                idempotent=False)
        return int(resp.header.revision)

    # -- leases ----------------------------------------------------------------------------------
    async def grant_lease(self, ttl: int, *, lease_id: int = 0) -> LeaseGrant:
        """A new lease of ``ttl`` seconds (the server may raise a TTL below its minimum). Nothing keeps it
        alive: prefer :meth:`session`. Raises OutcomeUnknown if the answer was lost (pass ``lease_id`` to make
        a repeat detectable: a second grant of the same ID fails "lease already exists")."""
        resp = await self._call("LeaseGrant", rpc_pb2.LeaseGrantRequest(TTL=ttl, ID=lease_id), idempotent=False)
        return LeaseGrant(resp.ID, resp.TTL)

    async def revoke_lease(self, lease: LeaseLike) -> None:
        """Revoke a lease and delete its keys. Raises LeaseNotFound if it does not exist."""
        await self._call("LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=lease_id_of(lease)), idempotent=True)

    async def lease_info(self, lease: LeaseLike, *, keys: bool = False) -> LeaseInfo:
        """TimeToLive of a lease; ``ttl == -1`` means it does not exist."""
        lid = lease_id_of(lease)
        resp = await self._call("LeaseTimeToLive", rpc_pb2.LeaseTimeToLiveRequest(ID=lid, keys=keys),
                                idempotent=True)
        return LeaseInfo(lid, resp.TTL, resp.grantedTTL, tuple(resp.keys))

    async def leases(self) -> list[int]:
        """IDs of every live lease."""
        resp = await self._call("LeaseLeases", rpc_pb2.LeaseLeasesRequest(), idempotent=True)
        return [ls.ID for ls in resp.leases]

    # -- cluster ---------------------------------------------------------------------------------
    async def status(self) -> Status:
        """Maintenance/Status of the endpoint in use."""
        endpoint = self.current_endpoint
        resp = await self._call("Status", rpc_pb2.StatusRequest(), idempotent=True)
        h = resp.header
        return Status(endpoint, resp.version, h.member_id, resp.leader, h.revision, h.raft_term, resp.dbSize)

    async def member_urls(self) -> list[str]:
        """The client URLs of every cluster member (MemberList)."""
        resp = await self._call("MemberList", rpc_pb2.MemberListRequest(), idempotent=True)
        return [u for m in resp.members for u in m.clientURLs]

    # -- coordination ----------------------------------------------------------------------------
    def watch(
        self,
        key: Key,
        *,
        prefix: bool = False,
        range_end: Key | None = None,
        start_revision: int = 0,
        prev_kv: bool = False,
        filters: Iterable[WatchFilter] = (),
    ) -> contextlib.AbstractAsyncContextManager[Watch]:
        """``async with client.watch(key) as events: async for event in events: ...``

        Entering waits until the server confirmed the watch (a checkpoint): every change after that is
        seen. ``start_revision`` (inclusive) replays history from there; 0 = changes after the watch was
        created. The stream resumes from the last delivered revision + 1 across reconnects and server
        restarts. Raises Compacted (with ``compact_revision``) when the history it needs is gone.
        """
        from ._watch import open_watch

        return open_watch(self, key, prefix=prefix, range_end=range_end, start_revision=start_revision,
                          prev_kv=prev_kv, filters=filters)

    def session(self, ttl: int = 60) -> contextlib.AbstractAsyncContextManager[Session]:
        """``async with client.session(ttl=10) as session:`` a lease kept alive by a background task of
        the client; revoked on exit. See :class:`Session`."""
        from ._session import open_session

        return open_session(self, ttl)

    def lock(self, name: Key, *, ttl: int = 10) -> contextlib.AbstractAsyncContextManager[Lock]:
        """``async with client.lock("jobs/cleanup") as lock:`` a fair lock with its own session of ``ttl``
        seconds. See :class:`Lock` (fencing token, LockLost)."""
        from ._lock import open_client_lock

        return open_client_lock(self, name, ttl)

    def election(self, name: Key, *, session: Session | None = None, ttl: int = 10) -> Election:
        """An :class:`Election` named ``name``. Campaigns use ``session``, or a session of ``ttl`` seconds
        opened per campaign."""
        from ._lock import Election

        return Election(self, name, session=session, ttl=ttl)


@contextlib.contextmanager
def _unwrap_body_exception() -> Iterator[None]:
    """The client's task group would wrap the exception of the ``async with`` body in an ExceptionGroup.
    Background tasks never raise, so such a group holds exactly the body's exception: re-raise it as is."""
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # nested nurseries (trio-asyncio's loop is one) nest the groups
        if exc is group:
            raise
        context = exc.__context__
        try:
            raise exc
        finally:
            exc.__context__ = context
            del exc, group


@contextlib.asynccontextmanager
async def open_client(
    endpoints: str | Sequence[str] = "127.0.0.1:2379",
    *,
    user: str | None = None,
    password: str | None = None,
    retry_window: float = 30.0,
    connect_timeout: float = 3.0,
    watch_probe_interval: float = 10.0,
) -> AsyncIterator[Client]:
    """``async with open_client(["10.0.0.1:2379", "10.0.0.2:2379"]) as client:``

    ``endpoints``: one ``host:port`` (or ``http://host:port``) or several, comma-separated or as a list;
    calls fail over between them. ``user``/``password``: authenticate on entry (raises AuthenticationFailed)
    and whenever the server rejects the token as expired. ``retry_window``: how long an idempotent call (a
    read, a lock queue step) keeps retrying across endpoints when the caller set no earlier deadline;
    then Unavailable. ``connect_timeout``: one connection attempt to one endpoint. ``watch_probe_interval``:
    a watch stream silent for that long is probed with a progress request, and replaced if the probe is not
    answered within another interval (dead-stream detection).

    The client owns a task group for the keep-alives of sessions and the streams of watches; it is
    cancelled on exit, then the channels are closed (shielded, bounded). Exceptions of the body propagate
    unchanged (never wrapped in an ExceptionGroup).
    """
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e.strip()]
    if not math.isfinite(retry_window) or retry_window < 0:
        raise ValueError("retry_window must be a finite number >= 0")
    # Under Trio the transport's trio-asyncio loop is a nursery too: unwrap outside of both.
    with _unwrap_body_exception():
        async with open_transport(
            endpoints, user=user, password=password, retry_window=retry_window, connect_timeout=connect_timeout
        ) as transport, anyio.create_task_group() as tg:
            client = Client(transport, tg, watch_probe_interval=watch_probe_interval)
            try:
                yield client
            finally:
                client._closed = True
                tg.cancel_scope.cancel()

