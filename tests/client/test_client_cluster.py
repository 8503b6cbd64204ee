"""Failover against a real 3-member etcd cluster on loopback.

The member the client uses is SIGKILLed (calls and a watch continue on the others: 0 lost and 0 duplicated
events against the cluster's own history), then another member is frozen with SIGSTOP (the watch notices
the silent stream through its progress probe and moves on; the session stays HELD through another member).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import EtcdProcess
from helpers.client_kit import start_etcd_cluster, unique

import coord
from coord import SessionState

pytestmark = [pytest.mark.anyio, pytest.mark.etcd]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[list[EtcdProcess]]:
    binary = request.getfixturevalue("etcd_binary")
    members = start_etcd_cluster(Path(tmp_path_factory.mktemp("cluster")), binary)
    try:
        yield members
    finally:
        for m in members:
            m.stop()


def by_endpoint(members: list[EtcdProcess], endpoint: str) -> EtcdProcess:
    return next(m for m in members if m.endpoint == endpoint)


Record = tuple[int, int, bytes, bytes]


async def _collect(events: coord.Watch, until: int, out: list[Record]) -> None:
    while not out or out[-1][0] < until:
        ev = await events.receive()
        out.append((ev.revision, ev.type.value, ev.key, ev.kv.value))


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_failover_kill_and_freeze_members(cluster: list[EtcdProcess], anyio_backend: Any) -> None:
    p = unique("cl") + "/"
    endpoints = [m.endpoint for m in cluster]
    acked: dict[int, bytes] = {}
    unknown = 0
    seen: list[Record] = []
    with anyio.fail_after(120):
        async with coord.open_client(endpoints, watch_probe_interval=1.0) as client:
            start = (await client.put(p + "start", "s")).revision + 1
            async with client.watch(p, prefix=True, start_revision=start) as events, client.session(ttl=6) as session:

                async def write(n: int, tag: str) -> None:
                    nonlocal unknown
                    for i in range(n):
                        try:
                            r = await client.put(f"{p}{tag}{i % 5}", f"{tag}{i}")
                            acked[r.revision] = f"{tag}{i}".encode()
                        except coord.OutcomeUnknown:
                            unknown += 1
                        assert await client.get(f"{p}{tag}{i % 5}") is not None  # reads continue too

                await write(30, "a")
                victim = by_endpoint(cluster, client.current_endpoint)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(write, 60, "b")
                    await anyio.sleep(0.1)
                    await anyio.to_thread.run_sync(victim.kill)  # SIGKILL the member in use, mid-writes
                await write(5, "d")  # the writes above may all have finished before the kill
                assert client.current_endpoint != victim.endpoint
                await _collect(events, max(acked), seen)
                for _ in range(100):  # the keep-alive stream to the killed member broke: it reconnects elsewhere
                    if session.state is SessionState.HELD:
                        break
                    await anyio.sleep(0.05)
                assert session.state is SessionState.HELD

                # a frozen member: its TCP connections stay open but nothing is answered. (The killed member comes
                # back first: two of three members must be up for a quorum.)
                await anyio.to_thread.run_sync(victim.start)
                frozen = by_endpoint(cluster, client.current_endpoint)
                others = [m.endpoint for m in cluster if m is not frozen]
                async with coord.open_client(others) as writer:
                    frozen.kill(signal.SIGSTOP)
                    try:
                        for i in range(20):
                            try:  # the frozen member may be the raft leader: writes time out until re-election
                                r = await writer.put(f"{p}c{i % 5}", f"c{i}")
                                acked[r.revision] = f"c{i}".encode()
                            except coord.OutcomeUnknown:
                                unknown += 1
                        await _collect(events, max(acked), seen)
                        await anyio.sleep(2.5)  # past several keep-alive intervals
                        assert session.state is SessionState.HELD
                    finally:
                        frozen.kill(signal.SIGCONT)
                # (the watch collected every write above while its member was frozen: it had moved on)

            history: list[Record] = []
            async with client.watch(p, prefix=True, start_revision=start) as replay:
                await _collect(replay, max(acked), history)
    assert len(seen) == len(set(seen)), "duplicated events"
    assert seen[: len(history)] == history[: len(seen)] and len(seen) == len(history), "lost or extra events"
    got = {rev: value for rev, _, _, value in seen}
    assert all(got.get(rev) == value for rev, value in acked.items())
    assert unknown <= 10
