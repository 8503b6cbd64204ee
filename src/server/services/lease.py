"""etcdserverpb.Lease (LeaseGrant, LeaseRevoke, LeaseKeepAlive, LeaseTimeToLive, LeaseLeases) and
the expiry loop: the I/O shell around :mod:`coord_server.lessor`.

Grants and revokes change durable state, so they run in the write path (one log sync, like a
Put). Renewals do not: as in etcd they only move an in-memory deadline, which is why a restart
gives every lease its full TTL again (plus the election-timeout grace, see ``open_node``).

Expiry: :func:`run_expiry` sleeps until the lessor's next deadline (on the event loop's monotonic
clock, the same clock the lessor reads), takes what etcd's revoke rate allows, and revokes those
leases through the writer, in jobs of :data:`EXPIRE_JOB` leases. Each revoke re-checks at apply
time that its lease still exists and is still past its deadline, so a lease revoked, or revoked
and granted again, between the decision and the apply is left alone.

Lease queries read the lessor's applied state, but first wait until every grant or revoke
applied so far is durable (one log sync at most), so that no answer depends on a change a crash
could still undo.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from functools import partial

import anyio
from anyio.abc import TaskStatus

from coord._pb import rpc_pb2

from .. import errors
from ..lessor import LeaseExpired, apply_revoke, lease_op
from ..node import Node
from ..rpc import CallContext, Kind, Method

log = logging.getLogger("coord_server.lease")

LEASE_OVERHEAD = 64  # etcd's quota cost of a LeaseGrant
EXPIRE_JOB = 100  # expired leases revoked per write-path job (each its own revision if it has keys)


# ---------------------------------------------------------------------- write-path jobs (run in the writer)


def _revoke(node: Node, lease_id: int) -> int:
    """Revoke inside the write path; returns the store revision after it. Raises LEASE_NOT_FOUND."""
    _, _, op = apply_revoke(node.store, node.lessor, lease_id)
    node.writer.extra_ops.append(op)
    c = node.counters
    c.lease_revoked += 1
    c.leases = len(node.lessor)
    return node.store.rev


def _expire(node: Node, lease_ids: list[int]) -> int:
    """Revoke those of ``lease_ids`` that are still expired now; returns how many were revoked."""
    lessor = node.lessor
    done = 0
    for lease_id in lease_ids:
        # Re-checked at apply time: the lease may have been revoked (or revoked and granted
        # again under the same ID) since the expiry loop picked it.
        if lessor.is_expired(lease_id):
            _revoke(node, lease_id)
            node.counters.lease_expired += 1
            done += 1
    return done


# ---------------------------------------------------------------------- the expiry loop


async def run_expiry(node: Node, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Revoke leases as they expire, at most etcd's revoke rate; runs until cancelled.

    Never raises on a failed revoke: the lease is offered again by the lessor a few seconds
    later (and if the writer has failed, the server is stopping anyway).
    """
    lessor = node.lessor
    wake = anyio.Event()

    def on_earlier_deadline() -> None:
        wake.set()

    lessor.on_earlier_deadline = on_earlier_deadline
    task_status.started()
    try:
        while True:
            due = lessor.take_expired()
            for start in range(0, len(due), EXPIRE_JOB):
                chunk = due[start : start + EXPIRE_JOB]
                try:
                    revoked = await node.writer.submit(partial(_expire, node, chunk))
                except errors.EtcdError as exc:
                    log.warning("revoking %d expired leases failed: %s", len(chunk), exc.message)
                    continue
                log.debug("revoked %d expired leases", revoked)
            at = lessor.next_check()
            wake = anyio.Event()
            delay = math.inf if at is None else at - lessor.clock()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await wake.wait()
            else:
                await anyio.lowlevel.checkpoint()
    finally:
        lessor.on_earlier_deadline = None


# ---------------------------------------------------------------------- the service


