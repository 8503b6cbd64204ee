"""Helpers of the client-port transport tests (tests/integration/test_transport.py, test_h2_transport.py).

``ASYNCIO_LOOPS`` parametrizes ``anyio_backend`` over plain asyncio and uvloop (the transport is asyncio code;
both loops must behave the same); :func:`listening` runs a bare ``ClientListener`` with test methods on
127.0.0.1 port 0; :func:`grpc_frame` is gRPC's length-prefixed message framing, written out by hand so that
raw HTTP/2 clients do not depend on the code under test; :class:`RawClient` is such a client (h2's state
machine over asyncio streams), which controls windows and frames exactly and never resets a stream by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from coord_server.rpc import Method
from coord_server.transport import ClientListener

ASYNCIO_LOOPS = [
    pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
]


@contextlib.asynccontextmanager
async def listening(methods: list[Method], **kwargs: Any) -> AsyncIterator[tuple[ClientListener, int]]:
    """A started ``ClientListener(methods, **kwargs)`` on 127.0.0.1 port 0, and its port; closed with a 1 s
    grace on exit."""
    listener = ClientListener(methods, **kwargs)
    port = await listener.start("127.0.0.1", 0)
    try:
        yield listener, port
    finally:
        await listener.close(grace=1.0)


def grpc_frame(message: bytes, flag: int = 0) -> bytes:
    """One gRPC message on the wire: the compressed ``flag`` byte, the 4-byte big-endian length, the bytes."""
    return bytes([flag]) + len(message).to_bytes(4, "big") + message


class RawClient:
    """An h2 client state machine over an asyncio connection, pumped by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 settings: dict[Any, int] | None = None) -> None:
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings or {})
        self.conn.initiate_connection()
        self.events: list[Any] = []
        self.closed = False

    @classmethod
    async def connect(cls, port: int, settings: dict[Any, int] | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer, settings)
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def call(self, path: str, body: bytes | None, end: bool = True, extra: list[tuple[str, str]] = ()) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
                   ("content-type", "application/grpc"), ("te", "trailers"), *extra]
        self.conn.send_headers(sid, headers, end_stream=end and body is None)
        if body is not None:
            self.send(sid, body, end)
        return sid

    def send(self, sid: int, body: bytes, end: bool = False) -> None:
        """Body bytes in frames of at most 16 KiB (the server's max frame size)."""
        for i in range(0, max(len(body), 1), 16384):
            piece = body[i : i + 16384]
            self.conn.send_data(sid, piece, end_stream=end and i + 16384 >= len(body))

    async def until(self, done: Callable[[], bool], ack: bool = True) -> None:
        """Read and process frames until ``done()`` (the test's deadline bounds this)."""
        await self.flush()
        while not done():
            data = await self.reader.read(65536)
            if not data:
                self.closed = True
                return
            for ev in self.conn.receive_data(data):
                self.events.append(ev)
                if ack and isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            await self.flush()

    async def read_for(self, seconds: float, ack: bool = True) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.until(lambda: False, ack)

    def of(self, kind: type, sid: int | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (sid is None or e.stream_id == sid)]

    def ended(self, sid: int) -> bool:
        return bool(self.of(h2.events.StreamEnded, sid) or self.of(h2.events.StreamReset, sid))

    def trailers(self, sid: int) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for ev in self.events:
            if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived) and ev.stream_id == sid:
                out.update(dict(ev.headers))
        return out

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
