"""Resumable watches, multiplexed: every watch of a client shares one gRPC Watch stream.

The client's *watch hub* (a background task of the client, started by the first watch) owns one Watch
stream at a time, on the current endpoint, and runs every watcher on it under its own ``watch_id`` (chosen
by the client, never reused): opening a watch sends a create request on the open stream and closing it
sends a cancel request, so waiting for a key costs two small messages, not a new gRPC call. Replies are
routed by ``watch_id``; a create refused by the server comes back with ``watch_id`` -1, and is matched to its
request by order (the server answers the creates of one stream in the order it received them).

Each watcher remembers the next revision it needs (last delivered + 1, or the creation revision + 1 for a
watch "from now"). Whenever the stream breaks — connection reset, server restart, failover to another member,
a stream that stopped answering — the hub opens a new one and re-creates every watcher from exactly there.
Nothing is delivered twice (revisions below the next one are dropped) and nothing is skipped (the server
replays from the next revision). If the history a watcher needs was compacted meanwhile, that watcher gets
:class:`Compacted`; the others go on.

Backpressure without head-of-line blocking: a watch buffers up to ``BUFFER`` revisions for its reader. When
the buffer is full the hub cancels that watcher on the server and re-creates it from its next revision once
the reader has caught up, so a slow reader never stalls the other watches of the stream.

Dead streams: when nothing arrived for ``probe_interval`` seconds while watchers exist, the hub sends a
progress request; if that is not answered within another interval, the stream is considered dead and
replaced (on another endpoint if there is one). A stream without watchers for that long is closed.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _errors as errors
from ._pb import rpc_pb2
from ._transport import METHODS, PushStream
from ._types import Event, Key, WatchBatch, WatchFilter, range_of

if TYPE_CHECKING:
    from ._client import Client

log = logging.getLogger("coord")

BUFFER = 64  # revisions buffered between the hub and a slow reader (then that watcher is paused)
RECONNECT_PAUSE = 0.05
_WATCH = METHODS["Watch"]
_HASLEADER = (("hasleader", "true"),)
_PROGRESS = rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())


class _Watcher:
    """One watch as the hub runs it. Subclasses decide what happens to its revisions (:meth:`deliver`) and
    to its end (:meth:`fail`); both are called from the hub's task and must not block."""

    def __init__(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        start_revision: int = 0,
        prev_kv: bool = False,
        filters: tuple[int, ...] = (),
    ) -> None:
        self.key = key
        self.range_end = range_end
        self.next_rev = start_revision
        """The next revision to deliver (0: "from now", until the server confirmed the watch)."""
        self.prev_kv = prev_kv
        self.filters = filters
        self.wid = 0  # its watch_id on the current stream (0: not created there)
        self.fragments: list[Any] = []
        self.created = anyio.Event()
        """Set once the server confirmed the watch (or it failed)."""
        self.error: BaseException | None = None
        self.paused = False
        self.reauthed = False  # refused for its token once already: a second refusal is final
        self.hub: _WatchHub | None = None

    def deliver(self, batch: WatchBatch) -> bool:
        """Take one revision; False if there is no room now (the hub pauses the watcher)."""
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        """The watch ended with ``exc`` (it is no longer on the hub)."""
        self.error = exc
        self.created.set()

    def create_request(self) -> rpc_pb2.WatchRequest:
        create = rpc_pb2.WatchCreateRequest(
            key=self.key,
            range_end=self.range_end,
            start_revision=self.next_rev,
            progress_notify=True,
            filters=cast(Any, list(self.filters)),
            prev_kv=self.prev_kv,
            watch_id=self.wid,
            fragment=True,
        )
        return rpc_pb2.WatchRequest(create_request=create)


class _FeedWatcher(_Watcher):
    """Feeds a :class:`Watch` through a bounded memory stream."""

    def __init__(self, send: MemoryObjectSendStream[WatchBatch | BaseException], key: bytes, range_end: bytes,
                 **kw: Any) -> None:
        super().__init__(key, range_end, **kw)
        self.send = send

    def deliver(self, batch: WatchBatch) -> bool:
        try:
            self.send.send_nowait(batch)
        except anyio.WouldBlock:
            return False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the reader is gone; the watch is being closed
        return True

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        self.send.close()  # the reader drains what is buffered, then gets ``exc``


