"""etcdserverpb.Maintenance: Status, Alarm, Hash, HashKV, Defragment, MoveLeader."""

from __future__ import annotations

import crc32c

from coord._pb import rpc_pb2

from .. import errors
from .._version import SERVER_VERSION
from ..node import Node, alarm_member
from ..rpc import CallContext, Kind, Method


def alarm_text(member: int, alarm: int) -> str:
    """An AlarmMember in Go's protobuf text form, trailing space included (etcd's Status.errors)."""
    return f"memberID:{member} alarm:{rpc_pb2.AlarmType.Name(alarm)} "


class MaintenanceService:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def status(self, req: rpc_pb2.StatusRequest, ctx: CallContext) -> rpc_pb2.StatusResponse:
        node = self.node
        index = node.writer.raft_index
        resp = rpc_pb2.StatusResponse(
            version=SERVER_VERSION, dbSize=node.backend.size(), leader=node.member_id, raftIndex=index,
            raftTerm=node.term, raftAppliedIndex=index, dbSizeInUse=node.backend.size_in_use(),
            errors=[alarm_text(m, a) for m, a in sorted(node.alarms)])
        resp.header.CopyFrom(node.header())
        return resp

    async def alarm(self, req: rpc_pb2.AlarmRequest, ctx: CallContext) -> rpc_pb2.AlarmResponse:
        """GET lists alarms; ACTIVATE/DEACTIVATE go through the write path. The reply has no header."""
        node = self.node
        if req.action == rpc_pb2.AlarmRequest.GET:
            affected = node.apply_alarm(req.action, req.memberID, req.alarm)
        else:
            affected = await node.writer.submit(lambda: node.apply_alarm(req.action, req.memberID, req.alarm))
        return rpc_pb2.AlarmResponse(alarms=[alarm_member(m, a) for m, a in affected])

    async def hash(self, req: rpc_pb2.HashRequest, ctx: CallContext) -> rpc_pb2.HashResponse:
        """CRC-32C of every backend record (our file format, so it cannot equal etcd's)."""
        node = self.node

        def compute() -> int:
            h = 0
            for db in (b"key", b"meta", b"alarm", b"lease", b"auth"):
                h = crc32c.crc32c(db, h)
                for k, v in node.backend.items(db):
                    h = crc32c.crc32c(v, crc32c.crc32c(k, h))
            return h

        value = await node.writer.exclusive(compute)
        resp = rpc_pb2.HashResponse(hash=value)
        resp.header.CopyFrom(node.header())
        return resp

    async def hash_kv(self, req: rpc_pb2.HashKVRequest, ctx: CallContext) -> rpc_pb2.HashKVResponse:
        node = self.node
        current = node.visible_rev
        value, _ = node.store.hash_kv(req.revision, current)
        resp = rpc_pb2.HashKVResponse(hash=value, compact_revision=node.store.compact_rev)
        resp.header.CopyFrom(node.header(current))
        return resp

    async def defragment(self, req: rpc_pb2.DefragmentRequest, ctx: CallContext) -> rpc_pb2.DefragmentResponse:
        """Compacting copy of the backend; reads keep being served from memory meanwhile."""
        await self.node.writer.exclusive(self.node.backend.defragment)
        return rpc_pb2.DefragmentResponse()

    async def move_leader(self, req: rpc_pb2.MoveLeaderRequest, ctx: CallContext) -> rpc_pb2.MoveLeaderResponse:
        if req.targetID != self.node.member_id:
            raise errors.BAD_LEADER_TRANSFEREE
        return rpc_pb2.MoveLeaderResponse()


def methods(node: Node) -> list[Method]:
    svc = MaintenanceService(node)
    p = "/etcdserverpb.Maintenance/"
    return [
        Method(p + "Status", Kind.UNARY, rpc_pb2.StatusRequest, rpc_pb2.StatusResponse, svc.status),
        Method(p + "Alarm", Kind.UNARY, rpc_pb2.AlarmRequest, rpc_pb2.AlarmResponse, svc.alarm),
        Method(p + "Hash", Kind.UNARY, rpc_pb2.HashRequest, rpc_pb2.HashResponse, svc.hash),
        Method(p + "HashKV", Kind.UNARY, rpc_pb2.HashKVRequest, rpc_pb2.HashKVResponse, svc.hash_kv),
        Method(p + "Defragment", Kind.UNARY, rpc_pb2.DefragmentRequest, rpc_pb2.DefragmentResponse,
               svc.defragment),
        Method(p + "MoveLeader", Kind.UNARY, rpc_pb2.MoveLeaderRequest, rpc_pb2.MoveLeaderResponse,
               svc.move_leader),
    ]
