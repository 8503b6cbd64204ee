"""Sessions, locks and elections on every backend against both servers (the fast, non-TTL-bound cases)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest
from helpers import ServerProcess
from helpers.client_kit import unique, wait_until_exists

import coord
from coord import Put, SessionState

pytestmark = pytest.mark.anyio

DEADLINE = 30


async def _lease_count(client: coord.Client) -> int:
    return len(await client.leases())


async def _lock_in_turn(client: coord.Client, name: str, i: int, queued: list[anyio.Event],
                        body: Callable[[coord.Lock], Awaitable[None]]) -> None:
    """Waiter ``i`` of lock ``name``: joins the queue once waiter ``i - 1`` is in it, sets ``queued[i]`` once its
    own key exists (its create revision fixes its place), and runs ``body(lock)`` while it holds the lock."""
    if i:
        await queued[i - 1].wait()
    async with client.session(ttl=10) as session:
        lock = session.lock(name)
        async with anyio.create_task_group() as tg:

            async def mark() -> None:
                await wait_until_exists(client, lock.key)
                queued[i].set()

            tg.start_soon(mark)
            async with lock:
                await body(lock)


async def test_session_keeps_and_revokes_lease(shared_server: ServerProcess) -> None:
    k = unique("s")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            async with client.session(ttl=5) as session:
                assert session.state is SessionState.HELD and session.ttl == 5
                await client.put(k, "v", lease=session)
                info = await client.lease_info(session)
                assert info.granted_ttl == 5
                assert session.remaining() > 0
            assert session.state is SessionState.LOST
            assert await client.get(k) is None  # revoked with the session
            assert (await client.lease_info(session)).ttl == -1


async def test_lock_excludes_and_hands_off_in_fifo_order(shared_server: ServerProcess) -> None:
    name = unique("lk")
    inside = 0
    overlaps = 0
    order: list[int] = []
    tokens: list[int] = []
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            leases_before = await _lease_count(client)
            queued = [anyio.Event() for _ in range(5)]

            async def worker(i: int) -> None:
                async def body(lock: coord.Lock) -> None:
                    nonlocal inside, overlaps
                    inside += 1
                    overlaps += inside > 1
                    order.append(i)
                    tokens.append(lock.fencing_token)
                    await anyio.sleep(0.02)
                    inside -= 1

                await _lock_in_turn(client, name, i, queued, body)

            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(worker, i)
            assert overlaps == 0
            assert order == list(range(5))
            assert tokens == sorted(tokens) and len(set(tokens)) == 5
            assert (await client.get_prefix(name + "/")).count == 0
            assert await _lease_count(client) == leases_before


async def test_cancelled_waiter_leaves_no_key_and_never_enters(shared_server: ServerProcess) -> None:
    name = unique("lc")
    entered = False
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            leases_before = await _lease_count(client)
            async with client.lock(name, ttl=10) as holder:
                with pytest.raises(TimeoutError):
                    with anyio.fail_after(0.5):
                        async with client.lock(name, ttl=10):
                            entered = True
                keys = await client.get_prefix(name + "/")
                assert [kv.key for kv in keys.kvs] == [holder.key]
            assert not entered
            assert (await client.get_prefix(name + "/")).count == 0
            assert await _lease_count(client) == leases_before


async def test_key_deleted_out_of_band_cancels_body_with_lock_lost(shared_server: ServerProcess) -> None:
    name = unique("ll")
    reached_end = False
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client, client.session(ttl=10) as session:
            with pytest.raises(coord.LockLost):
                async with session.lock(name) as lock:
                    await client.delete(lock.key)  # an operator's `etcdctl del`
                    await anyio.sleep(10)
                    reached_end = True
            assert not reached_end
            assert not lock.held
            # the session itself is fine, and the queue is empty
            assert session.state is SessionState.HELD
            assert (await client.get_prefix(name + "/")).count == 0


async def test_check_raises_once_a_bare_acquire_is_lost(shared_server: ServerProcess) -> None:
    name = unique("lc")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client, client.session(ttl=10) as session:
            lock = session.lock(name)
            with pytest.raises(RuntimeError):
                lock.check()  # not acquired yet
            await lock.acquire()
            lock.check()  # held: returns
            await client.delete(lock.key)
            for _ in range(1000):  # the own-key watcher reports the deletion (no event to wait on)
                if not lock.held:
                    break
                await anyio.sleep(0.01)
            with pytest.raises(coord.LockLost, match="deleted"):
                lock.check()
            await lock.release()
            with pytest.raises(coord.LockLost):
                lock.check()  # a loss stays a loss


async def test_revoked_lease_cancels_body_within_a_keepalive_interval(shared_server: ServerProcess) -> None:
    name = unique("lr")
    ttl = 6
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client, coord.open_client(
            shared_server.endpoint
        ) as other:
            async with client.session(ttl=ttl) as session:
                t_revoke = 0.0
                with pytest.raises(coord.LockLost):
                    async with session.lock(name):
                        t_revoke = anyio.current_time()
                        await other.revoke_lease(session.lease_id)
                        await anyio.sleep(ttl * 2)
                elapsed = anyio.current_time() - t_revoke
                assert elapsed < ttl / 3, f"LockLost after {elapsed:.2f}s, keep-alive interval is {ttl / 3:.1f}s"
                # the next keep-alive answer (TTL 0) makes the session LOST
                with anyio.fail_after(ttl / 3 + 2):
                    await session.wait_lost()
                with pytest.raises(coord.SessionExpired):
                    async with session.lock(name + "2"):
                        pass


@pytest.mark.parametrize("same_client", [True, False], ids=["one-client", "two-clients"])
async def test_acquired_revision_is_where_the_queue_emptied(shared_server: ServerProcess, same_client: bool) -> None:
    name = unique("la")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client, coord.open_client(
            shared_server.endpoint
        ) as other, client.session(ttl=10) as s1, (client if same_client else other).session(ttl=10) as s2:
            first, second = s1.lock(name), s2.lock(name)
            await first.acquire()
            assert first.acquired_revision == first.fencing_token  # an empty queue: the own key's creation
            async with anyio.create_task_group() as tg, client.watch(first.key) as events:
                tg.start_soon(second.acquire)
                await wait_until_exists(client, second.key)
                await first.release()
                deleted = await events.receive()
            assert deleted.type is coord.EventType.DELETE
            assert second.acquired_revision == deleted.revision  # ETCD_LOCK_REV: the predecessor's deletion
            assert second.fencing_token < second.acquired_revision
            await second.release()


async def test_is_owner_guards_writes(shared_server: ServerProcess) -> None:
    name, k = unique("lo"), unique("guarded")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            async with client.lock(name, ttl=10) as lock:
                ok = await client.txn([lock.is_owner()], [Put(k, str(lock.fencing_token))])
                assert ok.succeeded
                stale = lock.is_owner()
            res = await client.txn([stale], [Put(k, "stale")])
            assert not res.succeeded
            assert (await client.get(k)).value == str(lock.fencing_token).encode()  # type: ignore[union-attr]


async def test_one_place_per_queue_per_session(shared_server: ServerProcess) -> None:
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client, client.session(ttl=10) as session:
            name = unique("lq")
            async with session.lock(name):
                with pytest.raises(RuntimeError):
                    async with session.lock(name):
                        pass
            async with session.lock(name):  # released: may take it again
                pass


async def test_election_order_proclaim_observe_resign(shared_server: ServerProcess) -> None:
    name = unique("el")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            election = client.election(name)
            assert await election.leader() is None
            seen: list[bytes] = []
            won: list[str] = []
            async with election.observe() as leaders:

                async def observe() -> None:
                    async for kv in leaders:
                        seen.append(kv.value)
                        if kv.value == b"c":
                            return

                async def candidate(label: str, queued: anyio.Event, before: anyio.Event | None) -> None:
                    if before is not None:
                        await before.wait()
                    async with client.session(ttl=10) as session:
                        el = session.election(name)
                        async with anyio.create_task_group() as tg:
                            async def mark() -> None:
                                await wait_until_exists(client, f"{name}/{session.lease_id:x}")
                                queued.set()

                            tg.start_soon(mark)
                            async with el.campaign(label + "0") as term:
                                won.append(label)
                                await term.proclaim(label)
                                assert (await election.leader()).value == label.encode()  # type: ignore[union-attr]
                                await anyio.sleep(0.1)

                qa, qb, qc = anyio.Event(), anyio.Event(), anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(observe)
                    tg.start_soon(candidate, "a", qa, None)
                    tg.start_soon(candidate, "b", qb, qa)
                    tg.start_soon(candidate, "c", qc, qb)
            assert won == ["a", "b", "c"]
            # every leader and every proclamation, in order
            assert seen == [b"a0", b"a", b"b0", b"b", b"c0", b"c"] or seen == [b"a", b"b0", b"b", b"c0", b"c"]
            assert await election.leader() is None


async def test_lost_session_cancels_term(shared_server: ServerProcess) -> None:
    name = unique("et")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client, client.session(ttl=10) as session:
            with pytest.raises(coord.LeadershipLost):
                async with session.election(name).campaign("me") as term:
                    await client.revoke_lease(session.lease_id)
                    await anyio.sleep(20)
            with pytest.raises(coord.LeadershipLost):
                await term.proclaim("again")


async def test_hand_off_within_and_across_clients(shared_server: ServerProcess) -> None:
    """Contenders in two clients: hand-offs between tasks of one client (the releaser tells the next owner
    directly) and between clients (the next owner reads the queue) exclude each other and keep the fencing
    tokens growing; nothing is left behind."""
    name = unique("lx")
    rounds = 4
    inside = 0
    overlaps = 0
    tokens: list[int] = []
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as c1, coord.open_client(shared_server.endpoint) as c2:
            leases_before = await _lease_count(c1)

            async def worker(client: coord.Client) -> None:
                nonlocal inside, overlaps
                async with client.session(ttl=10) as session:
                    lock = session.lock(name)
                    for _ in range(rounds):
                        async with lock:
                            inside += 1
                            overlaps += inside > 1
                            tokens.append(lock.fencing_token)
                            await anyio.sleep(0.002)
                            inside -= 1

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(worker, c1)
                    tg.start_soon(worker, c2)
            assert overlaps == 0
            assert len(tokens) == 8 * rounds and tokens == sorted(set(tokens))
            assert (await c1.get_prefix(name + "/")).count == 0
            assert await _lease_count(c1) == leases_before
            assert not c1._queue_waiters and not c1._queue_releasing


async def test_fifo_order_alternating_clients(shared_server: ServerProcess) -> None:
    name = unique("lf")
    order: list[int] = []
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as c1, coord.open_client(shared_server.endpoint) as c2:
            queued = [anyio.Event() for _ in range(6)]

            async def worker(i: int) -> None:
                async def body(lock: coord.Lock) -> None:
                    order.append(i)
                    await anyio.sleep(0.02)

                await _lock_in_turn((c1, c2)[i % 2], name, i, queued, body)

            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(worker, i)
            assert order == list(range(6))


async def test_reacquiring_reuses_the_queue_watchers(shared_server: ServerProcess) -> None:
    """Two sessions (in two clients) taking turns on one lock: after the first rounds, further hand-offs send no
    watch create request (the own-key and predecessor watchers are kept by the sessions); closing the sessions
    removes them."""
    name = unique("lw")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as c1, coord.open_client(shared_server.endpoint) as c2:
            hubs = (c1._watch_hub(), c2._watch_hub())
            async with c1.session(ttl=10) as s1, c2.session(ttl=10) as s2:
                locks = (s1.lock(name), s2.lock(name))
                turn = [anyio.Event() for _ in range(40)]
                turn[0].set()

                async def player(me: int, rounds: range) -> None:
                    for r in rounds:
                        if r % 2 != me:
                            continue
                        await turn[r].wait()
                        async with locks[me]:
                            turn[r + 1].set()  # the other one queues behind us while we hold
                            await anyio.sleep(0.005)

                async def play(rounds: range) -> None:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(player, 0, rounds)
                        tg.start_soon(player, 1, rounds)

                await play(range(0, 6))
                creates = [h.creates for h in hubs]
                await play(range(6, 38))
                assert [h.creates for h in hubs] == creates
                assert all(h.live for h in hubs)
            assert not any(h.live for h in hubs)


async def test_waiter_whose_key_is_deleted_gives_up_at_once(shared_server: ServerProcess) -> None:
    """The waiter's own key is watched while it waits: deleting it ends the wait with SessionExpired, while the
    holder still holds (etcd #11456 is caught without waiting for the hand-off)."""
    name = unique("lv")
    outcome: list[BaseException] = []
    gave_up = anyio.Event()
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            async with client.session(ttl=10) as hs, client.session(ttl=10) as ws:
                waiter = ws.lock(name)

                async def wait() -> None:
                    try:
                        await waiter.acquire()
                    except coord.SessionExpired as exc:
                        outcome.append(exc)
                    gave_up.set()

                async with hs.lock(name), anyio.create_task_group() as tg:
                    tg.start_soon(wait)
                    await wait_until_exists(client, waiter.key)
                    await client.delete(waiter.key)
                    with anyio.fail_after(5):
                        await gave_up.wait()
                    assert len(outcome) == 1 and not waiter.held
                assert (await client.get_prefix(name + "/")).count == 0


async def test_cancelled_waiter_in_a_chain_of_one_client(shared_server: ServerProcess) -> None:
    """A holds, B and C wait (all in one client, C behind B). B gives up: C, whose predecessor vanished, goes
    back to waiting for A and gets the lock only after A released it."""
    name = unique("lz")
    events: list[str] = []
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            async with client.session(ttl=10) as sa, client.session(ttl=10) as sb, client.session(ttl=10) as sc:
                b_scope = anyio.CancelScope()
                c_lock = sc.lock(name)

                async def b() -> None:
                    with b_scope:
                        async with sb.lock(name):
                            events.append("B")

                async def c() -> None:
                    async with c_lock:
                        events.append("C")

                async with anyio.create_task_group() as tg:
                    async with sa.lock(name):
                        tg.start_soon(b)
                        await wait_until_exists(client, sb.lock(name).key)
                        tg.start_soon(c)
                        await wait_until_exists(client, c_lock.key)
                        b_scope.cancel()
                        await anyio.sleep(0.3)
                        assert events == []  # C must still wait for A
                        events.append("A releases")
                assert events == ["A releases", "C"]


async def test_idle_queue_watchers_are_bounded_and_swept(
    shared_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session keeps the watchers of at most PLACE_CACHE idle queues, and drops those idle for longer than
    PLACE_LINGER at its next keep-alive, without any other lock activity."""
    from coord import _session

    name = unique("lb")
    with anyio.fail_after(DEADLINE):
        async with coord.open_client(shared_server.endpoint) as client:
            hub = client._watch_hub()
            async with client.session(ttl=10) as session:
                for i in range(_session.PLACE_CACHE + 4):
                    async with session.lock(f"{name}-{i}"):
                        pass
                assert len(session._places) == _session.PLACE_CACHE
                assert len(hub.live) == _session.PLACE_CACHE  # free locks: own-key watchers only
            assert not hub.live and not client._queue_places
            monkeypatch.setattr(_session, "PLACE_LINGER", 0.2)
            async with client.session(ttl=3) as session:  # a keep-alive every second
                async with session.lock(name):
                    pass
                assert len(hub.live) == 1
                for _ in range(50):  # ~5 s: several keep-alives
                    if not hub.live:
                        break
                    await anyio.sleep(0.1)
                assert not hub.live and not session._places
