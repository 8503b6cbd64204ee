"""Leases against real etcd 3.4.23 and coord-server: etcdctl transcripts, gRPC response shapes, bad input.

Server-chosen lease IDs differ between two servers (member ID and start time are in them), so the
etcdctl scenarios here capture each ID where it is printed (``lease grant ... => L1``), use it
in later steps as ``{L1}``, and replace it in the output by ``<L1>`` -- by exact value, in every
form etcdctl prints it (%016x, %x, decimal), so an ID printed in the wrong place still differs.
Everything else goes through helpers.normalize like the other differential tests. The gRPC-level
comparisons use client-chosen IDs, which are the same on both servers.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from helpers import ServerProcess, compare_transcripts, etcdctl, find_etcdctl, normalize, normalize_message

from coord._pb import rpc_pb2 as pb
from coord._pb import rpc_pb2_grpc as pbg

pytestmark = pytest.mark.etcd

_GRANTED = re.compile(r"lease ([0-9a-f]{16}) granted")
_GRANTED_JSON = re.compile(r"\"ID\" ?: ?(-?\d+)")


@dataclass
class Run:
    """One server's side of a lease scenario: captured lease IDs and the transcript."""

    server: ServerProcess
    ids: dict[str, int] = field(default_factory=dict)
    parts: list[str] = field(default_factory=list)

    def render(self, text: str) -> str:
        for name, lease_id in self.ids.items():
            text = text.replace("{" + name + "}", f"{lease_id:x}")
        return text

    def record(self, title: str, rc: int, out: str, err: str) -> None:
        self.parts.append(f"$ {title}\n[rc={rc}]\n[stdout]\n{out}\n[stderr]\n{err}\n[end]\n")

    def transcript(self) -> str:
        text = "".join(self.parts)
        # Longest forms first, exact values only (no partial matches inside other numbers).
        for name, lease_id in self.ids.items():
            for form in (f"{lease_id:016x}", str(lease_id), f"{lease_id:x}"):
                text = re.sub(r"(?<![0-9A-Za-z])" + re.escape(form) + r"(?![0-9A-Za-z])", f"<{name}>", text)
        return normalize(text, self.server)


Step = str | Callable[[Run], None]


def run_steps(run: Run, steps: Sequence[Step]) -> str:
    for step in steps:
        if callable(step):
            step(run)
            continue
        line, _, capture = step.partition(" => ")
        args = shlex.split(run.render(line))
        res = etcdctl(run.server.endpoint, *args)
        if capture:
            m = _GRANTED.search(res.stdout) or _GRANTED_JSON.search(res.stdout)
            assert m, f"no lease ID in {res.stdout!r} ({res.stderr!r})"
            run.ids[capture] = int(m.group(1), 16) if m.re is _GRANTED else int(m.group(1))
        run.record(line, res.rc, res.stdout, res.stderr)
    return run.transcript()


def lease_differential(etcd_and_coord: tuple[ServerProcess, ServerProcess], steps: Sequence[Step]) -> str:
    etcd, coord = etcd_and_coord
    with ThreadPoolExecutor(max_workers=2) as pool:
        f_ref = pool.submit(run_steps, Run(etcd), steps)
        f_cand = pool.submit(run_steps, Run(coord), steps)
        ref, cand = f_ref.result(), f_cand.result()
    compare_transcripts(ref, cand)
    return ref


