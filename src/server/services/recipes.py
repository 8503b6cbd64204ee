"""etcd's concurrency recipes (clientv3/concurrency), run inside the server for v3lock and v3election.

etcd runs these through an in-process gRPC client; here they call the KV service functions and the
watch hub directly, so every step is the same request a client would make (same revisions, same
checks, same quota), without a network hop. The queue is revision-ordered: a waiter's key is
``<prefix><lease id in hex>``, and it waits only for the deletion of the key with the largest create
revision below its own (FIFO, no thundering herd).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from coord._pb import kv_pb2, rpc_pb2

from ..errors import Code, EtcdError
from ..mvcc import prefix_end
from ..node import Node
from ..rpc import CallContext
from ..watch_hub import WatchStream, as_response
from .kv import KVService
from .lease import LeaseService

log = logging.getLogger("coord_server.recipes")

DELETE = kv_pb2.Event.DELETE
ASCEND = rpc_pb2.RangeRequest.ASCEND
DESCEND = rpc_pb2.RangeRequest.DESCEND
BY_CREATE = rpc_pb2.RangeRequest.CREATE
CREATE = rpc_pb2.Compare.CREATE
EQUAL = rpc_pb2.Compare.EQUAL

SESSION_TTL = 60  # concurrency.NewSession's default TTL, used when a request names lease 0

ERR_SESSION_EXPIRED = "session expired"  # concurrency.ErrSessionExpired
ERR_COMPACTED = "etcdserver: mvcc: required revision has been compacted"


def unknown(exc: EtcdError) -> EtcdError:
    """v3lock and v3election answer every error as gRPC Unknown with the original message (their
    in-process client returns plain Go errors)."""
    return EtcdError(Code.UNKNOWN, exc.message)


def waiter_key(prefix: bytes, lease: int) -> bytes:
    """``<prefix><lease>`` with Go's ``%x`` (lowercase, no padding, a '-' for negative IDs)."""
    return prefix + b"%x" % lease


class Recipes:
    """The shared steps of Mutex and Election over one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.kv = KVService(node)
        self.ctx = CallContext()
        self._leases: LeaseService | None = None

    async def txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        return await self.kv.txn(req, self.ctx)

    async def range(self, req: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
        return await self.kv.range(req, self.ctx)

    async def delete(self, key: bytes) -> rpc_pb2.DeleteRangeResponse:
        return await self.kv.delete_range(rpc_pb2.DeleteRangeRequest(key=key), self.ctx)

    async def first_created(self, prefix: bytes) -> rpc_pb2.RangeResponse:
        """clientv3 ``WithFirstCreate``: the oldest key under ``prefix``."""
        return await self.range(rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix), limit=1,
                                                     sort_order=ASCEND, sort_target=BY_CREATE))

    async def session_lease(self, lease: int, what: str) -> int:
        """The lease a recipe runs under. Lease 0 makes etcd's NewSession grant a fresh 60 s lease that
        nobody keeps alive (the key vanishes about a minute later): done the same, with a warning."""
        if lease != 0:
            return lease
        if self._leases is None:
            self._leases = LeaseService(self.node)  # the Lease service owns grants
        resp = await self._leases.grant(rpc_pb2.LeaseGrantRequest(TTL=SESSION_TTL), self.ctx)
        granted = int(resp.ID)
        log.warning("%s with lease 0: granted lease %x with a %d s TTL that nobody keeps alive; "
                    "its key disappears when that lease expires", what, granted, SESSION_TTL)
        return granted

    @asynccontextmanager
    async def watching(self, key: bytes, range_end: bytes, start_revision: int) -> AsyncIterator[_Watch]:
        """An in-server watch on the hub (no gRPC stream): responses in order, as a client gets them."""
        w = _Watch(self.node)
        w.stream.create(rpc_pb2.WatchCreateRequest(key=key, range_end=range_end, start_revision=start_revision))
        try:
            yield w
        finally:
            w.stream.close()

    async def wait_delete(self, key: bytes, rev: int) -> None:
        """Return once ``key`` has a DELETE event at or after ``rev`` (concurrency.waitDelete)."""
        async with self.watching(key, b"", rev) as w:
            while True:
                resp = await w.next()
                if resp.compact_revision:
                    raise EtcdError(Code.UNKNOWN, ERR_COMPACTED)
                if any(ev.type == DELETE for ev in resp.events):
                    return

    async def wait_deletes(self, prefix: bytes, max_create_rev: int) -> rpc_pb2.ResponseHeader:
        """Wait until no key under ``prefix`` has a create revision <= ``max_create_rev`` (waitDeletes):
        only ever for the newest such key, so each waiter waits for its one predecessor."""
        while True:
            resp = await self.range(rpc_pb2.RangeRequest(
                key=prefix, range_end=prefix_end(prefix), limit=1, sort_order=DESCEND, sort_target=BY_CREATE,
                max_create_revision=max_create_rev))
            if not resp.kvs:
                return resp.header
            await self.wait_delete(resp.kvs[0].key, resp.header.revision)

    async def still_mine(self, key: bytes, create_rev: int) -> bool:
        """etcd #11456: after waiting, the waiter's own key must still be the one it queued with (its
        lease may have expired meanwhile, and then it must not be told that it holds the lock)."""
        resp = await self.range(rpc_pb2.RangeRequest(key=key))
        return bool(resp.kvs) and resp.kvs[0].create_revision == create_rev

    async def cleanup_delete(self, key: bytes) -> None:
        """Delete ``key`` even if the caller is being cancelled (a cancelled Lock removes its key)."""
        with anyio.CancelScope(shield=True):
            try:
                await self.delete(key)
            except EtcdError as exc:
                log.warning("could not remove %r after a failed wait: %s", key, exc.message)


class _Watch:
    """One internal watcher's responses."""

    def __init__(self, node: Node) -> None:
        self._event = anyio.Event()
        self.stream: WatchStream = node.watch_hub.open_stream(self._wake)
        self._ready: list[rpc_pb2.WatchResponse] = []

    def _wake(self) -> None:
        self._event.set()

    async def next(self) -> rpc_pb2.WatchResponse:
        """The next response that is not the created reply. A checkpoint."""
        while True:
            if self._ready:
                resp = self._ready.pop(0)
                if resp.created:
                    continue
                await anyio.lowlevel.checkpoint()
                return resp
            stream = self.stream
            batch = stream.ready()
            if batch:
                for payload, events in batch:
                    self._ready.append(as_response(payload))
                    stream.sent(events)
            elif stream.needs_catch_up():
                await anyio.lowlevel.checkpoint()
            else:
                await self._event.wait()
                self._event = anyio.Event()
