"""Watch service in process (real gRPC, asyncio): a stalled reader stays bounded and loses nothing,
hostile streams (thousands of watchers, cancel storms, garbage) leak nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import grpc
import pytest
from helpers.aio import aio_channel
from helpers.aio import serving as running
from helpers.watch_client import CHANNEL_OPTIONS
from helpers.watch_validator import History, WatchLog, validate

from coord._pb import rpc_pb2 as pb
from coord._pb import rpc_pb2_grpc as pbg
from coord_server.watch_hub import Limits

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"




def create(key: bytes, end: bytes = b"", **kw: object) -> pb.WatchRequest:
    return pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key, range_end=end, **kw))  # type: ignore[arg-type]


async def wait_for(cond: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Poll ``cond`` (server-side state with no event to wait on) for up to ``seconds``."""
    for _ in range(int(seconds * 100)):
        if cond():
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_stalled_reader_is_bounded_then_gets_every_event(tmp_path: Path) -> None:
    limits = Limits()
    bound = 2 * limits.max_events + 10  # the outbox plus the batch the sender holds (+ one revision)
    async with running(tmp_path) as (server, target):
        node = server.node
        with anyio.fail_after(240):
            async with aio_channel(target, options=CHANNEL_OPTIONS) as wch, aio_channel(target) as kch:
                call = pbg.WatchStub(wch).Watch()
                await call.write(create(b"s/", b"s0", watch_id=1, prev_kv=True))
                created = await call.read()
                assert created.created
                kv = pbg.KVStub(kch)
                history = History()
                peak = 0
                value = b"x" * 1000
                for i in range(2500):  # 25,000 events of ~1 kB while the watcher reads nothing
                    keys = [b"s/%d" % ((i * 10 + j) % 300) for j in range(10)]
                    ops = [pb.RequestOp(request_put=pb.PutRequest(key=k, value=value, prev_kv=True)) for k in keys]
                    resp = await kv.Txn(pb.TxnRequest(success=ops))
                    for k, sub in zip(keys, resp.responses, strict=True):
                        p = sub.response_put
                        history.put(resp.header.revision, k, value, p.prev_kv if p.HasField("prev_kv") else None)
                    peak = max(peak, *node.counters.buffered_events.values(), 0)
                last = resp.header.revision
                print(f"peak buffered events {peak} (bound {bound}), victims {node.watch_hub.victims}")
                assert node.watch_hub.victims >= 1, "the reader never fell behind: the test proves nothing"
                assert peak <= bound
                # now read: every event, in order, no gap, no duplicate
                log = WatchLog(key=b"s/", range_end=b"s0", prev_kv=True, resolved_start=created.header.revision + 1)
                seen = 0
                while seen < last:
                    r = await call.read()
                    assert r.watch_id == 1 and not r.canceled
                    log.responses.append(r)
                    seen = max([seen, *(ev.kv.mod_revision for ev in r.events)])
                report = validate([log], history)
                print(report.summary())
                assert report.total == 0, report.examples
                assert report.events == 25_000
                call.cancel()
        await wait_for(lambda: node.counters.live_watchers == 0 and node.counters.watch_streams == 0, "cleanup")


async def test_thousands_of_watchers_on_one_stream_and_cleanup(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, target):
        node = server.node
        with anyio.fail_after(120):
            async with aio_channel(target) as ch:
                call = pbg.WatchStub(ch).Watch()
                n = 10_000
                for i in range(n):
                    await call.write(create(b"h/%d" % (i % 50), b"" if i % 3 else b"h/%d\xff" % (i % 50)))
                ids = [(await call.read()).watch_id for _ in range(n)]
                assert ids == list(range(n))
                assert node.counters.live_watchers == n
                await pbg.KVStub(ch).Put(pb.PutRequest(key=b"h/7", value=b"v"))
                hits = [await call.read() for _ in range(n // 50)]  # 200 watchers on h/7 (single or range)
                assert all(r.events[0].kv.key == b"h/7" for r in hits)
                call.cancel()
            await wait_for(lambda: node.counters.live_watchers == 0 and node.counters.watch_streams == 0, "cleanup")
            assert node.watch_hub.synced_count() == 0 and not node.watch_hub.streams


async def test_cancel_storm(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, target):
        node = server.node
        with anyio.fail_after(120):
            async with aio_channel(target) as ch:
                call = pbg.WatchStub(ch).Watch()
                for _ in range(3000):
                    await call.write(create(b"c", watch_id=5))
                    await call.write(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=5)))
                    await call.write(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=5)))  # unknown now
                replies = [await call.read() for _ in range(6000)]
                assert [(r.created, r.canceled) for r in replies[:2]] == [(True, False), (False, True)]
                assert sum(r.created for r in replies) == sum(r.canceled for r in replies) == 3000
                await call.write(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
                assert (await call.read()).watch_id == -1  # nothing else was queued: unknown ids got no reply
                assert node.counters.live_watchers == 0
                call.cancel()
            await wait_for(lambda: node.counters.watch_streams == 0, "cleanup")


async def test_garbage_on_the_stream_ends_it_and_the_server_stays_up(tmp_path: Path) -> None:
    async with running(tmp_path) as (server, target):
        node = server.node
        with anyio.fail_after(60):
            async with aio_channel(target) as ch:
                raw = ch.stream_stream("/etcdserverpb.Watch/Watch", request_serializer=lambda b: b,
                                       response_deserializer=pb.WatchResponse.FromString)
                call = raw()
                await call.write(create(b"g").SerializeToString())
                assert (await call.read()).created
                await call.write(b"\xff\xff\xff\xff")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    while True:
                        await call.read()
                assert info.value.code() == grpc.StatusCode.INTERNAL
                assert "grpc: error unmarshalling request" in (info.value.details() or "")
                resp = await pbg.KVStub(ch).Put(pb.PutRequest(key=b"g", value=b"ok"))
                assert resp.header.revision == 2
            await wait_for(lambda: node.counters.live_watchers == 0 and node.counters.watch_streams == 0, "cleanup")


async def test_an_open_watch_does_not_make_lone_writes_concurrent(tmp_path: Path) -> None:
    """The lone-write fast path counts open unary calls only: a client holding a watch (or a lease
    keep-alive stream) still gets it for its one-at-a-time writes."""
    async with running(tmp_path) as (server, target):
        node = server.node
        with anyio.fail_after(60):
            async with aio_channel(target) as ch:
                call = pbg.WatchStub(ch).Watch()
                await call.write(create(b"lw"))
                assert (await call.read()).created
                before = node.counters.lone_writes
                kv = pbg.KVStub(ch)
                for i in range(20):
                    await kv.Put(pb.PutRequest(key=b"lw", value=b"%d" % i))
                    assert len((await call.read()).events) == 1
                assert node.counters.lone_writes - before >= 15
                call.cancel()
