"""v3lockpb.Lock: Lock and Unlock, etcd's Mutex run inside the server (see recipes.py).

Lock blocks until the caller's key is the oldest under ``<name>/``; the client's deadline or
cancellation ends the wait and removes the key. Every error is gRPC Unknown, as etcd answers.
"""

from __future__ import annotations

from coord._pb import rpc_pb2, v3lock_pb2

from ..errors import Code, EtcdError
from ..mvcc import prefix_end
from ..node import Node
from ..rpc import CallContext, Kind, Method
from .recipes import ASCEND, BY_CREATE, CREATE, EQUAL, ERR_SESSION_EXPIRED, Recipes, unknown, waiter_key


class LockService:
    def __init__(self, node: Node) -> None:
        self.recipes = Recipes(node)

    async def lock(self, req: v3lock_pb2.LockRequest, ctx: CallContext) -> v3lock_pb2.LockResponse:
        """Acquire ``req.name`` for ``req.lease`` (0: a fresh 60 s lease, as etcd). Blocks until
        acquired; cancellation removes the waiter's key. Raises Unknown errors."""
        r = self.recipes
        try:
            lease = await r.session_lease(req.lease, "Lock")
            prefix = req.name + b"/"
            key = waiter_key(prefix, lease)
            owner = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(
                key=prefix, range_end=prefix_end(prefix), limit=1, sort_order=ASCEND, sort_target=BY_CREATE))
            resp = await r.txn(rpc_pb2.TxnRequest(
                compare=[rpc_pb2.Compare(key=key, target=CREATE, result=EQUAL, create_revision=0)],
                success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, lease=lease)), owner],
                failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key)), owner]))
        except EtcdError as exc:
            raise unknown(exc) from None
        my_rev = resp.header.revision
        if not resp.succeeded:  # the same lease already queued here: re-entry
            my_rev = resp.responses[0].response_range.kvs[0].create_revision
        first = resp.responses[1].response_range.kvs
        if not first or first[0].create_revision == my_rev:
            return v3lock_pb2.LockResponse(header=resp.header, key=key)
        try:
            header = await r.wait_deletes(prefix, my_rev - 1)
            if not await r.still_mine(key, my_rev):
                raise EtcdError(Code.UNKNOWN, ERR_SESSION_EXPIRED)
        except BaseException as exc:
            await r.cleanup_delete(key)
            if isinstance(exc, EtcdError):
                raise unknown(exc) from None
            raise
        return v3lock_pb2.LockResponse(header=header, key=key)

    async def unlock(self, req: v3lock_pb2.UnlockRequest, ctx: CallContext) -> v3lock_pb2.UnlockResponse:
        """A plain delete of ``req.key`` (a missing key is fine). Raises Unknown errors."""
        try:
            resp = await self.recipes.delete(req.key)
        except EtcdError as exc:
            raise unknown(exc) from None
        return v3lock_pb2.UnlockResponse(header=resp.header)


def methods(node: Node) -> list[Method]:
    svc = LockService(node)
    p = "/v3lockpb.Lock/"
    return [
        Method(p + "Lock", Kind.UNARY, v3lock_pb2.LockRequest, v3lock_pb2.LockResponse, svc.lock),
        Method(p + "Unlock", Kind.UNARY, v3lock_pb2.UnlockRequest, v3lock_pb2.UnlockResponse, svc.unlock),
    ]