def keep_alive_then(name: str, after_first: Callable[[Run], None] | None, *, sig: int | None = None,
                    timeout: float = 15.0) -> Callable[[Run], None]:
    """``etcdctl lease keep-alive {name}``: wait for its first line, then run ``after_first`` (e.g. a
    revoke) and/or send ``sig``; record rc and output with repeated keep-alive lines collapsed
    (how many fit in the wait is timing)."""

    def step(run: Run) -> None:
        binary = find_etcdctl()
        assert binary is not None
        lease_hex = f"{run.ids[name]:x}"
        env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
        proc = subprocess.Popen([binary, f"--endpoints={run.server.endpoint}", "lease", "keep-alive", lease_hex],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            if after_first is not None:
                after_first(run)
            if sig is not None:
                proc.send_signal(sig)
            rest, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        lines: list[str] = []
        for line in (first + rest).splitlines():
            if not lines or lines[-1] != line:
                lines.append(line)
        run.record(f"lease keep-alive {{{name}}}", proc.returncode, "\n".join(lines) + "\n", err)

    return step


def etcdctl_step(args: str) -> Callable[[Run], None]:
    """An etcdctl call made from inside another step (its output goes to the transcript too)."""

    def step(run: Run) -> None:
        res = etcdctl(run.server.endpoint, *shlex.split(run.render(args)))
        run.record(args, res.rc, res.stdout, res.stderr)

    return step


# ---------------------------------------------------------------------- etcdctl


def test_getting_started_walkthrough(etcd_and_coord: tuple[ServerProcess, ServerProcess]) -> None:
    lease_differential(etcd_and_coord, [
        "lease grant 300 => L1",
        "put --lease={L1} foo3 bar3",
        "lease timetolive --keys {L1}",  # remaining(299s): within a second of the grant on both
        "lease timetolive {L1} -w json",
        "lease timetolive --keys {L1} -w json",
        "get foo3 -w json",
        keep_alive_then("L1", None, sig=signal.SIGINT),
        "lease keep-alive --once {L1}",
        "lease keep-alive --once {L1} -w json",
        "lease list",
        "lease revoke {L1}",
        "lease timetolive --keys {L1}",
        "get foo3 -w json",
        "lease list",
        "lease list -w json",
    ])


def test_keep_alive_ends_when_the_lease_is_revoked(etcd_and_coord: tuple[ServerProcess, ServerProcess]) -> None:
    lease_differential(etcd_and_coord, [
        "lease grant 6 => L1",
        "put --lease={L1} ka v",
        keep_alive_then("L1", etcdctl_step("lease revoke {L1}")),
        "get ka",
    ])


def test_output_formats_several_leases_and_attachments(etcd_and_coord: tuple[ServerProcess, ServerProcess]) -> None:
    lease_differential(etcd_and_coord, [
        "lease grant 100 => A",
        "lease grant 200 -w json => B",
        "lease grant 50 -w fields => C",
        "lease list",  # soonest expiry first: C, A, B
        "put --lease={A} k1 v1",
        "put --lease={A} k2 v2 -w json",
        "put --lease={B} k2 moved",
        "put k1 detached",
        "get k --prefix -w json",
        "lease timetolive --keys {A}",
        "lease timetolive --keys {B} -w fields",
        "lease revoke {B} -w json",
        "get k --prefix",
        "lease revoke {A}",
        "lease revoke {C}",
        "lease list",
        "lease list -w json",
        "get __rev__ -w json",
    ])


def test_bad_input_and_unknown_leases(etcd_and_coord: tuple[ServerProcess, ServerProcess]) -> None:
    lease_differential(etcd_and_coord, [
        "lease revoke 1234",
        "lease timetolive 1234",
        "lease timetolive 1234 -w json",
        "lease timetolive 1234 -w fields",
        "lease keep-alive --once 1234",
        "lease keep-alive --once zz",
        "lease revoke zz",
        "lease timetolive",
        "lease grant",
        "lease grant abc",
        "lease grant 9000000001",
        "lease grant 9000000000 => HUGE",
        "lease timetolive {HUGE}",
        "put --lease=1234 k v",
        "put --lease=zz k v",
        "get k",
        # TTLs below the minimum are raised to it (2 s with the default election timeout).
        "lease grant 0 => Z",
        "lease grant -- -3 => N",
        "lease grant 1 => O",
        "lease revoke {Z}",
        "lease revoke {N}",
        "lease revoke {O}",
        "lease revoke {HUGE}",
        "get __rev__ -w json",
    ])


def test_min_ttl_follows_the_election_timeout(server_factory: Callable[..., ServerProcess], etcd_binary: str) -> None:
    flags = ["--election-timeout=5000", "--heartbeat-interval=100"]
    pair = (server_factory("etcd", extra_args=flags), server_factory("coord", extra_args=flags))
    from helpers import start_all

    start_all(pair, timeout=30)
    lease_differential(pair, [
        "lease grant 1 => A",  # ceil(1.5 * 5 s) = 8 s
        "lease grant 8 => B",
        "lease grant 9 => C",
        "lease revoke {A}",
        "lease revoke {B}",
        "lease revoke {C}",
    ])


def remaining_between(name: str, low: int, high: int) -> Callable[[Run], None]:
    """Record whether the lease's remaining TTL is within [low, high] (the exact second is timing)."""

    def step(run: Run) -> None:
        res = etcdctl(run.server.endpoint, "lease", "timetolive", f"{run.ids[name]:x}", "-w", "json")
        m = re.search(r'"ttl":(-?\d+)', res.stdout)
        ttl = int(m.group(1)) if m else None
        assert ttl is not None and low <= ttl <= high, f"{run.server.kind}: remaining {ttl}, want [{low}, {high}]"
        run.record(f"lease timetolive {{{name}}}: remaining in [{low}, {high}]", res.rc, "ok\n", res.stderr)

    return step


def test_leases_survive_a_restart_with_a_full_ttl_plus_the_grace(
        etcd_and_coord: tuple[ServerProcess, ServerProcess]) -> None:
    def wait(run: Run) -> None:
        time.sleep(2.5)

    def restart(run: Run) -> None:
        run.server.restart(timeout=30)

    lease_differential(etcd_and_coord, [
        "lease grant 10 => L1",
        "lease grant 300 => L2",
        "put --lease={L1} r1 v",
        "put --lease={L2} r2 v",
        "lease revoke {L2}",
        wait,
        remaining_between("L1", 0, 7),  # without a refresh it would have even less after the restart
        restart,
        # full 10 s + 1 s (election timeout), less the moments since the restart
        remaining_between("L1", 8, 10),
        "lease timetolive {L2}",
        "get r --prefix -w json",
        "lease list",
        "lease revoke {L1}",
        "get r --prefix",
    ])


# ---------------------------------------------------------------------- gRPC response shapes


def _channel(server: ServerProcess) -> grpc.Channel:
    return grpc.insecure_channel(server.endpoint)


def _result(fn: Callable[[], Any]) -> Any:
    try:
        got = fn()
    except grpc.RpcError as exc:
        return (exc.code(), exc.details())
    return [normalize_message(m) for m in got] if isinstance(got, list) else normalize_message(got)


def _lease_calls(server: ServerProcess) -> list[tuple[str, Any]]:
    """The same calls (client-chosen IDs) in the same order; every response normalised."""
    out: list[tuple[str, Any]] = []
    with _channel(server) as ch:
        lease, kv = pbg.LeaseStub(ch), pbg.KVStub(ch)

        def call(name: str, fn: Callable[[], Any]) -> None:
            out.append((name, _result(fn)))

        call("grant 100/60", lambda: lease.LeaseGrant(pb.LeaseGrantRequest(ID=100, TTL=60), timeout=5))
        call("grant -5/0", lambda: lease.LeaseGrant(pb.LeaseGrantRequest(ID=-5, TTL=0), timeout=5))
        call("grant -5 again", lambda: lease.LeaseGrant(pb.LeaseGrantRequest(ID=-5, TTL=10), timeout=5))
        call("grant -5 huge", lambda: lease.LeaseGrant(pb.LeaseGrantRequest(ID=-5, TTL=9_000_000_001), timeout=5))
        call("grant 7 max", lambda: lease.LeaseGrant(pb.LeaseGrantRequest(ID=7, TTL=9_000_000_000), timeout=5))
        call("grant 8 negative ttl", lambda: lease.LeaseGrant(pb.LeaseGrantRequest(ID=8, TTL=-100), timeout=5))
        call("put a", lambda: kv.Put(pb.PutRequest(key=b"a", value=b"1", lease=100), timeout=5))
        call("put b", lambda: kv.Put(pb.PutRequest(key=b"b", value=b"1", lease=100, prev_kv=True), timeout=5))
        call("put b moves", lambda: kv.Put(pb.PutRequest(key=b"b", value=b"2", lease=7, prev_kv=True), timeout=5))
        call("put c unknown", lambda: kv.Put(pb.PutRequest(key=b"c", lease=1234), timeout=5))
        call("txn put", lambda: kv.Txn(pb.TxnRequest(success=[
            pb.RequestOp(request_put=pb.PutRequest(key=b"t", lease=-5))]), timeout=5))
        call("txn unknown lease", lambda: kv.Txn(pb.TxnRequest(success=[
            pb.RequestOp(request_put=pb.PutRequest(key=b"t", lease=99))]), timeout=5))
        call("ttl 100 keys", lambda: lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=100, keys=True), timeout=5))
        call("ttl 7", lambda: lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=7), timeout=5))
        call("ttl unknown", lambda: lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=4321, keys=True), timeout=5))
        call("ttl 0", lambda: lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=0), timeout=5))
        call("leases", lambda: lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=5))
        call("keepalive", lambda: list(lease.LeaseKeepAlive(iter([
            pb.LeaseKeepAliveRequest(ID=100), pb.LeaseKeepAliveRequest(ID=0), pb.LeaseKeepAliveRequest(ID=999),
            pb.LeaseKeepAliveRequest(ID=-5), pb.LeaseKeepAliveRequest(ID=7)]), timeout=5)))
        call("keepalive empty stream", lambda: list(lease.LeaseKeepAlive(iter([]), timeout=5)))
        call("revoke 100", lambda: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=100), timeout=5))
        call("range after revoke", lambda: kv.Range(pb.RangeRequest(key=b"a", range_end=b"z"), timeout=5))
        call("revoke 100 again", lambda: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=100), timeout=5))
        call("revoke 0", lambda: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=0), timeout=5))
        call("revoke 8 (no keys)", lambda: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=8), timeout=5))
        call("keepalive revoked", lambda: list(lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=100)]),
                                                                     timeout=5)))
        call("revoke -5", lambda: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=-5), timeout=5))
        call("revoke 7", lambda: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=7), timeout=5))
        call("leases empty", lambda: lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=5))
        # Same history byte for byte (lease fields, revoke order of the deleted keys): same HashKV.
        call("hashkv", lambda: pbg.MaintenanceStub(ch).HashKV(pb.HashKVRequest(), timeout=5))
    return out


