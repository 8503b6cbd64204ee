"""Sessions: a lease plus the keep-alive task that keeps it, supervised by the client's task group.

The keep-alive task never raises: every failure becomes state (:class:`SessionState`), decided by the
pure :class:`~coord._lease_clock.LeaseClock` on the client's monotonic clock. Keep-alives are sent every
TTL/3 on one LeaseKeepAlive stream; when the stream breaks the session is SUSPENDED and the task
reconnects (failing over to another endpoint); when the local deadline passes, or the server answers
TTL 0, the session is LOST for good and everything holding it (locks, terms) is told.

The lease ID is chosen by the client, so a LeaseGrant whose answer was lost can be repeated safely: a
repeat that fails "lease already exists" proves the first one was applied. No lease is leaked by a
failed or cancelled grant either: the ID is revoked (shielded, bounded) before the error propagates.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio

from . import _errors as errors
from ._lease_clock import LeaseClock, SessionState
from ._pb import rpc_pb2
from ._transport import CLOSE_BOUND, METHODS, BidiStream
from ._types import Key, show_key, to_bytes

if TYPE_CHECKING:
    from ._client import Client
    from ._lock import Election, Lock

_KEEPALIVE = METHODS["LeaseKeepAlive"]
_HASLEADER = (("hasleader", "true"),)
RECONNECT_PAUSE = 0.05
PLACE_CACHE = 8
"""Idle queue places (lock/campaign watchers) a session keeps for its next turn in the same queue."""
PLACE_LINGER = 30.0
"""Seconds an idle place keeps its watchers (swept at each keep-alive and whenever a place is taken or left)."""


class Session:
    """A lease kept alive by the client. Made by ``client.session(ttl=...)``.

    ``state`` is HELD → SUSPENDED (keep-alives failing, not yet expired by the local clock) → LOST
    (terminal). ``await session.wait_lost()`` returns when it is lost, ``await session.wait_state(...)`` when
    it is in one of the given states. Closing the ``async with`` block revokes the lease (deleting every key
    attached to it).
    """

    def __init__(self, client: Client, lease_id: int, clock: LeaseClock) -> None:
        self._client = client
        self.lease_id = lease_id
        """The lease ID (keys written with ``lease=session`` are deleted with it)."""
        self._clock = clock
        self._lost = anyio.Event()
        self._changed = anyio.Event()  # set (and replaced) when the state may have changed
        self._on_lost: dict[int, Callable[[], None]] = {}
        self._next_callback = 0
        self._closed = False
        self._names: set[bytes] = set()  # lock/campaign keys queued or held through this session
        self._places: dict[bytes, Any] = {}  # own key -> _lock._Place: queue watchers kept for the next round
        self.keepalives = 0
        """Keep-alive replies received (for tests and metrics)."""

    @property
    def ttl(self) -> float:
        """The lease TTL the server granted, in seconds."""
        return self._clock.ttl

    @property
    def state(self) -> SessionState:
        st = self._clock.state(anyio.current_time())
        if st is SessionState.LOST:
            self._mark_lost()
        return st

    @property
    def lost_reason(self) -> str:
        return self._clock.lost_reason

    @property
    def client(self) -> Client:
        return self._client

    def remaining(self) -> float:
        """Seconds the client can still be sure the lease exists (0 once LOST)."""
        return self._clock.remaining(anyio.current_time())

    async def wait_lost(self) -> None:
        """Return once the session is LOST (a checkpoint)."""
        await self._lost.wait()

    async def wait_state(self, *states: SessionState) -> SessionState:
        """Return the state once it is one of ``states`` (at once if it already is; a checkpoint either way).
        Raises SessionExpired if the session is LOST and LOST is not among ``states`` (it never comes back).

        Level-triggered, so a loop cannot miss a change between two calls::

            while True:
                await session.wait_state(SessionState.SUSPENDED)  # keep-alives failing: pause risky work
                await session.wait_state(SessionState.HELD)       # confirmed again: resume
        """
        while True:
            changed = self._changed
            st = self.state
            if st in states:
                await anyio.lowlevel.checkpoint()
                return st
            if st is SessionState.LOST:
                await anyio.lowlevel.checkpoint()
                self.check()  # raises SessionExpired
            await changed.wait()

    def _state_may_have_changed(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def check(self) -> None:
        """Raise SessionExpired if the session is LOST."""
        if self.state is SessionState.LOST:
            raise errors.SessionExpired(f"session lease {self.lease_id:x} is lost: {self.lost_reason}")

    def lock(self, name: Key) -> Lock:
        """A :class:`Lock` on ``name`` owned by this session (acquire with ``async with``)."""
        from ._lock import Lock

        return Lock(self, name)

    def election(self, name: Key) -> Election:
        """An :class:`Election` whose campaigns use this session."""
        from ._lock import Election

        return Election(self._client, name, session=self)

    def _claim(self, key: bytes) -> None:
        if key in self._names:
            raise RuntimeError(
                f"{show_key(key)} is already queued or held through this session; a session owns one place per queue"
            )
        self._names.add(key)

    def _release(self, key: bytes) -> None:
        self._names.discard(key)

    def _sweep_places(self) -> None:
        """Drop the watchers of idle queue places beyond PLACE_CACHE, or idle for longer than PLACE_LINGER
        (least recently used first). Never raises."""
        now = anyio.current_time()
        idle = [p for p in self._places.values() if p.owner is None]
        for i, place in enumerate(idle):
            if len(idle) - i > PLACE_CACHE or now - place.idle_since > PLACE_LINGER:
                del self._places[place.key]
                place.close()

    def _set_lost(self) -> None:
        self._clock.state(anyio.current_time())
        self._mark_lost()

    def _mark_lost(self) -> None:
        """Set the lost event and tell everything that registered with :meth:`_call_on_lost`, once."""
        if self._lost.is_set():
            return
        self._lost.set()
        self._state_may_have_changed()
        callbacks = list(self._on_lost.values())
        self._on_lost.clear()
        for cb in callbacks:
            cb()

    def _call_on_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (sync, must not raise) when the session is lost (at once if it already is).
        Returns the function that unregisters it. Cheaper than a task waiting on :meth:`wait_lost`."""
        if self._lost.is_set():
            callback()
            return _nothing
        handle = self._next_callback
        self._next_callback += 1
        self._on_lost[handle] = callback

        def forget() -> None:
            self._on_lost.pop(handle, None)

        return forget

    # -- keep-alive task -----------------------------------------------------------------------
    async def _keepalive(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watchdog, tg.cancel_scope)
            await self._stream_loop(tg.cancel_scope)

    async def _watchdog(self, scope: anyio.CancelScope) -> None:
        while True:
            now = anyio.current_time()
            if self._clock.state(now) is SessionState.LOST:
                self._mark_lost()
                scope.cancel()
                return
            await anyio.sleep(max(self._clock.deadline - now, 0.001))

    async def _stream_loop(self, scope: anyio.CancelScope) -> None:
        transport = self._client._transport
        while not self._lost.is_set():
            try:
                async with transport.open_stream(_KEEPALIVE, metadata=_HASLEADER) as stream:
                    await self._serve(stream, scope)
            except errors.CoordError:
                pass
            self._clock.stream_broken()
            self._state_may_have_changed()
            await anyio.sleep(RECONNECT_PAUSE)

    async def _serve(self, stream: BidiStream, outer: anyio.CancelScope) -> None:
        """Sends keep-alives and reads replies until the stream breaks (returns)."""
        request = rpc_pb2.LeaseKeepAliveRequest(ID=self.lease_id)
        broken = anyio.Event()

        async def reader() -> None:
            seen: SessionState | None = None
            try:
                while True:
                    resp = await stream.receive()
                    self.keepalives += 1
                    st = self._clock.replied(resp.TTL, anyio.current_time())
                    if st is SessionState.LOST:
                        self._mark_lost()
                        outer.cancel()
                        return
                    if st is not seen:
                        seen = st
                        self._state_may_have_changed()
            except (errors.CoordError, anyio.EndOfStream):
                broken.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            try:
                first = True  # a new stream sends at once: the one before may have died with a request unanswered
                while not broken.is_set():
                    now = anyio.current_time()
                    if self._clock.overdue(now):
                        # the last keep-alive is overdue: this member may be frozen; try another one
                        self._client._transport.report_failure(stream.endpoint)
                        break
                    if first or now >= self._clock.next_send():
                        first = False
                        self._clock.sent(now)
                        await stream.send(request)
                        self._sweep_places()
                    with anyio.move_on_after(max(self._clock.next_check() - anyio.current_time(), 0.0)):
                        await broken.wait()
            except errors.CoordError:
                pass
            tg.cancel_scope.cancel()


