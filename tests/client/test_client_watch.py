"""Watches on every backend against both servers: order, revision batches, replay, filters, compaction."""

from __future__ import annotations

import anyio
import pytest
from helpers import ServerProcess
from helpers.client_kit import unique

import coord
from coord import EventType, Put, WatchFilter

pytestmark = pytest.mark.anyio

DEADLINE = 20


async def test_events_in_order_with_revision_batches(shared_server: ServerProcess) -> None:
    p = unique("w") + "/"
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            async with client.watch(p, prefix=True, prev_kv=True) as events:
                r1 = await client.put(p + "a", "1")
                t = await client.txn([], [Put(p + "b", "2"), Put(p + "c", "3")])  # one revision, two events
                await client.put(p + "a", "4")
                d = await client.delete(p + "a")
                b1 = await events.receive_batch()
                assert b1.revision == r1.revision and [e.kv.value for e in b1.events] == [b"1"]
                b2 = await events.receive_batch()
                assert b2.revision == t.revision
                assert [e.key for e in b2.events] == [p.encode() + b"b", p.encode() + b"c"]
                e3 = await events.receive()
                assert e3.type is EventType.PUT and e3.prev_kv is not None and e3.prev_kv.value == b"1"
                e4 = await events.receive()
                assert e4.type is EventType.DELETE and e4.revision == d.revision
                assert e4.prev_kv is not None and e4.prev_kv.value == b"4"
                assert events.last_revision == d.revision


async def test_replay_from_start_revision_and_filters(shared_server: ServerProcess) -> None:
    k = unique("wr")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            revs = [(await client.put(k, str(i))).revision for i in range(3)]
            await client.delete(k)
            async with client.watch(k, start_revision=revs[1]) as events:
                got = [await events.receive() for _ in range(3)]
            assert [e.revision for e in got] == [revs[1], revs[2], revs[2] + 1]
            assert got[-1].type is EventType.DELETE
            async with client.watch(k, start_revision=revs[0], filters=[WatchFilter.NO_PUT]) as events:
                only = await events.receive()
            assert only.type is EventType.DELETE


async def test_async_for_and_cancelled_reader(shared_server: ServerProcess) -> None:
    k = unique("wf")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            async with client.watch(k) as events:
                with anyio.move_on_after(0.2):
                    await events.receive()  # nothing yet: a cancelled receive loses nothing
                for i in range(5):
                    await client.put(k, str(i))
                seen = []
                async for ev in events:
                    seen.append(int(ev.kv.value))
                    if len(seen) == 5:
                        break
                assert seen == list(range(5))


async def test_watch_many_revisions_backpressure(shared_server: ServerProcess) -> None:
    """More revisions than the reader's buffer: the pump is backpressured, nothing is lost or repeated."""
    p = unique("wb") + "/"
    n = 200
    with anyio.fail_after(DEADLINE * 2):
        async with coord.open_client(shared_server.endpoint) as client:
            start = (await client.put(p + "x", "0")).revision
            for i in range(1, n):
                await client.put(p + "x", str(i))
            async with client.watch(p, prefix=True, start_revision=start) as events:
                values = [int((await events.receive()).kv.value) for _ in range(n)]
            assert values == list(range(n))


async def test_compacted_history_raises_with_compact_revision(server_factory: object, anyio_backend: object) -> None:
    srv = server_factory("coord").start()  # type: ignore[operator]
    k = unique("wc")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(srv.endpoint) as client:
            r1 = await client.put(k, "1")
            r2 = await client.put(k, "2")
            await client.compact(r2.revision)
            with pytest.raises(coord.Compacted) as info:
                async with client.watch(k, start_revision=r1.revision) as events:
                    await events.receive()
            assert info.value.compact_revision == r2.revision


async def test_watch_on_etcd_compaction(etcd: ServerProcess, anyio_backend: object) -> None:
    k = unique("we")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(etcd.endpoint) as client:
            r1 = await client.put(k, "1")
            r2 = await client.put(k, "2")
            await client.compact(r2.revision)
            with pytest.raises(coord.Compacted) as info:
                async with client.watch(k, start_revision=r1.revision) as events:
                    await events.receive()
            assert info.value.compact_revision == r2.revision