class _WatchHub:
    """Every watch of one client, on one Watch stream at a time. Made by ``Client._watch_hub()``; its
    :meth:`run` is a background task of the client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.live: dict[_Watcher, None] = {}  # watchers that want events (an insertion-ordered set)
        self.by_id: dict[int, _Watcher] = {}  # watchers created, or being created, on the current stream
        self.pending: deque[tuple[int, _Watcher]] = deque()  # creates sent on the current stream, not answered
        self.stream: PushStream | None = None
        self.next_id = 1
        self.wanted = anyio.Event()
        self.closed = False
        self.streams_opened = 0
        """Watch streams opened so far (for tests and metrics)."""
        self.creates = 0
        """Create requests sent so far (for tests and metrics)."""
        self.pauses = 0
        """Times a watcher was paused because its reader was behind (for tests and metrics)."""
        self.served = False
        self.failed: list[tuple[_Watcher, BaseException]] = []  # ended by a reply, told from the hub's task
        self.stream_auth = 0  # the transport's token generation when the stream was opened
        self.renew = False  # the token changed since: replace the stream (a create would be refused)

    # -- watchers (called by their owners; never block) -----------------------------------------------
    def add(self, w: _Watcher) -> None:
        """Start running ``w`` (its create request is sent at once if a stream is open). Raises ClientClosed."""
        if self.closed:
            raise errors.ClientClosed("the client is closed")
        w.hub = self
        self.live[w] = None
        if self.stream is not None:
            self._create(w)
        else:
            self.wanted.set()

    def remove(self, w: _Watcher) -> None:
        """Stop running ``w`` (a cancel request is sent if it is on the stream). Idempotent."""
        if w in self.live:
            del self.live[w]
            self._cancel(w)

    def resume(self, w: _Watcher) -> None:
        """Re-create a paused watcher from its next revision (its reader made room)."""
        if w.paused and w in self.live:
            w.paused = False
            if self.stream is not None:
                self._create(w)

    def _create(self, w: _Watcher) -> None:
        assert self.stream is not None
        if self.stream_auth != self.client._transport._auth_generation:
            # The server checks a create against the token the stream was opened with, which was renewed
            # since (it may have expired): re-create every watcher on a stream with the current token.
            self.renew = True
            self.stream.poke()
            return
        w.wid = self.next_id
        self.next_id += 1
        self.creates += 1
        w.fragments = []
        self.by_id[w.wid] = w
        self.pending.append((w.wid, w))
        self.stream.send_nowait(w.create_request())

    def _cancel(self, w: _Watcher) -> None:
        wid, w.wid = w.wid, 0
        if wid and self.by_id.get(wid) is w:
            del self.by_id[wid]
            if self.stream is not None:
                self.stream.send_nowait(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=wid)))

    def _end(self, w: _Watcher, exc: BaseException) -> None:
        if w in self.live:
            del self.live[w]
            self._cancel(w)
            w.fail(exc)

    def _end_later(self, w: _Watcher, exc: BaseException) -> None:
        """End ``w`` from a reply: it leaves the stream now, its owner is told from the hub's task (``fail``
        may start tasks, which the reply's context must not)."""
        if w in self.live:
            del self.live[w]
            self._cancel(w)
            self.failed.append((w, exc))
            if self.stream is not None:
                self.stream.poke()

    def _tell_failed(self) -> None:
        failed, self.failed = self.failed, []
        for w, exc in failed:
            w.fail(exc)

    def _end_all(self, exc: BaseException) -> None:
        for w in list(self.live):
            self._end(w, exc)

    # -- the stream -------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Keep a stream open while watchers exist; never raises (failures end the watchers they concern)."""
        try:
            await self._run()
        except Exception as exc:
            log.exception("coord watch hub failed")
            self._end_all(errors.CoordError(f"the watch hub failed: {exc!r}"))
        finally:
            self.closed = True
            self._end_all(errors.ClientClosed("the client is closed"))

    async def _run(self) -> None:
        transport = self.client._transport
        failing_since: float | None = None
        while True:
            if not self.live:
                self.wanted = anyio.Event()
                await self.wanted.wait()
                failing_since = None
                continue
            self.served = False
            auth_generation = transport._auth_generation
            try:
                async with transport.open_push_stream(
                    _WATCH, metadata=_HASLEADER, on_message=self._dispatch
                ) as stream:
                    self.streams_opened += 1
                    self._attach(stream, auth_generation)
                    try:
                        await self._serve(stream)
                    finally:
                        self._detach()
                        self._tell_failed()
                failing_since = None
                continue  # closed for idleness
            except (errors.Unavailable, errors.AuthenticationFailed, _Reconnect, anyio.EndOfStream) as exc:
                try:
                    if isinstance(exc, errors.AuthenticationFailed):
                        if "invalid auth token" not in exc.details:
                            raise
                        await transport.authenticate()
                    if isinstance(exc, _Reconnect) and exc.reauth:
                        await transport.authenticate()
                except errors.CoordError as fatal:
                    self._end_all(fatal)
                    continue
                now = anyio.current_time()
                if self.served:
                    failing_since = None
                if failing_since is None:
                    failing_since = now
                elif now - failing_since > transport.retry_window:
                    gone = errors.Unavailable(f"watch could not be resumed: {exc}")
                    gone.__cause__ = exc
                    self._end_all(gone)
                    failing_since = None
                    continue
                await anyio.sleep(RECONNECT_PAUSE)
            except errors.CoordError as exc:
                self._end_all(exc)  # the server refused the stream itself (e.g. permission denied)

    def _attach(self, stream: PushStream, auth_generation: int) -> None:
        self.stream = stream
        self.stream_auth = auth_generation
        self.renew = False
        self.by_id.clear()
        self.pending.clear()
        for w in self.live:
            w.wid = 0
            if not w.paused:
                self._create(w)

    def _detach(self) -> None:
        self.stream = None
        self.by_id.clear()
        self.pending.clear()
        for w in self.live:
            w.wid = 0
            w.fragments = []

    async def _serve(self, stream: PushStream) -> None:
        """Watch over the stream (its replies are routed by :meth:`_dispatch` as they arrive) until it breaks
        (raises) or stayed idle, without watchers, for an interval."""
        interval = self.client.watch_probe_interval
        probing = False
        while True:
            seen = stream.received
            woken = False
            with anyio.move_on_after(interval):
                await stream.receive_many()
                woken = True
            if stream.received:
                self.served = True
            if woken:
                self._tell_failed()
                if self.renew:
                    raise _Reconnect("the auth token was renewed")
                continue
            if stream.received != seen:
                probing = False
                continue
            if not self.live:
                return
            if probing:
                self.client._transport.report_failure(stream.endpoint)
                raise _Reconnect(f"watch stream to {stream.endpoint} did not answer a progress request")
            probing = True
            stream.send_nowait(_PROGRESS)

    def _dispatch(self, msg: Any) -> None:
        """Route one reply. Runs in the transport's asyncio context, as the reply arrives: only non-blocking
        work here (see :meth:`Transport.open_push_stream`)."""
        wid = msg.watch_id
        if msg.created:
            if not self.pending:
                raise _Reconnect("the server confirmed a watch that was not requested")
            sent, w = self.pending.popleft()
            if self.by_id.get(sent) is not w:
                return  # closed or paused before the server answered (its cancel request is on the way)
            if wid != sent and wid != -1:
                # a server that assigns its own IDs: follow it
                del self.by_id[sent]
                self.by_id[wid] = w
                w.wid = wid
            if msg.canceled:
                self._refused(w, msg)
                return
            if w.next_rev == 0:
                w.next_rev = msg.header.revision + 1
            w.reauthed = False
            w.created.set()
            if not msg.events:
                return
        if wid == -1:
            return  # the answer to a progress request: the stream is alive
        found = self.by_id.get(wid)
        if found is None:
            return  # the answer to our cancel, or events of a watcher we cancelled
        w = found
        if msg.canceled:
            self._refused(w, msg)
            return
        if msg.fragment:
            w.fragments.extend(msg.events)
            return
        events = [*w.fragments, *msg.events] if w.fragments else msg.events
        w.fragments = []
        if not events:
            # A progress notification for this watcher: every event up to that revision was sent.
            w.next_rev = max(w.next_rev, msg.header.revision + 1)
            return
        for batch in _batches(events):
            if batch.revision < w.next_rev:
                continue  # already delivered before a reconnect
            if not w.deliver(batch):
                w.paused = True  # the reader is behind: re-created from next_rev once it made room
                self.pauses += 1
                self._cancel(w)
                return
            w.next_rev = batch.revision + 1
            if w.wid != wid:
                return  # removed by its owner while taking the batch

    def _refused(self, w: _Watcher, msg: Any) -> None:
        """The server cancelled ``w`` (or refused to create it)."""
        self.by_id.pop(w.wid, None)
        w.wid = 0
        if msg.compact_revision:
            self._end_later(w, errors.Compacted(
                f"watch needs revision {w.next_rev}, history compacted up to {msg.compact_revision}",
                compact_revision=msg.compact_revision,
            ))
            return
        reason = msg.cancel_reason
        token_trouble = "invalid auth token" in reason or "user name is empty" in reason
        if token_trouble and self.client._transport._user is not None and not w.reauthed:
            # The stream's token expired (etcd answers either text): renew it and re-create on a new stream.
            w.reauthed = True
            raise _Reconnect(reason, reauth=True)
        if not reason or "no leader" in reason:
            raise _Reconnect(reason or "the server cancelled the watch")
        if "permission denied" in reason.lower():
            exc: errors.CoordError = errors.PermissionDenied(reason, details=reason)
        elif token_trouble or "authentication" in reason:
            exc = errors.AuthenticationFailed(reason, details=reason)
        else:
            exc = errors.ServerError(f"watch refused: {reason}", details=reason)
        self._end_later(w, exc)


