"""Sessions, locks and elections on every backend against both servers (the fast, non-TTL-bound cases)."""

from __future__ import annotations

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
                nonlocal inside, overlaps
                if i:
                    await queued[i - 1].wait()
                async with client.session(ttl=10) as session:
                    lock = session.lock(name)
                    async with anyio.create_task_group() as tg:
                        # mark "queued" once this waiter's key exists (its create revision fixes its place)
                        async def mark() -> None:
                            await wait_until_exists(client, lock.key)
                            queued[i].set()

                        tg.start_soon(mark)
                        async with lock:
                            inside += 1
                            overlaps += inside > 1
                            order.append(i)
                            tokens.append(lock.fencing_token)
                            await anyio.sleep(0.02)
                            inside -= 1

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
