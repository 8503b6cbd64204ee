"""v3electionpb.Election: Campaign, Proclaim, Leader, Observe, Resign — etcd's Election recipe run
inside the server (see recipes.py). Every error is gRPC Unknown, as etcd answers."""

from __future__ import annotations

from collections.abc import AsyncIterator

from coord._pb import kv_pb2, rpc_pb2, v3election_pb2

from ..errors import Code, EtcdError
from ..mvcc import prefix_end
from ..node import Node
from ..rpc import CallContext, Kind, Method
from .recipes import CREATE, EQUAL, ERR_SESSION_EXPIRED, Recipes, unknown, waiter_key

PUT = kv_pb2.Event.PUT
DELETE = kv_pb2.Event.DELETE

ERR_NOT_LEADER = "election: not leader"
ERR_NO_LEADER = "election: no leader"
ERR_MISSING_LEADER = '"leader" field must be provided'


def _is_leader(key: bytes, rev: int) -> list[rpc_pb2.Compare]:
    return [rpc_pb2.Compare(key=key, target=CREATE, result=EQUAL, create_revision=rev)]


class ElectionService:
    def __init__(self, node: Node) -> None:
        self.recipes = Recipes(node)

    async def _proclaim(self, key: bytes, rev: int, lease: int, value: bytes) -> rpc_pb2.TxnResponse:
        resp = await self.recipes.txn(rpc_pb2.TxnRequest(
            compare=_is_leader(key, rev),
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))]))
        if not resp.succeeded:
            raise EtcdError(Code.UNKNOWN, ERR_NOT_LEADER)
        return resp

    async def _resign(self, key: bytes, rev: int) -> rpc_pb2.TxnResponse:
        return await self.recipes.txn(rpc_pb2.TxnRequest(
            compare=_is_leader(key, rev),
            success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))]))

    async def campaign(self, req: v3election_pb2.CampaignRequest,
                       ctx: CallContext) -> v3election_pb2.CampaignResponse:
        """Block until ``req.lease``'s key is the oldest under ``<name>/``. Cancellation resigns.
        Raises Unknown errors."""
        r = self.recipes
        try:
            lease = await r.session_lease(req.lease, "Campaign")
            prefix = req.name + b"/"
            key = waiter_key(prefix, lease)
            resp = await r.txn(rpc_pb2.TxnRequest(
                compare=_is_leader(key, 0),
                success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=req.value, lease=lease))],
                failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))]))
            rev = resp.header.revision
            if not resp.succeeded:  # already campaigning with this lease: keep the place, update the value
                kv = resp.responses[0].response_range.kvs[0]
                rev = kv.create_revision
                if kv.value != req.value:
                    try:
                        await self._proclaim(key, rev, lease, req.value)
                    except EtcdError:
                        await self._resign(key, rev)
                        raise
        except EtcdError as exc:
            raise unknown(exc) from None
        try:
            await r.wait_deletes(prefix, rev - 1)
            if not await r.still_mine(key, rev):
                raise EtcdError(Code.UNKNOWN, ERR_SESSION_EXPIRED)
        except BaseException as exc:
            if not isinstance(exc, EtcdError):  # cancelled or timed out: give the place up
                await r.cleanup_delete(key)
                raise
            raise unknown(exc) from None
        leader = v3election_pb2.LeaderKey(name=req.name, key=key, rev=rev, lease=lease)
        return v3election_pb2.CampaignResponse(header=resp.header, leader=leader)

    async def proclaim(self, req: v3election_pb2.ProclaimRequest,
                       ctx: CallContext) -> v3election_pb2.ProclaimResponse:
        """Update the leader's value if ``req.leader`` still leads. Raises Unknown errors."""
        if not req.HasField("leader"):
            raise EtcdError(Code.UNKNOWN, ERR_MISSING_LEADER)
        try:
            leader = req.leader
            lease = await self.recipes.session_lease(leader.lease, "Proclaim")
            resp = await self._proclaim(leader.key, leader.rev, lease, req.value)
        except EtcdError as exc:
            raise unknown(exc) from None
        return v3election_pb2.ProclaimResponse(header=resp.header)

    async def resign(self, req: v3election_pb2.ResignRequest, ctx: CallContext) -> v3election_pb2.ResignResponse:
        """Delete the leader key if ``req.leader`` still holds it (else nothing). Raises Unknown errors."""
        if not req.HasField("leader"):
            raise EtcdError(Code.UNKNOWN, ERR_MISSING_LEADER)
        try:
            await self.recipes.session_lease(req.leader.lease, "Resign")
            resp = await self._resign(req.leader.key, req.leader.rev)
        except EtcdError as exc:
            raise unknown(exc) from None
        return v3election_pb2.ResignResponse(header=resp.header)

    async def leader(self, req: v3election_pb2.LeaderRequest, ctx: CallContext) -> v3election_pb2.LeaderResponse:
        """The oldest key under ``<name>/``. Raises Unknown "election: no leader"."""
        resp = await self.recipes.first_created(req.name + b"/")
        if not resp.kvs:
            raise EtcdError(Code.UNKNOWN, ERR_NO_LEADER)
        return v3election_pb2.LeaderResponse(header=resp.header, kv=resp.kvs[0])

    async def observe(self, req: v3election_pb2.LeaderRequest,
                      ctx: CallContext) -> AsyncIterator[v3election_pb2.LeaderResponse]:
        """Every leader and proclamation, in order (etcd's Election.observe). Never ends by itself."""
        r = self.recipes
        prefix = req.name + b"/"
        while True:
            resp = await r.first_created(prefix)
            if resp.kvs:
                header, kv = resp.header, resp.kvs[0]
            else:
                # wait for the first put under the prefix (a delete would make the loop spin)
                found: tuple[rpc_pb2.ResponseHeader, kv_pb2.KeyValue] | None = None
                async with r.watching(prefix, prefix_end(prefix), resp.header.revision) as w:
                    while found is None:
                        wr = await w.next()
                        if wr.compact_revision:
                            return
                        for ev in wr.events:
                            if ev.type == PUT:
                                h = rpc_pb2.ResponseHeader()
                                h.CopyFrom(wr.header)
                                h.revision = ev.kv.mod_revision
                                found = (h, ev.kv)
                                break
                header, kv = found
            yield v3election_pb2.LeaderResponse(header=header, kv=kv)
            async with r.watching(kv.key, b"", header.revision + 1) as w:
                deleted = False
                while not deleted:
                    wr = await w.next()
                    if wr.compact_revision:
                        return
                    for ev in wr.events:
                        if ev.type == DELETE:
                            deleted = True
                            break
                        yield v3election_pb2.LeaderResponse(header=wr.header, kv=ev.kv)


def methods(node: Node) -> list[Method]:
    svc = ElectionService(node)
    p = "/v3electionpb.Election/"
    E = v3election_pb2
    return [
        Method(p + "Campaign", Kind.UNARY, E.CampaignRequest, E.CampaignResponse, svc.campaign),
        Method(p + "Proclaim", Kind.UNARY, E.ProclaimRequest, E.ProclaimResponse, svc.proclaim),
        Method(p + "Leader", Kind.UNARY, E.LeaderRequest, E.LeaderResponse, svc.leader),
        Method(p + "Observe", Kind.SERVER_STREAM, E.LeaderRequest, E.LeaderResponse, svc.observe),
        Method(p + "Resign", Kind.UNARY, E.ResignRequest, E.ResignResponse, svc.resign),
    ]
