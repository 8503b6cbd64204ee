"""The whole server in-process (real gRPC on port 0): write path, restart, quota, compaction, counters."""

from __future__ import annotations

from pathlib import Path

import anyio
import grpc
import pytest
from helpers.aio import serving_with_channel as running

from coord._pb import rpc_pb2, rpc_pb2_grpc

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the server runs on asyncio; grpc.aio shares the loop




async def test_put_range_restart_keeps_history_and_compaction(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as (server, ch):
            kv = rpc_pb2_grpc.KVStub(ch)
            revs = []
            for i in range(20):
                resp = await kv.Put(rpc_pb2.PutRequest(key=b"k%d" % (i % 5), value=b"v%d" % i))
                revs.append(resp.header.revision)
            assert revs == list(range(2, 22))
            # One client, one call at a time: the writes take the lone-write path (no queue hand-off).
            assert server.node.counters.lone_writes >= 15
            await kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"k4"))
            await kv.Compact(rpc_pb2.CompactionRequest(revision=10, physical=True))
            before = await kv.Range(rpc_pb2.RangeRequest(key=b"k", range_end=b"l"))
            old = await kv.Range(rpc_pb2.RangeRequest(key=b"k", range_end=b"l", revision=15))
            hkv = await rpc_pb2_grpc.MaintenanceStub(ch).HashKV(rpc_pb2.HashKVRequest())
            term = before.header.raft_term
        async with running(tmp_path) as (_, ch):
            kv = rpc_pb2_grpc.KVStub(ch)
            after = await kv.Range(rpc_pb2.RangeRequest(key=b"k", range_end=b"l"))
            assert list(after.kvs) == list(before.kvs)
            assert after.header.revision == before.header.revision == 22
            assert after.header.raft_term == term + 1
            assert list((await kv.Range(rpc_pb2.RangeRequest(key=b"k", range_end=b"l", revision=15))).kvs) == list(
                old.kvs)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kv.Range(rpc_pb2.RangeRequest(key=b"k0", revision=9))
            assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert err.value.details() == "etcdserver: mvcc: required revision has been compacted"
            hkv2 = await rpc_pb2_grpc.MaintenanceStub(ch).HashKV(rpc_pb2.HashKVRequest())
            assert (hkv2.hash, hkv2.compact_revision) == (hkv.hash, 10)


async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as (server, ch):
            kv = rpc_pb2_grpc.KVStub(ch)
            results: list[int] = []

            async def writer(i: int) -> None:
                for j in range(10):
                    resp = await kv.Put(rpc_pb2.PutRequest(key=b"w%d" % i, value=b"%d" % j))
                    results.append(resp.header.revision)

            async with anyio.create_task_group() as tg:
                for i in range(32):
                    tg.start_soon(writer, i)
            assert sorted(results) == list(range(2, 2 + 320)), "one revision per put, none lost or repeated"
            c = server.node.counters
            assert c.committed_jobs >= 320
            assert c.commits < c.committed_jobs, "concurrent writes should share commits"
            assert c.pending_writes == 0
            assert max(c.commit_batch_sizes) > 1


async def test_quota_raises_nospace_and_keeps_reads_and_deletes(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with running(tmp_path, quota_backend_bytes=400_000) as (server, ch):
            kv = rpc_pb2_grpc.KVStub(ch)
            maint = rpc_pb2_grpc.MaintenanceStub(ch)
            value = b"x" * 20_000
            stored = 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                for i in range(1000):
                    await kv.Put(rpc_pb2.PutRequest(key=b"big%03d" % i, value=value))
                    stored += 1
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details() == "etcdserver: mvcc: database space exceeded"
            assert stored > 0
            rev = (await kv.Range(rpc_pb2.RangeRequest(key=b"big000"))).header.revision
            alarms = await maint.Alarm(rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.GET))
            assert [(a.memberID, a.alarm) for a in alarms.alarms] == [(server.node.member_id, rpc_pb2.NOSPACE)]
            status = await maint.Status(rpc_pb2.StatusRequest())
            assert status.errors == [f"memberID:{server.node.member_id} alarm:NOSPACE "]
            # Small writes fail too while the alarm is active; reads and deletes work.
            with pytest.raises(grpc.aio.AioRpcError):
                await kv.Put(rpc_pb2.PutRequest(key=b"tiny", value=b"1"))
            assert (await kv.Range(rpc_pb2.RangeRequest(key=b"big", range_end=b"bih", count_only=True))).count == stored
            deleted = await kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"big", range_end=b"bih"))
            assert deleted.deleted == stored and deleted.header.revision == rev + 1
            # Recovery as with etcd: compact, defragment, disarm.
            await kv.Compact(rpc_pb2.CompactionRequest(revision=deleted.header.revision, physical=True))
            await maint.Defragment(rpc_pb2.DefragmentRequest())
            await maint.Alarm(rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.DEACTIVATE,
                                                   memberID=server.node.member_id, alarm=rpc_pb2.NOSPACE))
            assert (await kv.Put(rpc_pb2.PutRequest(key=b"tiny", value=b"1"))).header.revision == rev + 2
        # The alarm state is durable: it was disarmed, so it stays disarmed after a restart.
        async with running(tmp_path, quota_backend_bytes=400_000) as (server, ch):
            assert server.node.alarms == set()


