"""Helpers of the client-port transport tests (tests/integration/test_transport.py, test_h2_transport.py).

``ASYNCIO_LOOPS`` parametrizes ``anyio_backend`` over plain asyncio and uvloop (the transport is asyncio code;
both loops must behave the same); :func:`listening` runs a bare ``ClientListener`` with test methods on
127.0.0.1 port 0; :func:`grpc_frame` is gRPC's length-prefixed message framing, written out by hand so that
raw HTTP/2 clients do not depend on the code under test.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

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
