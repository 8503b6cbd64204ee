"""Leases over real gRPC, the whole server in-process (port 0, temp data dir).

Expiry timing (not before the TTL, within TTL + 1 s of the last keep-alive), one revision per
revoke and per expiry, keep-alive streams from many clients, attachment through Put/Txn,
a keep-alive that races its lease's expiry, a wall-clock jump, an expiry pile-up that must not
stall writes, and leases across a restart.

Timing bounds are one-sided where possible: a lower bound is checked with times that can only
make the test pass more easily when the machine is slow (e.g. "the key was gone in a read whose
reply arrived before TTL" is a proven early expiry), upper bounds are generous.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from helpers.aio import aio_channel
from helpers.aio import serving_with_channel as running

from coord._pb import rpc_pb2 as pb
from coord._pb import rpc_pb2_grpc as pbg
from coord_server.app import Server
from coord_server.lessor import lease_op

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the server runs on asyncio; grpc.aio shares the loop




def target(server: Server) -> str:
    host, port = server.addresses[0]
    return f"{host}:{port}"


async def revision(kv: pbg.KVStub) -> int:
    return int((await kv.Range(pb.RangeRequest(key=b"__probe__"))).header.revision)


async def present(kv: pbg.KVStub, key: bytes) -> bool:
    return (await kv.Range(pb.RangeRequest(key=key, count_only=True))).count == 1


class KeepAlive:
    """One LeaseKeepAlive stream: ``await ka.once(id)`` sends a request and returns its reply."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call: Any = pbg.LeaseStub(channel).LeaseKeepAlive()

    async def once(self, lease_id: int) -> pb.LeaseKeepAliveResponse:
        await self.call.write(pb.LeaseKeepAliveRequest(ID=lease_id))
        resp = await self.call.read()
        assert resp is not grpc.aio.EOF
        return resp  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self.call.done_writing()
        assert await self.call.read() is grpc.aio.EOF, "the stream ends when the client half-closes"


# ---------------------------------------------------------------------- expiry timing


async def test_keys_expire_not_before_ttl_and_within_ttl_plus_one_second_of_the_last_keepalive(
        tmp_path: Path) -> None:
    ttl = 2
    with anyio.fail_after(30):
        async with running(tmp_path) as (server, ch):
            kv, lease = pbg.KVStub(ch), pbg.LeaseStub(ch)
            granted = await lease.LeaseGrant(pb.LeaseGrantRequest(TTL=ttl))
            assert granted.TTL == ttl
            await kv.Put(pb.PutRequest(key=b"lk", value=b"v", lease=granted.ID))
            ka = KeepAlive(ch)
            sent = replied = 0.0
            for _ in range(3):  # kept alive for longer than one TTL
                await anyio.sleep(0.8)
                sent = time.monotonic()
                reply = await ka.once(granted.ID)
                replied = time.monotonic()
                assert (reply.ID, reply.TTL) == (granted.ID, ttl)
            rev = await revision(kv)
            gone_at = None
            while gone_at is None:
                t_send = time.monotonic()
                still = await present(kv, b"lk")
                t_recv = time.monotonic()
                if not still:
                    # The deadline was set after `sent`: a read answered before sent + TTL proves an early expiry.
                    assert t_recv >= sent + ttl, f"expired {sent + ttl - t_recv:.3f}s early"
                    gone_at = t_send
                await anyio.sleep(0.02)
            assert gone_at <= replied + ttl + 1.0, f"expired {gone_at - replied - ttl:.3f}s late"
            await ka.close()
            # One expiry, one revision; the lease is gone for every API.
            assert await revision(kv) == rev + 1
            ttl_resp = await lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=granted.ID))
            assert (ttl_resp.TTL, ttl_resp.grantedTTL) == (-1, 0)
            assert server.node.counters.lease_expired == 1