class _Reconnect(Exception):
    """The stream must be replaced (broken, silent, or its token expired)."""

    def __init__(self, reason: str, *, reauth: bool = False) -> None:
        super().__init__(reason)
        self.reauth = reauth


def _batches(events: Iterable[Any]) -> list[WatchBatch]:
    out: list[WatchBatch] = []
    current: list[Event] = []
    for pb in events:
        ev = Event.from_pb(pb)
        if current and current[-1].revision != ev.revision:
            out.append(WatchBatch(current[0].revision, tuple(current)))
            current = []
        current.append(ev)
    if current:
        out.append(WatchBatch(current[0].revision, tuple(current)))
    return out


class Watch:
    """The receiving end of a watch: ``async for event in watch`` yields :class:`Event` in revision order;
    :meth:`receive_batch` / :meth:`batches` give whole revisions (:class:`WatchBatch`).

    Receiving is a checkpoint. Raises Compacted (with ``compact_revision``) when the history needed to
    resume is gone, Unavailable when no endpoint could be reached within the client's retry window, or
    the server's refusal (PermissionDenied, ...); once raised, every later receive raises it again.
    """

    def __init__(
        self,
        receive: MemoryObjectReceiveStream[WatchBatch | BaseException],
        _watcher: _Watcher | None = None,
    ) -> None:
        self._receive = receive
        self._watcher = _watcher
        self._pending: deque[Event] = deque()
        self._error: BaseException | None = None
        self.last_revision = 0
        """The revision of the last batch handed out (0 before the first)."""

    async def receive_batch(self) -> WatchBatch:
        """The next revision's events (or what is left of it when :meth:`receive` took some)."""
        if self._pending:
            events = tuple(self._pending)
            self._pending.clear()
            return WatchBatch(events[0].revision, events)
        if self._error is not None:
            raise self._error
        try:
            item = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError) as exc:
            if self._watcher is None or self._watcher.error is None:
                raise errors.ClientClosed("the watch is closed") from exc
            item = self._watcher.error
        if isinstance(item, BaseException):
            self._error = item
            raise item
        w = self._watcher
        if w is not None and w.paused and w.hub is not None:
            if self._receive.statistics().current_buffer_used <= BUFFER // 2:
                w.hub.resume(w)
        self.last_revision = item.revision
        return item

    async def receive(self) -> Event:
        """The next event."""
        if not self._pending:
            batch = await self.receive_batch()
            self._pending.extend(batch.events)
        return self._pending.popleft()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Event:
        return await self.receive()

    async def batches(self) -> AsyncIterator[WatchBatch]:
        """Whole revisions, forever (until an error is raised)."""
        while True:
            yield await self.receive_batch()


