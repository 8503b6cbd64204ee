"""v3lock and v3election over gRPC, differential: the same scenarios against a real etcd 3.4.23 and
coord-server, every answer compared (headers reduced to their revision; lease IDs are chosen by the
test, except for the lease-0 case where the server picks one and the test replaces it by <LEASE>).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import CoordServerProcess, EtcdProcess, ServerProcess, start_all
from helpers.watch_client import CHANNEL_OPTIONS

from coord._pb import rpc_pb2 as pb
from coord._pb import rpc_pb2_grpc as pbg
from coord._pb import v3election_pb2 as epb
from coord._pb import v3election_pb2_grpc as epbg
from coord._pb import v3lock_pb2 as lpb
from coord._pb import v3lock_pb2_grpc as lpbg


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, etcd_binary: str) -> Iterator[tuple[ServerProcess, ...]]:
    base = Path(tmp_path_factory.mktemp("lock-wire"))
    servers = (EtcdProcess(base / "etcd", binary=etcd_binary), CoordServerProcess(base / "coord"))
    start_all(servers)
    try:
        yield servers
    finally:
        for srv in servers:
            srv.stop()


class Ctx:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(server.endpoint, options=CHANNEL_OPTIONS)
        self.kv = pbg.KVStub(self.channel)
        self.lease = pbg.LeaseStub(self.channel)
        self.lock = lpbg.LockStub(self.channel)
        self.election = epbg.ElectionStub(self.channel)
        self.out: list[str] = []
        self.replace: dict[str, str] = {}

    def grant(self, lease_id: int, ttl: int = 60) -> int:
        return int(self.lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=ttl), timeout=10).ID)

    def keys(self, prefix: bytes) -> list[bytes]:
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        return [kv.key for kv in self.kv.Range(pb.RangeRequest(key=prefix, range_end=end), timeout=10).kvs]

    def wait_keys(self, prefix: bytes, n: int) -> None:
        for _ in range(500):
            if len(self.keys(prefix)) >= n:
                return
            time.sleep(0.01)
        raise AssertionError(f"{self.server.kind}: {prefix!r} never had {n} keys")

    def call(self, label: str, fn: Callable[[], Any]) -> Any:
        """Record ``fn()``'s answer: the response (headers reduced) or the error code and text."""
        try:
            resp = fn()
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or exc.details() == "context deadline exceeded":
                # The client's own timer and the server's answer race: etcd's lock/election servers return
                # their context's error as UNKNOWN "context deadline exceeded" when theirs fires first.
                self.out.append(f"{label}: deadline exceeded")
            else:
                self.out.append(f"{label}: {exc.code().name} {exc.details()!r}")
            return None
        self.out.append(f"{label}: {show(resp)}")
        return resp

    def note(self, text: str) -> None:
        self.out.append(text)

    def transcript(self) -> list[str]:
        out = []
        for line in self.out:
            for old, new in self.replace.items():
                line = line.replace(old, new)
            out.append(line)
        return out


def show(msg: Any) -> str:
    """Text of a response with header IDs and term cleared (revision kept)."""
    m = type(msg)()
    m.CopyFrom(msg)
    if m.HasField("header"):
        m.header.cluster_id = m.header.member_id = m.header.raft_term = 0
    return " ".join(str(m).split())


def background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except grpc.RpcError as exc:
            box.append(f"{exc.code().name} {exc.details()!r}")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


# ---------------------------------------------------------------------------------------------------
# scenarios


def lock_basics(c: Ctx) -> None:
    a = c.grant(0x1A)
    c.call("lock", lambda: c.lock.Lock(lpb.LockRequest(name=b"L1", lease=a), timeout=10))
    c.call("lock again, same lease", lambda: c.lock.Lock(lpb.LockRequest(name=b"L1", lease=a), timeout=10))
    c.call("unlock", lambda: c.lock.Unlock(lpb.UnlockRequest(key=b"L1/1a"), timeout=10))
    c.call("unlock missing key", lambda: c.lock.Unlock(lpb.UnlockRequest(key=b"L1/1a"), timeout=10))
    c.call("unlock empty key", lambda: c.lock.Unlock(lpb.UnlockRequest(), timeout=10))
    c.call("lock unknown lease", lambda: c.lock.Lock(lpb.LockRequest(name=b"L1", lease=0x999), timeout=10))
    c.call("lock negative lease", lambda: c.lock.Lock(lpb.LockRequest(name=b"L1n", lease=c.grant(-7)), timeout=10))
    c.note(f"keys: {c.keys(b'L1')}")