def _nothing() -> None:
    pass


def _new_lease_id() -> int:
    return secrets.randbits(62) | 1 << 61  # positive, non-zero, with a high nibble like etcd's IDs


async def _grant(client: Client, ttl: int, tried: list[int]) -> tuple[int, float, int]:
    """(lease ID, send time of the first grant attempt, granted TTL). Repeats a grant whose answer was lost.
    Every ID it sent is appended to ``tried`` (so a caller can revoke them if this is cancelled)."""
    lease_id = _new_lease_id()
    tried.append(lease_id)
    sent_at = anyio.current_time()
    uncertain = False
    while True:
        try:
            resp = await client._call("LeaseGrant", rpc_pb2.LeaseGrantRequest(TTL=ttl, ID=lease_id), idempotent=False)
            return lease_id, sent_at, int(resp.TTL)
        except errors.OutcomeUnknown:
            uncertain = True
        except errors.InvalidRequest as exc:
            if "lease already exists" not in exc.details:
                raise
            if uncertain:  # our earlier attempt was applied
                info = await client.lease_info(lease_id)
                if info.ttl < 0:
                    raise errors.SessionExpired(f"lease {lease_id:x} expired right after it was granted") from exc
                return lease_id, sent_at, int(info.granted_ttl)
            tried.remove(lease_id)  # someone else's lease: never revoke it, pick another ID
            lease_id = _new_lease_id()
            tried.append(lease_id)
            sent_at = anyio.current_time()


