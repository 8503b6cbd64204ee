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
from typing import Any

import grpc

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