async def test_revoke_and_expiry_each_bump_the_revision_exactly_once(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as (server, ch):
            kv, lease = pbg.KVStub(ch), pbg.LeaseStub(ch)
            store = server.node.store
            rev0 = await revision(kv)
            for lease_id, ttl in [(10, 60), (11, 2), (12, 60)]:
                resp = await lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=ttl))
                assert resp.header.revision == rev0, "a grant changes no revision"
            for i, lease_id in enumerate([10, 10, 10, 11, 11]):
                await kv.Put(pb.PutRequest(key=b"r/%d" % i, value=b"v", lease=lease_id))
            rev = await revision(kv)
            assert rev == rev0 + 5
            revoked = await lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=10))
            assert revoked.header.revision == rev + 1
            recs = list(store.events_between(rev + 1, rev + 1))
            assert [(r.key, r.sub, r.tombstone) for r in recs] == [
                (b"r/0", 0, True), (b"r/1", 1, True), (b"r/2", 2, True)], "three DELETEs in one revision"
            # A lease with no keys: no revision.
            assert (await lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=12))).header.revision == rev + 1
            assert await revision(kv) == rev + 1
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=10))
            assert (err.value.code(), err.value.details()) == (
                grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found")
            # Expiry of lease 11 (2 keys): exactly one more revision.
            expired = anyio.Event()
            server.node.writer.publish_hooks.append(
                lambda rev: expired.set() if server.node.counters.lease_expired else None)
            with anyio.fail_after(10):
                await expired.wait()
            assert not await present(kv, b"r/3")
            assert await revision(kv) == rev + 2
            recs = list(store.events_between(rev + 2, rev + 2))
            assert [(r.key, r.tombstone) for r in recs] == [(b"r/3", True), (b"r/4", True)]
            c = server.node.counters
            assert (c.lease_granted, c.lease_revoked, c.lease_expired, c.leases) == (3, 3, 1, 0)


async def test_keepalive_streams_from_many_clients_keep_every_lease(tmp_path: Path) -> None:
    clients, per_client, ttl = 8, 25, 2
    with anyio.fail_after(60):
        async with running(tmp_path) as (server, ch):
            kv, lease = pbg.KVStub(ch), pbg.LeaseStub(ch)
            ids = list(range(1000, 1000 + clients * per_client))
            for lease_id in ids:
                await lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=ttl))
                await kv.Put(pb.PutRequest(key=b"many/%d" % lease_id, lease=lease_id))
            replies: list[int] = []
            wrong: list[pb.LeaseKeepAliveResponse] = []

            async def client(mine: list[int]) -> None:
                async with aio_channel(target(server)) as own:
                    ka = KeepAlive(own)
                    deadline = time.monotonic() + 3.0
                    while time.monotonic() < deadline:
                        for lease_id in mine:
                            reply = await ka.once(lease_id)
                            if (reply.ID, reply.TTL) != (lease_id, ttl):
                                wrong.append(reply)
                            replies.append(lease_id)
                        await anyio.sleep(0.4)
                    await ka.close()

            async with anyio.create_task_group() as tg:
                for c in range(clients):
                    tg.start_soon(client, ids[c * per_client:(c + 1) * per_client])
            assert wrong == []
            assert len(replies) >= clients * per_client * 3, "every lease renewed several times"
            leases = await lease.LeaseLeases(pb.LeaseLeasesRequest())
            assert sorted(s.ID for s in leases.leases) == ids
            assert (await kv.Range(pb.RangeRequest(key=b"many/", range_end=b"many0", count_only=True))).count == len(
                ids)
            assert server.node.counters.lease_expired == 0
            assert server.node.counters.lease_renewed == len(replies)


# ---------------------------------------------------------------------- attachment


async def test_put_and_txn_attach_detach_and_move_keys(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as (_, ch):
            kv, lease = pbg.KVStub(ch), pbg.LeaseStub(ch)

            async def keys(lease_id: int) -> list[bytes]:
                resp = await lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease_id, keys=True))
                return sorted(resp.keys)

            await lease.LeaseGrant(pb.LeaseGrantRequest(ID=1, TTL=60))
            await lease.LeaseGrant(pb.LeaseGrantRequest(ID=-2, TTL=60))
            for key in (b"a", b"b", b"c"):
                await kv.Put(pb.PutRequest(key=key, lease=1))
            await kv.Put(pb.PutRequest(key=b"a", value=b"plain"))  # detaches
            await kv.Put(pb.PutRequest(key=b"b", lease=-2))  # moves
            await kv.Put(pb.PutRequest(key=b"c", value=b"new", ignore_lease=True))  # keeps
            assert (await keys(1), await keys(-2)) == ([b"c"], [b"b"])
            await kv.Txn(pb.TxnRequest(success=[
                pb.RequestOp(request_put=pb.PutRequest(key=b"t1", lease=-2)),
                pb.RequestOp(request_put=pb.PutRequest(key=b"c", lease=-2)),
            ]))
            assert (await keys(1), await keys(-2)) == ([], [b"b", b"c", b"t1"])
            await kv.DeleteRange(pb.DeleteRangeRequest(key=b"t1"))  # deleting detaches
            assert await keys(-2) == [b"b", b"c"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kv.Put(pb.PutRequest(key=b"x", lease=99))
            assert (err.value.code(), err.value.details()) == (
                grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kv.Txn(pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=b"x", lease=99))]))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # Revoke deletes exactly what is attached now, not what was attached once.
            await lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=-2))
            got = await kv.Range(pb.RangeRequest(key=b"a", range_end=b"z"))
            assert [(k.key, k.lease) for k in got.kvs] == [(b"a", 0)]