async def _revoke_quietly(client: Client, lease_id: int) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_BOUND):
        with contextlib.suppress(errors.CoordError):
            await client.revoke_lease(lease_id)


@contextlib.asynccontextmanager
async def open_session(client: Client, ttl: int) -> AsyncIterator[Session]:
    if ttl <= 0:
        raise ValueError("ttl must be a positive number of seconds")
    tried: list[int] = []
    try:
        lease_id, sent_at, granted = await _grant(client, ttl, tried)
    except BaseException:
        for lid in tried:  # a cancelled or failed grant may still have been applied: leak nothing
            await _revoke_quietly(client, lid)
        raise
    session = Session(client, lease_id, LeaseClock(sent_at, granted))
    try:
        bg = await client._spawn(session._keepalive)
    except BaseException:
        await _revoke_quietly(client, lease_id)
        raise
    try:
        yield session
    finally:
        session._closed = True
        places = list(session._places.values())
        session._places.clear()
        for place in places:
            place.close()
        await bg.aclose()
        if not session._lost.is_set():
            await _revoke_quietly(client, lease_id)
        session._clock.revoked()
        session._mark_lost()


def lock_key(name: Key, lease_id: int) -> tuple[bytes, bytes]:
    """(queue prefix, own key) as etcd's concurrency recipes and etcdctl name them: ``<name>/<lease %x>``."""
    pfx = to_bytes(name) + b"/"
    return pfx, pfx + f"{lease_id:x}".encode()