def test_grpc_response_shapes_match(etcd_and_coord: tuple[ServerProcess, ServerProcess]) -> None:
    etcd, coord = etcd_and_coord
    with ThreadPoolExecutor(max_workers=2) as pool:
        f_ref, f_cand = pool.submit(_lease_calls, etcd), pool.submit(_lease_calls, coord)
        ref, cand = f_ref.result(), f_cand.result()
    for (name, want), (_, got) in zip(ref, cand, strict=True):
        if name == "ttl 100 keys":  # key order is not defined (etcd: Go map order)
            want.keys.sort()
            got.keys.sort()
        assert got == want, f"{name}:\netcd:  {want}\ncoord: {got}"


# ---------------------------------------------------------------------- both servers: IDs and bad input


def test_server_chosen_ids_are_laid_out_as_etcds(server: ServerProcess) -> None:
    with _channel(server) as ch:
        lease = pbg.LeaseStub(ch)
        ids = [lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60), timeout=5).ID for _ in range(3)]
        for lease_id in ids:
            lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease_id), timeout=5)
    now_ms = time.time_ns() // 1_000_000
    for lease_id in ids:
        assert 0 < lease_id < 2**63
        assert lease_id >> 48 == server.member_id & 0x7FFF, "low 15 bits of the member ID on top"
        started_ms = (lease_id >> 8) & ((1 << 40) - 1)  # the server's start time (ms, low 40 bits)
        assert 0 <= (now_ms & ((1 << 40) - 1)) - started_ms < 10 * 60 * 1000
    assert ids == sorted(ids) and len(set(ids)) == 3, "increasing (the counter is shared: not consecutive)"


NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found")


def test_keep_alive_storm_on_one_stream(server: ServerProcess) -> None:
    n = 10_000
    with _channel(server) as ch:
        lease = pbg.LeaseStub(ch)
        lease.LeaseGrant(pb.LeaseGrantRequest(ID=77, TTL=30), timeout=5)
        ids = [77 if i % 2 else 78 for i in range(n)]  # 78 does not exist
        replies = list(lease.LeaseKeepAlive(iter(pb.LeaseKeepAliveRequest(ID=i) for i in ids), timeout=60))
        assert [(r.ID, r.TTL) for r in replies] == [(i, 30 if i == 77 else 0) for i in ids]
        assert all(r.header.member_id == server.member_id for r in replies)
        left = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=77), timeout=5)
        assert left.TTL >= 28
        lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=77), timeout=5)


def test_a_keep_alive_stream_that_sends_garbage_fails_alone(server: ServerProcess) -> None:
    with _channel(server) as ch:
        lease = pbg.LeaseStub(ch)
        lease.LeaseGrant(pb.LeaseGrantRequest(ID=5, TTL=30), timeout=5)
        raw = ch.stream_stream("/etcdserverpb.Lease/LeaseKeepAlive", request_serializer=lambda b: b,
                               response_deserializer=pb.LeaseKeepAliveResponse.FromString)
        good = pb.LeaseKeepAliveRequest(ID=5).SerializeToString()
        got: list[Any] = []
        with pytest.raises(grpc.RpcError) as err:
            for reply in raw(iter([good, b"\xff\xff\xff", good]), timeout=10):
                got.append(reply)
        # The message text is the protobuf library's (Go's vs Python's); the code is the contract.
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert [(r.ID, r.TTL) for r in got] in ([], [(5, 30)])
        # Other streams and the lease itself are unaffected.
        replies = list(lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=5)]), timeout=5))
        assert [(r.ID, r.TTL) for r in replies] == [(5, 30)]
        lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=5), timeout=5)


