"""grpc.aio inside tests that each run their own event loop.

grpc.aio delivers the completions of its C core through one process-wide poller thread. When a call
is cancelled, the core finishes its outstanding operations a moment later and the poller hands them
to the loop the call was made on. If that loop has already closed (the test ended), the hand-over
raises "Event loop is closed" inside the *next* test's loop. grpc gives no handle to wait for those
completions (the Python side considers a cancelled call done at once), so a closed channel gets a
short settling pause while its loop is still alive. It is cleanup, never a pass/fail timing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from coord_server.app import Server, open_server
from coord_server.config import Config

SETTLE_SECONDS = 0.05


@contextlib.asynccontextmanager
async def aio_channel(target: str, **kwargs: Any) -> AsyncIterator[grpc.aio.Channel]:
    """An insecure grpc.aio channel, closed and settled on exit."""
    ch = grpc.aio.insecure_channel(target, **kwargs)
    try:
        yield ch
    finally:
        await ch.close()
        await asyncio.sleep(SETTLE_SECONDS)


# -- a coord-server in this process (tests of the asyncio server with grpc.aio on the same loop) -----


def server_config(data_dir: Path, **kw: Any) -> Config:
    """A Config for an in-process server on 127.0.0.1 port 0 in ``data_dir``."""
    return Config(data_dir=data_dir, listen_client_urls=["http://127.0.0.1:0"],
                  advertise_client_urls=["http://127.0.0.1:2379"], **kw)


@contextlib.asynccontextmanager
async def serving(data_dir: Path, **kw: Any) -> AsyncIterator[tuple[Server, str]]:
    """A running in-process server and its ``host:port``."""
    async with open_server(server_config(data_dir, **kw)) as server:
        host, port = server.addresses[0]
        yield server, f"{host}:{port}"


@contextlib.asynccontextmanager
async def serving_with_channel(data_dir: Path, **kw: Any) -> AsyncIterator[tuple[Server, grpc.aio.Channel]]:
    """A running in-process server and a grpc.aio channel to it (closed and settled on exit)."""
    async with serving(data_dir, **kw) as (server, target), aio_channel(target) as channel:
        yield server, channel
