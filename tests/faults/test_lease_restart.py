"""Leases across SIGKILL + restart of a real coord-server process.

1. Durability: grants and leased puts run in several client threads until the server is SIGKILLed
   mid-stream. After the restart every acknowledged grant exists and every acknowledged put is
   still attached to its lease (counts: lost grants = 0, lost attachments = 0), and a lease
   revoked before the kill stays revoked with its keys.
2. No early expiry after a restart: every lease gets its full granted TTL plus the election-timeout
   grace from the moment the new process starts, also a lease that had almost run out before the
   kill. A read that finds its key gone and whose reply arrived before spawn + TTL + grace is an
   early expiry (the bound can only be loose in the server's favour: the process spawned before
   it refreshed the leases). Each expiry after the restart still takes exactly one revision.

``COORD_LEASE_CYCLES`` sets the number of kill/restart cycles of part 1 (soak: more);
``COORD_LEASE_SEED`` replays the kill timing.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from coord._pb import rpc_pb2 as pb
from coord._pb import rpc_pb2_grpc as pbg

from ._server import ServerProcess, head_revision

GRACE = 1.0  # the default --election-timeout
RPC_TIMEOUT = 5.0


@dataclass
class Acked:
    grants: dict[int, int] = field(default_factory=dict)  # lease id -> ttl
    puts: dict[bytes, int] = field(default_factory=dict)  # key -> lease id (the last acknowledged put)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _worker(srv: ServerProcess, acked: Acked, base: int, stop: threading.Event) -> None:
    with srv.channel() as ch:
        lease, kv = pbg.LeaseStub(ch), pbg.KVStub(ch)
        n = 0
        while not stop.is_set():
            n += 1
            lease_id = base + n
            try:
                lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=120), timeout=RPC_TIMEOUT)
                with acked.lock:
                    acked.grants[lease_id] = 120
                key = b"dur/%d" % lease_id
                kv.Put(pb.PutRequest(key=key, value=b"v", lease=lease_id), timeout=RPC_TIMEOUT)
                with acked.lock:
                    acked.puts[key] = lease_id
            except grpc.RpcError:
                return  # only the kill makes calls fail


def _check_durable(srv: ServerProcess, acked: Acked) -> tuple[int, int]:
    """(lost grants, lost attachments) after a restart."""
    lost_grants = lost_puts = 0
    with srv.channel() as ch:
        lease, kv = pbg.LeaseStub(ch), pbg.KVStub(ch)
        for lease_id in acked.grants:
            resp = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease_id, keys=True), timeout=RPC_TIMEOUT)
            if resp.TTL <= 0 or resp.grantedTTL != acked.grants[lease_id]:
                lost_grants += 1
        for key, lease_id in acked.puts.items():
            kvs = kv.Range(pb.RangeRequest(key=key), timeout=RPC_TIMEOUT).kvs
            ttl = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease_id, keys=True), timeout=RPC_TIMEOUT)
            if not kvs or kvs[0].lease != lease_id or key not in ttl.keys:
                lost_puts += 1
    return lost_grants, lost_puts


def _durability(tmp_path: Path, cycles: int) -> None:
    rng = random.Random(int(os.environ.get("COORD_LEASE_SEED") or random.SystemRandom().getrandbits(32)))
    srv = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    acked = Acked()
    try:
        srv.start()
        srv.wait_ready()
        with srv.channel() as ch:
            lease, kv = pbg.LeaseStub(ch), pbg.KVStub(ch)
            lease.LeaseGrant(pb.LeaseGrantRequest(ID=-1, TTL=120), timeout=RPC_TIMEOUT)
            kv.Put(pb.PutRequest(key=b"revoked/1", lease=-1), timeout=RPC_TIMEOUT)
            lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=-1), timeout=RPC_TIMEOUT)
        for cycle in range(cycles):
            stop = threading.Event()
            threads = [threading.Thread(target=_worker, args=(srv, acked, (cycle * 8 + w + 1) * 1_000_000, stop))
                       for w in range(4)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 1.2))
            srv.kill()
            stop.set()
            for t in threads:
                t.join(timeout=30)
            srv.start()
            srv.wait_ready()
            lost_grants, lost_puts = _check_durable(srv, acked)
            print(f"cycle {cycle}: {len(acked.grants)} acknowledged grants, {len(acked.puts)} acknowledged "
                  f"leased puts; lost grants {lost_grants}, lost attachments {lost_puts}")
            assert (lost_grants, lost_puts) == (0, 0)
        assert len(acked.grants) > 0 and len(acked.puts) > 0
        with srv.channel() as ch:
            ttl = pbg.LeaseStub(ch).LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=-1), timeout=RPC_TIMEOUT)
            assert ttl.TTL == -1, "a revoke acknowledged before the kills stays revoked"
            assert pbg.KVStub(ch).Range(pb.RangeRequest(key=b"revoked/1"), timeout=RPC_TIMEOUT).count == 0
    finally:
        srv.kill()


def test_acknowledged_grants_and_attachments_survive_sigkill(tmp_path: Path) -> None:
    _durability(tmp_path, int(os.environ.get("COORD_LEASE_CYCLES") or 2))


@pytest.mark.soak
def test_acknowledged_grants_and_attachments_survive_sigkill_soak(tmp_path: Path) -> None:
    _durability(tmp_path, int(os.environ.get("COORD_LEASE_CYCLES") or 30))


def test_no_early_expiry_after_sigkill_and_restart(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    try:
        srv.start()
        srv.wait_ready()
        with srv.channel() as ch:
            lease, kv = pbg.LeaseStub(ch), pbg.KVStub(ch)
            for lease_id, ttl, keys in [(1, 4, 3), (2, 3, 2), (3, 60, 1)]:
                lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=ttl), timeout=RPC_TIMEOUT)
                for k in range(keys):
                    kv.Put(pb.PutRequest(key=b"l%d/%d" % (lease_id, k), lease=lease_id), timeout=RPC_TIMEOUT)
            # Lease 1 is kept alive; lease 2 is not: it has about 1 s left when the server dies.
            replies = lease.LeaseKeepAlive(iter(_paced([1] * 4, 0.5)), timeout=30)
            assert [r.TTL for r in replies] == [4] * 4
            left = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=2), timeout=RPC_TIMEOUT).TTL
            assert left <= 1
            rev_before = head_revision(kv)
        srv.kill()
        srv.start()
        spawned = srv.started_at
        srv.wait_ready()
        with srv.channel() as ch:
            lease, kv = pbg.LeaseStub(ch), pbg.KVStub(ch)
            assert head_revision(kv) == rev_before
            ttls = {i: lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=i, keys=True), timeout=RPC_TIMEOUT)
                    for i in (1, 2, 3)}
            assert {i: (r.grantedTTL, len(r.keys)) for i, r in ttls.items()} == {1: (4, 3), 2: (3, 2), 3: (60, 1)}
            assert ttls[2].TTL >= 2, "lease 2 got its full TTL back (3 s + grace - start-up), not its last 1 s"
            deadline = {1: spawned + 4 + GRACE, 2: spawned + 3 + GRACE}
            gone_at: dict[int, float] = {}
            early: list[str] = []
            while len(gone_at) < 2:
                for i in (1, 2):
                    if i in gone_at:
                        continue
                    t_send = time.monotonic()
                    count = kv.Range(pb.RangeRequest(key=b"l%d/" % i, range_end=b"l%d0" % i, count_only=True),
                                     timeout=RPC_TIMEOUT).count
                    t_recv = time.monotonic()
                    if count == 0:
                        if t_recv < deadline[i]:
                            early.append(f"lease {i}: keys gone {deadline[i] - t_recv:.3f}s before TTL + grace")
                        gone_at[i] = t_send
                    else:
                        assert count == (3 if i == 1 else 2), "all keys of a lease go in one revision"
                assert time.monotonic() < srv.ready_at + 15, "leases never expired after the restart"
                time.sleep(0.02)
            assert early == []
            for i in (1, 2):
                assert gone_at[i] <= srv.ready_at + (4 if i == 1 else 3) + GRACE + 1.5
            assert head_revision(kv) == rev_before + 2, "one revision per expired lease"
            assert lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=3), timeout=RPC_TIMEOUT).TTL > 50
            assert kv.Range(pb.RangeRequest(key=b"l3/0"), timeout=RPC_TIMEOUT).count == 1
    finally:
        srv.kill()


def _paced(ids: list[int], interval: float) -> Iterator[pb.LeaseKeepAliveRequest]:
    for i in ids:
        yield pb.LeaseKeepAliveRequest(ID=i)
        time.sleep(interval)
