"""etcdserverpb.Cluster for a single member: MemberList, and etcd's refusals for changes."""

from __future__ import annotations

from coord._pb import rpc_pb2

from .. import errors
from ..errors import Code, EtcdError
from ..node import Node
from ..rpc import CallContext, Kind, Method

# With etcd's strict reconfiguration check, one started member out of two is not a quorum.
NOT_ENOUGH_STARTED = EtcdError(Code.FAILED_PRECONDITION,
                               "etcdserver: re-configuration failed due to not enough started members")
NOT_LEARNER = EtcdError(Code.FAILED_PRECONDITION, "etcdserver: can only promote a learner member")


class ClusterService:
    def __init__(self, node: Node) -> None:
        self.node = node

    def _members(self) -> list[rpc_pb2.Member]:
        cfg = self.node.config
        return [rpc_pb2.Member(ID=self.node.member_id, name=cfg.name,
                               peerURLs=cfg.initial_advertise_peer_urls, clientURLs=cfg.advertise_client_urls)]

    def _header(self) -> rpc_pb2.ResponseHeader:
        # Cluster responses carry identity and term but no revision (etcd 3.4 quirk).
        return self.node.header(0)

    async def member_list(self, req: rpc_pb2.MemberListRequest, ctx: CallContext) -> rpc_pb2.MemberListResponse:
        return rpc_pb2.MemberListResponse(header=self._header(), members=self._members())

    async def member_add(self, req: rpc_pb2.MemberAddRequest, ctx: CallContext) -> rpc_pb2.MemberAddResponse:
        raise NOT_ENOUGH_STARTED

    async def member_remove(self, req: rpc_pb2.MemberRemoveRequest,
                            ctx: CallContext) -> rpc_pb2.MemberRemoveResponse:
        if req.ID != self.node.member_id:
            raise errors.MEMBER_NOT_FOUND
        raise NOT_ENOUGH_STARTED

    async def member_update(self, req: rpc_pb2.MemberUpdateRequest,
                            ctx: CallContext) -> rpc_pb2.MemberUpdateResponse:
        if req.ID != self.node.member_id:
            raise errors.MEMBER_NOT_FOUND
        if sorted(req.peerURLs) != sorted(self.node.config.initial_advertise_peer_urls):
            raise NOT_ENOUGH_STARTED
        return rpc_pb2.MemberUpdateResponse(header=self._header(), members=self._members())

    async def member_promote(self, req: rpc_pb2.MemberPromoteRequest,
                             ctx: CallContext) -> rpc_pb2.MemberPromoteResponse:
        if req.ID != self.node.member_id:
            raise errors.MEMBER_NOT_FOUND
        raise NOT_LEARNER


def methods(node: Node) -> list[Method]:
    svc = ClusterService(node)
    p = "/etcdserverpb.Cluster/"
    return [
        Method(p + "MemberList", Kind.UNARY, rpc_pb2.MemberListRequest, rpc_pb2.MemberListResponse,
               svc.member_list),
        Method(p + "MemberAdd", Kind.UNARY, rpc_pb2.MemberAddRequest, rpc_pb2.MemberAddResponse, svc.member_add),
        Method(p + "MemberRemove", Kind.UNARY, rpc_pb2.MemberRemoveRequest, rpc_pb2.MemberRemoveResponse,
               svc.member_remove),
        Method(p + "MemberUpdate", Kind.UNARY, rpc_pb2.MemberUpdateRequest, rpc_pb2.MemberUpdateResponse,
               svc.member_update),
        Method(p + "MemberPromote", Kind.UNARY, rpc_pb2.MemberPromoteRequest, rpc_pb2.MemberPromoteResponse,
               svc.member_promote),
    ]