def test_unknown_ids_and_bad_ttls(server: ServerProcess) -> None:
    with _channel(server) as ch:
        lease, kv = pbg.LeaseStub(ch), pbg.KVStub(ch)
        rev = kv.Range(pb.RangeRequest(key=b"x"), timeout=5).header.revision
        for lease_id in (0, 1, -1, 2**63 - 1, -(2**63)):
            with pytest.raises(grpc.RpcError) as err:
                lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease_id), timeout=5)
            assert (err.value.code(), err.value.details()) == NOT_FOUND
            ttl = lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease_id, keys=True), timeout=5)
            assert (ttl.ID, ttl.TTL, ttl.grantedTTL, list(ttl.keys)) == (lease_id, -1, 0, [])
        for ttl_in, ttl_out in ((0, 2), (-1, 2), (-(2**63), 2), (1, 2), (2, 2), (3, 3)):
            resp = lease.LeaseGrant(pb.LeaseGrantRequest(ID=500, TTL=ttl_in), timeout=5)
            assert (resp.ID, resp.TTL) == (500, ttl_out)
            lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=500), timeout=5)
        for huge in (9_000_000_001, 2**63 - 1):
            with pytest.raises(grpc.RpcError) as err:
                lease.LeaseGrant(pb.LeaseGrantRequest(TTL=huge), timeout=5)
            assert (err.value.code(), err.value.details()) == (
                grpc.StatusCode.OUT_OF_RANGE, "etcdserver: too large lease TTL")
        assert kv.Range(pb.RangeRequest(key=b"x"), timeout=5).header.revision == rev, "no state change"
        assert list(lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=5).leases) == []