# ---------------------------------------------------------------------- races and clocks


async def test_keepalive_racing_expiry_answers_zero_once_the_keys_are_gone(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as (server, ch):
            kv, lease = pbg.KVStub(ch), pbg.LeaseStub(ch)
            granted = await lease.LeaseGrant(pb.LeaseGrantRequest(TTL=100))
            await kv.Put(pb.PutRequest(key=b"race", lease=granted.ID))
            rev = await revision(kv)
            # The lessor's clock jumps past the deadline; the expiry loop still sleeps (it waits for
            # the deadline it computed), so the keep-alive is the first to notice.
            lessor = server.node.lessor
            lessor.clock = lambda: time.monotonic() + 1000
            ka = KeepAlive(ch)
            reply = await ka.once(granted.ID)
            assert (reply.ID, reply.TTL) == (granted.ID, 0)
            assert reply.header.revision == rev, "the header is taken before the renew, as etcd"
            assert not await present(kv, b"race"), "TTL 0 is answered only after the revoke"
            assert await revision(kv) == rev + 1
            assert (await ka.once(granted.ID)).TTL == 0
            await ka.close()
            assert server.node.counters.lease_expired == 1


async def test_an_expiry_rechecks_at_apply_time(tmp_path: Path) -> None:
    from coord_server.services.lease import _expire

    with anyio.fail_after(30):
        async with running(tmp_path) as (server, ch):
            kv, lease = pbg.KVStub(ch), pbg.LeaseStub(ch)
            node = server.node
            await lease.LeaseGrant(pb.LeaseGrantRequest(ID=5, TTL=100))
            offset = [0.0]
            node.lessor.clock = lambda: time.monotonic() + offset[0]
            offset[0] = 200.0
            assert node.lessor.take_expired() == [5]  # picked for expiry...
            # ...but before its revoke is applied, the client revokes it and grants the ID again.
            await lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=5))
            await lease.LeaseGrant(pb.LeaseGrantRequest(ID=5, TTL=100))
            await kv.Put(pb.PutRequest(key=b"again", lease=5))
            rev = await revision(kv)
            assert await node.writer.submit(lambda: _expire(node, [5, 6])) == 0
            assert await present(kv, b"again") and await revision(kv) == rev
            left = await lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=5, keys=True))
            assert (left.TTL >= 99, list(left.keys)) == (True, [b"again"])
            assert node.counters.lease_expired == 0


async def test_a_wall_clock_jump_expires_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as (server, ch):
            kv, lease = pbg.KVStub(ch), pbg.LeaseStub(ch)
            granted = await lease.LeaseGrant(pb.LeaseGrantRequest(TTL=5))
            await kv.Put(pb.PutRequest(key=b"wall", lease=granted.ID))
            real_time, real_ns = time.time, time.time_ns
            monkeypatch.setattr(time, "time", lambda: real_time() + 7200)
            monkeypatch.setattr(time, "time_ns", lambda: real_ns() + 7200 * 10**9)
            await anyio.sleep(1.0)
            assert await present(kv, b"wall")
            left = await lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=granted.ID))
            assert 3 <= left.TTL <= 4
            assert server.node.counters.lease_expired == 0


# ---------------------------------------------------------------------- pile-up


