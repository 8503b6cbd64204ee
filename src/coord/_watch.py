"""Resumable watches.

A watch is a background task of the client (the *pump*) that owns one gRPC Watch stream at a time and
feeds whole revisions into a bounded memory stream; the ``async with`` block reads them. The pump
remembers the next revision it needs (last delivered + 1, or the creation revision + 1 for a watch
"from now") and, whenever the stream breaks — connection reset, server restart, failover to another
member, a stream that stopped answering — opens a new one from exactly there. Nothing is delivered
twice (revisions below the next one are dropped) and nothing is skipped (the server replays from the
next revision). If the history it needs was compacted meanwhile, the reader gets :class:`Compacted`.

Dead streams: when nothing arrived for ``probe_interval`` seconds the pump sends a progress request;
if that is not answered within another interval, the stream is considered dead and replaced.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, cast

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _errors as errors
from ._pb import rpc_pb2
from ._transport import METHODS, BidiStream
from ._types import Event, Key, WatchBatch, WatchFilter, range_of

if TYPE_CHECKING:
    from ._client import Client

BUFFER = 64  # revisions buffered between the pump and a slow reader (then the server is backpressured)
RECONNECT_PAUSE = 0.05
_WATCH = METHODS["Watch"]
_HASLEADER = (("hasleader", "true"),)


class Watch:
    """The receiving end of a watch: ``async for event in watch`` yields :class:`Event` in revision order;
    :meth:`receive_batch` / :meth:`batches` give whole revisions (:class:`WatchBatch`).

    Receiving is a checkpoint. Raises Compacted (with ``compact_revision``) when the history needed to
    resume is gone, Unavailable when no endpoint could be reached within the client's retry window, or
    the server's refusal (PermissionDenied, ...); once raised, every later receive raises it again.
    """

    def __init__(self, receive: MemoryObjectReceiveStream[WatchBatch | BaseException]) -> None:
        self._receive = receive
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
            raise errors.ClientClosed("the watch is closed") from exc
        if isinstance(item, BaseException):
            self._error = item
            raise item
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


class _Reconnect(Exception):
    """The stream must be replaced (broken, silent, or its token expired)."""

    def __init__(self, reason: str, *, reauth: bool = False) -> None:
        super().__init__(reason)
        self.reauth = reauth


class _Pump:
    def __init__(
        self,
        client: Client,
        key: bytes,
        range_end: bytes,
        start_revision: int,
        prev_kv: bool,
        filters: tuple[int, ...],
        send: MemoryObjectSendStream[WatchBatch | BaseException],
        probe_interval: float,
    ) -> None:
        self.client = client
        self.key = key
        self.range_end = range_end
        self.next_rev = start_revision
        self.prev_kv = prev_kv
        self.filters = filters
        self.send = send
        self.probe_interval = probe_interval
        self.created = anyio.Event()
        self.error: BaseException | None = None
        self.reconnects = 0
        self.served = False

    async def run(self) -> None:
        try:
            await self._run()
        except errors.CoordError as exc:
            self.error = exc
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self.send.send(exc)
        finally:
            self.created.set()
            self.send.close()

    async def _run(self) -> None:
        transport = self.client._transport
        failing_since: float | None = None
        while True:
            self.served = False
            try:
                async with transport.open_stream(_WATCH, metadata=_HASLEADER) as stream:
                    await self._serve(stream)
            except (errors.Unavailable, errors.AuthenticationFailed, _Reconnect) as exc:
                now = anyio.current_time()
                if isinstance(exc, errors.AuthenticationFailed):
                    if "invalid auth token" not in exc.details:
                        raise
                    await transport.authenticate()
                if isinstance(exc, _Reconnect) and exc.reauth:
                    await transport.authenticate()
                if self.served:
                    failing_since = None
                if failing_since is None:
                    failing_since = now
                elif now - failing_since > transport.retry_window:
                    raise errors.Unavailable(f"watch could not be resumed: {exc}") from exc
                self.reconnects += 1
                await anyio.sleep(RECONNECT_PAUSE)
                continue

    async def _serve(self, stream: BidiStream) -> None:
        """Runs one stream until it breaks (_Reconnect / Unavailable) or a fatal CoordError."""
        create = rpc_pb2.WatchCreateRequest(
            key=self.key,
            range_end=self.range_end,
            start_revision=self.next_rev,
            progress_notify=True,
            filters=cast(Any, list(self.filters)),
            prev_kv=self.prev_kv,
            fragment=True,
        )
        await stream.send(rpc_pb2.WatchRequest(create_request=create))
        inbox_send, inbox = anyio.create_memory_object_stream[Any](16)
        with inbox, inbox_send:
            await self._serve_inbox(stream, inbox, inbox_send)

    async def _serve_inbox(
        self, stream: BidiStream, inbox: MemoryObjectReceiveStream[Any], inbox_send: MemoryObjectSendStream[Any]
    ) -> None:
        outcome: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_into, stream, inbox_send.clone())
            try:
                await self._consume(stream, inbox)
            except (errors.CoordError, _Reconnect) as exc:
                outcome = exc
            tg.cancel_scope.cancel()
        if outcome is not None:
            raise outcome

    async def _consume(self, stream: BidiStream, inbox: MemoryObjectReceiveStream[Any]) -> None:
        probing = False
        fragments: list[Any] = []
        while True:
            item: Any = None
            with anyio.move_on_after(self.probe_interval):
                item = await inbox.receive()
            if item is None:
                if probing:
                    self.client._transport.report_failure(stream.endpoint)
                    raise _Reconnect(f"watch stream to {stream.endpoint} did not answer a progress request")
                probing = True
                await stream.send(rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest()))
                continue
            if isinstance(item, BaseException):
                raise item
            probing = False
            self.served = True
            msg = item
            if msg.created:
                if msg.canceled:
                    self._refused(msg)
                if self.next_rev == 0:
                    self.next_rev = msg.header.revision + 1
                self.created.set()
                if not msg.events:
                    continue
            if msg.canceled:
                self._refused(msg)
            if msg.watch_id == -1:
                continue  # a reply to our progress request: the stream is alive
            if msg.fragment:
                fragments.extend(msg.events)
                continue
            events = [*fragments, *msg.events]
            fragments = []
            if not events:
                # A progress notification for this watcher: every event up to that revision was sent.
                self.next_rev = max(self.next_rev, msg.header.revision + 1)
                continue
            for batch in _batches(events):
                if batch.revision < self.next_rev:
                    continue  # already delivered before a reconnect
                await self.send.send(batch)
                self.next_rev = batch.revision + 1

    def _refused(self, msg: Any) -> None:
        if msg.compact_revision:
            raise errors.Compacted(
                f"watch needs revision {self.next_rev}, history compacted up to {msg.compact_revision}",
                compact_revision=msg.compact_revision,
            )
        reason = msg.cancel_reason
        if "invalid auth token" in reason:
            raise _Reconnect(reason, reauth=True)
        if not reason or "no leader" in reason:
            raise _Reconnect(reason or "the server cancelled the watch")
        if "permission denied" in reason.lower():
            raise errors.PermissionDenied(reason, details=reason)
        if "user name is empty" in reason or "authentication" in reason:
            raise errors.AuthenticationFailed(reason, details=reason)
        raise errors.ServerError(f"watch refused: {reason}", details=reason)


async def _read_into(stream: BidiStream, inbox: MemoryObjectSendStream[Any]) -> None:
    """Reads the gRPC stream into ``inbox``; a failure becomes the last item (never raised)."""
    with inbox:
        try:
            while True:
                await inbox.send(await stream.receive())
        except anyio.EndOfStream:
            await inbox.send(_Reconnect(f"the server ended the watch stream ({stream.endpoint})"))
        except errors.CoordError as exc:
            await inbox.send(exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


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
    pump = _Pump(
        client, k, end, start_revision, prev_kv, tuple(f.value for f in filters), send,
        client.watch_probe_interval,
    )
    watch = Watch(receive)
    with receive:
        bg = await client._spawn(pump.run)
        try:
            await pump.created.wait()
            if pump.error is not None:
                raise pump.error
            yield watch
        finally:
            await bg.aclose()
