"""Watches on every backend against both servers: order, revision batches, replay, filters, compaction, and
the multiplexing of every watch of a client on one stream (routing, cancel, a slow reader paused alone)."""

from __future__ import annotations

import contextlib
import urllib.request

import anyio
import pytest
from helpers import ServerProcess
from helpers.client_kit import unique

import coord
from coord import EventType, Put, WatchFilter
from coord._watch import BUFFER

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


async def test_compacted_history_raises_with_compact_revision(server: ServerProcess) -> None:
    """On a fresh server of each kind (compacting the shared one would break other tests' revisions)."""
    k = unique("wc")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(server.endpoint) as client:
            r1 = await client.put(k, "1")
            r2 = await client.put(k, "2")
            await client.compact(r2.revision)
            with pytest.raises(coord.Compacted) as info:
                async with client.watch(k, start_revision=r1.revision) as events:
                    await events.receive()
            assert info.value.compact_revision == r2.revision


def _gauge(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(f"{server.client_url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def _wait_gauge(server: ServerProcess, name: str, value: float) -> None:
    """Wait (up to ~10 s: the server applies a cancel request asynchronously) until the gauge reads ``value``."""
    got = -1.0
    for _ in range(200):
        got = await anyio.to_thread.run_sync(_gauge, server, name)
        if got == value:
            return
        await anyio.sleep(0.05)
    assert got == value, f"{name} is {got}, expected {value}"


async def test_watches_share_one_stream_and_cancel_on_close(server: ServerProcess) -> None:
    """Four watches of one client run on one Watch stream, each gets exactly its own events; leaving a watch
    removes its watcher on the server (a cancel request), and the stream serves the next watch."""
    p = unique("wm") + "/"
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(server.endpoint) as client:
            async with contextlib.AsyncExitStack() as stack:
                a = await stack.enter_async_context(client.watch(p + "a"))
                b = await stack.enter_async_context(client.watch(p + "b"))
                both = await stack.enter_async_context(client.watch(p, prefix=True))
                ra = await client.put(p + "a", "1")
                await client.put(p + "b", "2")
                replay = await stack.enter_async_context(client.watch(p + "a", start_revision=ra.revision))
                await client.put(p + "a", "3")
                assert [(await a.receive()).kv.value for _ in range(2)] == [b"1", b"3"]
                assert (await b.receive()).kv.value == b"2"
                assert [(await both.receive()).kv.value for _ in range(3)] == [b"1", b"2", b"3"]
                assert [(await replay.receive()).kv.value for _ in range(2)] == [b"1", b"3"]
                await _wait_gauge(server, "etcd_debugging_mvcc_watcher_total", 4)
                await _wait_gauge(server, "etcd_debugging_mvcc_watch_stream_total", 1)
            await _wait_gauge(server, "etcd_debugging_mvcc_watcher_total", 0)
            async with client.watch(p + "b") as again:
                await client.put(p + "b", "4")
                assert (await again.receive()).kv.value == b"4"
            assert client._watch_hub().streams_opened == 1


async def test_slow_reader_is_paused_without_stalling_other_watches(shared_server: ServerProcess) -> None:
    """A watch whose reader falls more than its buffer behind is paused on the server and resumed from its next
    revision when the reader catches up: the other watches of the stream keep flowing, nothing is lost or
    repeated."""
    p = unique("ws") + "/"
    n = BUFFER * 3
    with anyio.fail_after(DEADLINE * 3):
        async with coord.open_client(shared_server.endpoint) as client:
            async with client.watch(p + "slow") as slow, client.watch(p + "fast") as fast:
                fast_values = []
                for i in range(n):
                    await client.put(p + "slow", str(i))
                    if i % 16 == 0:
                        await client.put(p + "fast", str(i))
                        fast_values.append(i)
                        # the fast watch is served while the slow one is not read at all
                        assert int((await fast.receive()).kv.value) == i
                assert client._watch_hub().pauses >= 1
                assert [int((await slow.receive()).kv.value) for _ in range(n)] == list(range(n))
                await client.put(p + "slow", "last")
                assert (await slow.receive()).kv.value == b"last"
            assert fast_values == list(range(0, n, 16))


async def test_compaction_ends_only_the_watch_that_needs_the_history(server: ServerProcess) -> None:
    k, other = unique("wk"), unique("wo")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(server.endpoint) as client:
            r1 = await client.put(k, "1")
            r2 = await client.put(k, "2")
            async with client.watch(other) as live:
                await client.compact(r2.revision)
                with pytest.raises(coord.Compacted) as info:
                    async with client.watch(k, start_revision=r1.revision) as old:
                        await old.receive()
                assert info.value.compact_revision == r2.revision
                await client.put(other, "x")
                assert (await live.receive()).kv.value == b"x"