def lock_queue_handoff_and_cancel(c: Ctx) -> None:
    a, b, d = c.grant(0x2A), c.grant(0x2B), c.grant(0x2D)
    c.call("lock a", lambda: c.lock.Lock(lpb.LockRequest(name=b"L2", lease=a), timeout=10))
    c.call("lock b times out", lambda: c.lock.Lock(lpb.LockRequest(name=b"L2", lease=b), timeout=0.5))
    c.wait_keys(b"L2/", 1)
    time.sleep(0.3)  # the cancelled waiter's key is removed
    c.note(f"after cancel: {c.keys(b'L2/')}")
    t, box = background(lambda: c.lock.Lock(lpb.LockRequest(name=b"L2", lease=d), timeout=20))
    c.wait_keys(b"L2/", 2)
    c.call("unlock a", lambda: c.lock.Unlock(lpb.UnlockRequest(key=b"L2/2a"), timeout=10))
    t.join(20)
    c.note(f"d acquired: {show(box[0]) if box and not isinstance(box[0], str) else box}")
    c.call("unlock d", lambda: c.lock.Unlock(lpb.UnlockRequest(key=b"L2/2d"), timeout=10))


def lock_lease_zero(c: Ctx) -> None:
    resp = c.call("lock lease 0", lambda: c.lock.Lock(lpb.LockRequest(name=b"L3"), timeout=10))
    key = resp.key.decode()
    c.replace[key.split("/", 1)[1]] = "<LEASE>"
    ttl = c.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=int(key.split("/")[1], 16)), timeout=10)
    c.note(f"its lease: granted {ttl.grantedTTL}s, remaining > 50: {ttl.TTL > 50}")
    c.call("unlock", lambda: c.lock.Unlock(lpb.UnlockRequest(key=resp.key), timeout=10))


def election(c: Ctx) -> None:
    a, b = c.grant(0x3A), c.grant(0x3B)
    c.call("leader, none", lambda: c.election.Leader(epb.LeaderRequest(name=b"E1"), timeout=10))
    first = c.call("campaign a", lambda: c.election.Campaign(
        epb.CampaignRequest(name=b"E1", lease=a, value=b"v1"), timeout=10))
    observed: list[Any] = []
    obs_call = c.election.Observe(epb.LeaderRequest(name=b"E1"), timeout=30)

    def observe() -> None:
        try:
            for r in obs_call:
                observed.append(r)
        except grpc.RpcError:
            pass

    ot = threading.Thread(target=observe, daemon=True)
    ot.start()
    t, box = background(lambda: c.election.Campaign(epb.CampaignRequest(name=b"E1", lease=b, value=b"w"),
                                                     timeout=20))
    c.wait_keys(b"E1/", 2)
    c.call("leader", lambda: c.election.Leader(epb.LeaderRequest(name=b"E1"), timeout=10))
    c.call("proclaim", lambda: c.election.Proclaim(epb.ProclaimRequest(leader=first.leader, value=b"v2"), timeout=10))
    stale = epb.LeaderKey(name=b"E1", key=first.leader.key, rev=first.leader.rev + 1000, lease=a)
    c.call("proclaim stale", lambda: c.election.Proclaim(epb.ProclaimRequest(leader=stale, value=b"x"), timeout=10))
    c.call("proclaim no leader field", lambda: c.election.Proclaim(epb.ProclaimRequest(value=b"x"), timeout=10))
    c.call("resign no leader field", lambda: c.election.Resign(epb.ResignRequest(), timeout=10))
    c.call("campaign a again, new value", lambda: c.election.Campaign(
        epb.CampaignRequest(name=b"E1", lease=a, value=b"v3"), timeout=10))
    c.call("resign a", lambda: c.election.Resign(epb.ResignRequest(leader=first.leader), timeout=10))
    t.join(20)
    c.note(f"b elected: {show(box[0]) if box and not isinstance(box[0], str) else box}")
    c.call("resign a again (stale)", lambda: c.election.Resign(epb.ResignRequest(leader=first.leader), timeout=10))
    c.call("leader now", lambda: c.election.Leader(epb.LeaderRequest(name=b"E1"), timeout=10))
    for _ in range(200):
        if len(observed) >= 4:
            break
        time.sleep(0.02)
    obs_call.cancel()
    ot.join(10)
    for r in observed:
        c.note(f"observed: {show(r)}")


def campaign_cancelled(c: Ctx) -> None:
    a, b = c.grant(0x4A), c.grant(0x4B)
    c.call("campaign a", lambda: c.election.Campaign(epb.CampaignRequest(name=b"E2", lease=a, value=b"1"),
                                                      timeout=10))
    c.call("campaign b times out", lambda: c.election.Campaign(
        epb.CampaignRequest(name=b"E2", lease=b, value=b"2"), timeout=0.5))
    time.sleep(0.3)
    c.note(f"after cancel: {c.keys(b'E2/')}")
    c.call("campaign unknown lease", lambda: c.election.Campaign(
        epb.CampaignRequest(name=b"E2", lease=0x777, value=b"3"), timeout=10))


SCENARIOS: list[Callable[[Ctx], None]] = [lock_basics, lock_queue_handoff_and_cancel, lock_lease_zero, election,
                                          campaign_cancelled]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_lock_and_election_match_etcd(pair: tuple[ServerProcess, ...], scenario: Callable[[Ctx], None]) -> None:
    transcripts = []
    for srv in pair:
        ctx = Ctx(srv)
        try:
            scenario(ctx)
        finally:
            ctx.channel.close()
        transcripts.append(ctx.transcript())
    etcd_out, coord_out = transcripts
    assert coord_out == etcd_out