async def test_an_expiry_pile_up_is_rate_limited_and_does_not_stall_writes(tmp_path: Path) -> None:
    n, ttl = 2000, 3
    with anyio.fail_after(60):
        async with running(tmp_path) as (server, ch):
            kv = pbg.KVStub(ch)
            node = server.node

            def create() -> None:  # all in one write: every deadline within a few milliseconds
                for i in range(1, n + 1):
                    node.writer.extra_ops.append(lease_op(node.lessor.grant(i, ttl)))
                    node.store.put(pb.PutRequest(key=b"pile/%05d" % i, lease=i))

            await node.writer.submit(create)
            rev0 = await revision(kv)
            expiries: list[tuple[float, int]] = []
            node.writer.publish_hooks.append(
                lambda rev: expiries.append((time.monotonic(), node.counters.lease_expired)))
            writes: list[tuple[float, float]] = []  # (start, latency) of each put
            while node.counters.lease_expired < n:
                t0 = time.monotonic()
                await kv.Put(pb.PutRequest(key=b"writer", value=b"%d" % len(writes)))
                writes.append((t0, time.monotonic() - t0))
                await anyio.sleep(0.005)
            puts = len(writes)
            assert (await kv.Range(pb.RangeRequest(key=b"pile/", range_end=b"pile0", count_only=True))).count == 0
            assert len(node.lessor) == 0
            assert await revision(kv) == rev0 + n + puts, "one revision per expired lease, one per put"
            during = [(t, k) for t, k in expiries if 0 < k < n]
            first = min(t for t, k in expiries if k > 0)
            last = min(t for t, k in expiries if k == n)
            # 500 at once, then 1000/s: the rate limit makes the pile-up take >= 1.5 s (slowness only adds).
            assert last - first >= 0.8 * (n - 500) / 1000
            assert during, "revokes were spread over several commits"
            during_pile_up = [lat for t0, lat in writes if first <= t0 <= last]
            assert len(during_pile_up) >= 20, "writes went on while the expiries were worked off"
            assert max(during_pile_up) < 1.0, f"a write waited {max(during_pile_up):.3f}s behind the expiries"


# ---------------------------------------------------------------------- restart


async def test_restart_refreshes_every_lease_to_its_full_ttl_plus_the_grace(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with running(tmp_path) as (_, ch):
            kv, lease = pbg.KVStub(ch), pbg.LeaseStub(ch)
            await lease.LeaseGrant(pb.LeaseGrantRequest(ID=-7, TTL=5))
            await lease.LeaseGrant(pb.LeaseGrantRequest(ID=8, TTL=30))
            await lease.LeaseGrant(pb.LeaseGrantRequest(ID=9, TTL=30))
            await kv.Put(pb.PutRequest(key=b"k-7", lease=-7))
            await kv.Put(pb.PutRequest(key=b"k8", lease=8))
            await kv.Put(pb.PutRequest(key=b"k9", lease=9))
            await lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=9))
            await anyio.sleep(2.0)  # -7 has about 3 s left
            before = await lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=-7))
            assert before.TTL <= 3
        async with running(tmp_path, election_timeout_ms=3000) as (server, ch):
            kv, lease = pbg.KVStub(ch), pbg.LeaseStub(ch)
            # full 5 s + 3 s grace (the election timeout), minus the moments since the start
            after = await lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=-7, keys=True))
            assert (after.TTL, after.grantedTTL, list(after.keys)) == (7, 5, [b"k-7"])
            assert (await lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=8))).TTL == 32
            assert (await lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=9))).TTL == -1
            got = await kv.Range(pb.RangeRequest(key=b"k", range_end=b"l"))
            assert [(k.key, k.lease) for k in got.kvs] == [(b"k-7", -7), (b"k8", 8)]
            assert server.node.counters.leases == 2
            # The refreshed leases still work: renew, revoke, new grants beside them.
            assert (await KeepAlive(ch).once(-7)).TTL == 5
            await lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=8))
            assert not await present(kv, b"k8")


async def test_grant_is_refused_while_the_nospace_alarm_is_active(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as (server, ch):
            maint, lease = pbg.MaintenanceStub(ch), pbg.LeaseStub(ch)
            await lease.LeaseGrant(pb.LeaseGrantRequest(ID=1, TTL=60))
            await maint.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, memberID=server.node.member_id,
                                              alarm=pb.NOSPACE))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60))
            assert (err.value.code(), err.value.details()) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded")
            # Everything else about leases keeps working.
            assert (await KeepAlive(ch).once(1)).TTL == 60
            await lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=1))
            assert list((await lease.LeaseLeases(pb.LeaseLeasesRequest())).leases) == []