async def test_alarm_survives_restart(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as (server, ch):
            await rpc_pb2_grpc.MaintenanceStub(ch).Alarm(rpc_pb2.AlarmRequest(
                action=rpc_pb2.AlarmRequest.ACTIVATE, memberID=server.node.member_id, alarm=rpc_pb2.NOSPACE))
        async with running(tmp_path) as (server, ch):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await rpc_pb2_grpc.KVStub(ch).Put(rpc_pb2.PutRequest(key=b"a", value=b"b"))
            assert err.value.details() == "etcdserver: mvcc: database space exceeded"


async def test_defragment_shrinks_and_keeps_data(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as (_, ch):
            kv = rpc_pb2_grpc.KVStub(ch)
            for i in range(200):
                await kv.Put(rpc_pb2.PutRequest(key=b"d%03d" % i, value=b"y" * 4000))
            resp = await kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"d", range_end=b"e"))
            await kv.Put(rpc_pb2.PutRequest(key=b"keep", value=b"me"))
            await kv.Compact(rpc_pb2.CompactionRequest(revision=resp.header.revision, physical=True))
            maint = rpc_pb2_grpc.MaintenanceStub(ch)
            before = await maint.Status(rpc_pb2.StatusRequest())
            await maint.Defragment(rpc_pb2.DefragmentRequest())
            after = await maint.Status(rpc_pb2.StatusRequest())
            assert after.dbSize < before.dbSize
            assert (await kv.Range(rpc_pb2.RangeRequest(key=b"keep"))).kvs[0].value == b"me"
            assert (await kv.Put(rpc_pb2.PutRequest(key=b"after", value=b"defrag"))).header.revision == (
                resp.header.revision + 2)


async def test_identity_headers_and_member_list(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path) as (_, ch):
            members = await rpc_pb2_grpc.ClusterStub(ch).MemberList(rpc_pb2.MemberListRequest())
            # etcd's derivation for the default peer URL and token (checked against etcd 3.4.23).
            assert members.header.member_id == 0x8E9E05C52164694D
            assert members.header.cluster_id == 14841639068965178418
            assert members.header.revision == 0
            assert [(m.name, list(m.peerURLs)) for m in members.members] == [("default", ["http://localhost:2380"])]
            status = await rpc_pb2_grpc.MaintenanceStub(ch).Status(rpc_pb2.StatusRequest())
            assert status.leader == status.header.member_id and status.raftTerm == 2
            assert status.version == "3.4.23"


async def test_corrupt_log_refuses_to_start(tmp_path: Path) -> None:
    from coord_server.wal import WalCorrupt

    with anyio.fail_after(30):
        async with running(tmp_path) as (_, ch):
            for i in range(5):
                await rpc_pb2_grpc.KVStub(ch).Put(rpc_pb2.PutRequest(key=b"c%d" % i, value=b"v" * 700))
        seg = sorted((tmp_path / "member" / "wal").glob("*.wal"))[-1]
        data = bytearray(seg.read_bytes())
        data[200] ^= 0x04
        seg.write_bytes(bytes(data))
        with pytest.raises(WalCorrupt):
            async with running(tmp_path):
                pass