class _KeyWatcher(_Watcher):
    """An internal watch of one key that hands its revisions to ``on_batch(watcher, batch)`` and its end to
    ``on_error(watcher, exc)`` (both called from the hub's task; they must not block). Never paused."""

    def __init__(
        self,
        key: bytes,
        start_revision: int,
        on_batch: Callable[[_KeyWatcher, WatchBatch], None],
        on_error: Callable[[_KeyWatcher, BaseException], None],
        *,
        filters: tuple[int, ...] = (),
    ) -> None:
        super().__init__(key, start_revision=start_revision, filters=filters)
        self._on_batch = on_batch
        self._on_error = on_error

    def deliver(self, batch: WatchBatch) -> bool:
        self._on_batch(self, batch)
        return True

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        self._on_error(self, exc)


@contextlib.asynccontextmanager
async def open_watch(
    client: Client,
    key: Key,
    *,
    prefix: bool = False,
    range_end: Key | None = None,
    start_revision: int = 0,
    prev_kv: bool = False,
    filters: Iterable[WatchFilter] = (),
) -> AsyncIterator[Watch]:
    k, end = range_of(key, prefix=prefix, range_end=range_end)
    if not k:
        raise ValueError("a watch needs a key (use prefix=True with an empty key to watch everything)")
    if start_revision < 0:
        raise ValueError("start_revision must be >= 0")
    send, receive = anyio.create_memory_object_stream[WatchBatch | BaseException](BUFFER)
    w = _FeedWatcher(send, k, end, start_revision=start_revision, prev_kv=prev_kv,
                     filters=tuple(f.value for f in filters))
    hub = client._watch_hub()
    with receive, send:
        hub.add(w)
        try:
            await w.created.wait()
            if w.error is not None:
                raise w.error
            yield Watch(receive, w)
        finally:
            hub.remove(w)