class LeaseService:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._durable_mutations = node.lessor.mutations
        self._published: anyio.Event | None = None
        node.writer.publish_hooks.append(self._on_publish)

    def _on_publish(self, rev: int) -> None:
        # Everything applied so far is durable once the writer publishes.
        self._durable_mutations = self.node.lessor.mutations
        ev = self._published
        if ev is not None:
            self._published = None
            ev.set()

    async def _settled(self, *, keys: bool = False) -> None:
        """Wait until every lease change applied so far (and, with ``keys``, every key write) is durable."""
        node = self.node
        target = node.lessor.mutations
        target_rev = node.store.rev if keys else 0
        while self._durable_mutations < target or node.visible_rev < target_rev:
            if self._published is None:
                self._published = anyio.Event()
            await self._published.wait()

    async def grant(self, req: rpc_pb2.LeaseGrantRequest, ctx: CallContext) -> rpc_pb2.LeaseGrantResponse:
        """Raises NO_SPACE, LEASE_TTL_TOO_LARGE, LEASE_EXIST. A checkpoint."""
        node = self.node
        lessor = node.lessor
        node.check_quota(LEASE_OVERHEAD)
        lease_id = req.ID or lessor.new_id()
        ttl = req.TTL

        def apply() -> tuple[int, int]:
            lease = lessor.grant(lease_id, ttl)
            node.writer.extra_ops.append(lease_op(lease))
            node.counters.lease_granted += 1
            node.counters.leases = len(lessor)
            return lease.ttl, node.store.rev

        granted, rev = await node.writer.submit(apply)
        resp = rpc_pb2.LeaseGrantResponse(ID=lease_id, TTL=granted)
        resp.header.revision = rev
        node.fill_header(resp.header)
        return resp

    async def revoke(self, req: rpc_pb2.LeaseRevokeRequest, ctx: CallContext) -> rpc_pb2.LeaseRevokeResponse:
        """Delete the lease and all its keys in one revision. Raises LEASE_NOT_FOUND. A checkpoint."""
        node = self.node
        rev = await node.writer.submit(partial(_revoke, node, req.ID))
        resp = rpc_pb2.LeaseRevokeResponse()
        resp.header.revision = rev
        node.fill_header(resp.header)
        return resp

    async def keep_alive(self, requests: AsyncIterator[rpc_pb2.LeaseKeepAliveRequest],
                         ctx: CallContext) -> AsyncIterator[rpc_pb2.LeaseKeepAliveResponse]:
        """One reply per request, in order: TTL = granted TTL, or 0 for an unknown or expired lease.

        Ends when the client half-closes. A reply for an expired lease is sent once its revoke
        is durable (etcd waits for the revoke too), so a client told TTL 0 finds the keys gone.
        """
        node = self.node
        lessor = node.lessor
        counters = node.counters
        async for req in requests:
            if self._durable_mutations < lessor.mutations:
                await self._settled()
            resp = rpc_pb2.LeaseKeepAliveResponse(ID=req.ID)
            node.fill_header(resp.header)  # before the renew, as etcd: never newer than the renew
            try:
                resp.TTL = lessor.renew(req.ID)
                counters.lease_renewed += 1
            except LeaseExpired:
                await node.writer.submit(partial(_expire, node, [req.ID]))
            except errors.EtcdError:
                pass  # unknown lease: TTL 0, not an error
            yield resp

    async def time_to_live(self, req: rpc_pb2.LeaseTimeToLiveRequest,
                           ctx: CallContext) -> rpc_pb2.LeaseTimeToLiveResponse:
        """Remaining whole seconds (truncated), granted TTL, keys; TTL -1 for an unknown lease. A checkpoint."""
        node = self.node
        await self._settled(keys=req.keys)
        resp = rpc_pb2.LeaseTimeToLiveResponse(ID=req.ID)
        lease = node.lessor.get(req.ID)
        if lease is None:
            resp.TTL = -1
        else:
            remaining = node.lessor.remaining(lease)
            resp.TTL = math.trunc(remaining) if math.isfinite(remaining) else 2**62
            resp.grantedTTL = lease.ttl
            if req.keys:
                resp.keys.extend(node.store.keys_of_lease(req.ID))
        node.fill_header(resp.header)
        return resp

    async def leases(self, req: rpc_pb2.LeaseLeasesRequest, ctx: CallContext) -> rpc_pb2.LeaseLeasesResponse:
        """Every lease, soonest expiry first. A checkpoint."""
        node = self.node
        await self._settled()
        resp = rpc_pb2.LeaseLeasesResponse(
            leases=[rpc_pb2.LeaseStatus(ID=lease.id) for lease in node.lessor.by_expiry()])
        node.fill_header(resp.header)
        return resp


def methods(node: Node) -> list[Method]:
    svc = LeaseService(node)
    p = "/etcdserverpb.Lease/"
    return [
        Method(p + "LeaseGrant", Kind.UNARY, rpc_pb2.LeaseGrantRequest, rpc_pb2.LeaseGrantResponse, svc.grant),
        Method(p + "LeaseRevoke", Kind.UNARY, rpc_pb2.LeaseRevokeRequest, rpc_pb2.LeaseRevokeResponse, svc.revoke),
        Method(p + "LeaseKeepAlive", Kind.BIDI_STREAM, rpc_pb2.LeaseKeepAliveRequest,
               rpc_pb2.LeaseKeepAliveResponse, svc.keep_alive),
        Method(p + "LeaseTimeToLive", Kind.UNARY, rpc_pb2.LeaseTimeToLiveRequest,
               rpc_pb2.LeaseTimeToLiveResponse, svc.time_to_live),
        Method(p + "LeaseLeases", Kind.UNARY, rpc_pb2.LeaseLeasesRequest, rpc_pb2.LeaseLeasesResponse,
               svc.leases),
    ]
