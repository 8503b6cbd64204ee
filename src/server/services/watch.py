"""etcdserverpb.Watch: the I/O shell around the watch hub (src/server/watch_hub.py).

Each Watch call is one :class:`~coord_server.watch_hub.WatchStream`. A reader task feeds
client requests into it; the call itself sends what the stream's outbox holds and, when
the outbox is empty, advances the catch-up of watchers that are behind. The transport
pulls responses only as fast as the client reads them, so a stalled client parks this
generator at ``yield`` while the hub bounds what waits for it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio

from coord._pb import rpc_pb2

from ..errors import EtcdError
from ..node import Node
from ..rpc import CallContext, Kind, Method

log = logging.getLogger("coord_server.watch")


class _Wake:
    """A reusable wake-up flag for one waiter."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


class WatchService:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def watch(self, requests: AsyncIterator[rpc_pb2.WatchRequest],
                    ctx: CallContext) -> AsyncIterator[rpc_pb2.WatchResponse | bytes]:
        """One watch stream. Stays open after the client half-closes (as etcd does);
        ends when the client cancels. Raises the request stream's error (e.g. an oversized
        message)."""
        node = self.node
        tg = node.background
        if tg is None:
            raise RuntimeError("watch stream outside a running server")
        wake = _Wake()
        stream = node.watch_hub.open_stream(wake.set)
        failure: list[EtcdError] = []
        scope = anyio.CancelScope()

        async def read() -> None:
            with scope:
                try:
                    async for req in requests:
                        stream.handle(req)
                except EtcdError as exc:
                    failure.append(exc)
                    wake.set()

        counters = node.counters
        counters.watch_streams += 1
        tg.start_soon(read)
        try:
            while True:
                if failure:
                    raise failure[0]
                batch = stream.ready()
                if batch:
                    for payload, events in batch:
                        yield payload  # the transport sends bytes as they are
                        stream.sent(events)
                elif stream.needs_catch_up():
                    await anyio.lowlevel.checkpoint()
                else:
                    await wake.wait()
        finally:
            scope.cancel()
            stream.close()
            counters.watch_streams -= 1


async def progress_notifier(node: Node) -> None:
    """etcd's progress ticker (``--experimental-watch-progress-notify-interval``). Never returns."""
    interval = node.config.watch_progress_notify_interval
    while True:
        await anyio.sleep(interval)
        node.watch_hub.progress_tick()


def methods(node: Node) -> list[Method]:
    svc = WatchService(node)
    return [Method("/etcdserverpb.Watch/Watch", Kind.BIDI_STREAM, rpc_pb2.WatchRequest, rpc_pb2.WatchResponse,
                   svc.watch)]
