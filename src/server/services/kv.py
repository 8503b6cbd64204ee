"""etcdserverpb.KV: Range, Put, DeleteRange, Txn, Compact."""

from __future__ import annotations

from coord._pb import rpc_pb2

from .. import backend as be
from .. import validation
from ..node import KV_OVERHEAD, Node
from ..rpc import CallContext, Kind, Method

# InternalRaftRequest field numbers etcd wraps each write in (for the size check).
_RAFT_FIELD = {"put": 4, "delete_range": 5, "txn": 6, "compaction": 7}


def _put_cost(req: rpc_pb2.PutRequest) -> int:
    return KV_OVERHEAD + len(req.key) + len(req.value)


def _txn_cost(req: rpc_pb2.TxnRequest) -> int:
    # etcd charges the puts of the larger branch (top level only).
    def side(ops: list[rpc_pb2.RequestOp]) -> int:
        return sum(_put_cost(op.request_put) for op in ops if op.WhichOneof("request") == "request_put")
    return max(side(list(req.success)), side(list(req.failure)))


class KVService:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def range(self, req: rpc_pb2.RangeRequest, ctx: CallContext) -> rpc_pb2.RangeResponse:
        """Read at the newest durable revision (or ``req.revision``). Not a checkpoint."""
        validation.check_range(req)
        node = self.node
        current = node.visible_rev
        res = node.store.range(req, current)
        resp = rpc_pb2.RangeResponse(kvs=res.kvs, more=res.more, count=res.count)
        resp.header.CopyFrom(node.header(current))
        return resp

    async def put(self, req: rpc_pb2.PutRequest, ctx: CallContext) -> rpc_pb2.PutResponse:
        validation.check_put(req)
        node = self.node
        node.check_request_size(_RAFT_FIELD["put"], req.ByteSize())
        node.check_quota(_put_cost(req))
        resp = await node.writer.submit(lambda: node.store.put(req))
        node.fill_header(resp.header)
        return resp

    async def delete_range(self, req: rpc_pb2.DeleteRangeRequest, ctx: CallContext) -> rpc_pb2.DeleteRangeResponse:
        validation.check_delete(req)
        node = self.node
        node.check_request_size(_RAFT_FIELD["delete_range"], req.ByteSize())
        resp = await node.writer.submit(lambda: node.store.delete_range(req))
        node.fill_header(resp.header)
        return resp

    async def txn(self, req: rpc_pb2.TxnRequest, ctx: CallContext) -> rpc_pb2.TxnResponse:
        validation.check_txn(req, self.node.config.max_txn_ops)
        node = self.node
        store = node.store
        if store.is_read_only_txn(req):
            resp = store.read_txn(req, node.visible_rev)
        else:
            node.check_request_size(_RAFT_FIELD["txn"], req.ByteSize())
            node.check_quota(_txn_cost(req))
            resp = await node.writer.submit(lambda: store.txn(req))
        node.fill_header(resp.header)
        return resp

    async def compact(self, req: rpc_pb2.CompactionRequest, ctx: CallContext) -> rpc_pb2.CompactionResponse:
        """Compact at ``req.revision``; with ``physical`` wait until the backend dropped the history."""
        node = self.node
        node.check_request_size(_RAFT_FIELD["compaction"], req.ByteSize())
        writer = node.writer

        def apply() -> None:
            node.store.compact(req.revision)
            writer.extra_ops.append((b"meta", be.SCHEDULED_COMPACT, be.pack_i64(req.revision)))
            writer.schedule_compaction(req.revision)

        await writer.submit(apply, barrier=True)
        if req.physical:
            await writer.wait_compaction()
        resp = rpc_pb2.CompactionResponse()
        node.fill_header(resp.header)
        return resp


def methods(node: Node) -> list[Method]:
    svc = KVService(node)
    p = "/etcdserverpb.KV/"
    return [
        Method(p + "Range", Kind.UNARY, rpc_pb2.RangeRequest, rpc_pb2.RangeResponse, svc.range),
        Method(p + "Put", Kind.UNARY, rpc_pb2.PutRequest, rpc_pb2.PutResponse, svc.put),
        Method(p + "DeleteRange", Kind.UNARY, rpc_pb2.DeleteRangeRequest, rpc_pb2.DeleteRangeResponse,
               svc.delete_range),
        Method(p + "Txn", Kind.UNARY, rpc_pb2.TxnRequest, rpc_pb2.TxnResponse, svc.txn),
        Method(p + "Compact", Kind.UNARY, rpc_pb2.CompactionRequest, rpc_pb2.CompactionResponse, svc.compact),
    ]
