#!/usr/bin/env python3
"""Lease benchmark: keep-alive throughput, expiry precision and an expiry pile-up, etcd vs coord-server.

Every server runs pinned to one core (``taskset -c 0``) on free loopback ports with a temporary
data dir on disk; the load runs on the other core. Per server, in this order:

1. **Keep-alive throughput.** ``--leases`` (10,000) leases are granted with client-chosen IDs and a
   long TTL. ``--streams`` (4) ``h2load`` processes each open one LeaseKeepAlive stream after another
   on their own connection; a stream's request body is one keep-alive for each of its share of the
   leases (10,000 / 4 = 2,500), so every stream renews its leases once and half-closes. A
   fixed-count correctness run comes first: every call must succeed and the reply bytes must add
   up exactly to one reply (with TTL = the granted TTL) per request message. The timed run
   (``--duration``) reports keep-alives answered per second, the time one stream takes for its
   share, and server CPU per keep-alive. Afterwards every lease must still exist with its full TTL.
2. **Expiry precision.** ``--expiry-leases`` (1,000) leases with TTL ``--expiry-ttl`` (3 s) are
   granted one by one over ``--expiry-spread`` (2 s), each with one key. A watch on the keys records
   when each DELETE arrives. Lateness = DELETE arrival - (grant reply + TTL): the server set the
   deadline before replying, so a lease expired on time shows a lateness of about one RPC at most.
   Reports p50/p99/max lateness and checks that every lease expired and none early (a DELETE before
   grant request + TTL would be an early expiry).
3. **Expiry pile-up** (``--pileup``, 10,000; 0 to skip). That many leases with one key each are
   lined up to expire within a moment (granted with a long TTL, then renewed all at once on one
   stream), while one client writes a key every 10 ms. Reports how long the server took to revoke
   them all (etcd's and coord's rate limit: 1,000/s), and the write latency during the pile-up
   against before it: the pile-up must not stall writes.

Prints a side-by-side table with coord/etcd ratios and writes ``benchmarks/results/lease-<stamp>.json``.

    python benchmarks/lease_bench.py            # the run docs/performance.md reports (~3 min)
    python benchmarks/lease_bench.py --quick    # smoke run (~1 min)

Needs: Linux, ``taskset``, ``h2load`` (nghttp2-client), ``etcd`` 3.4, and coord importable by this
interpreter (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common as common  # noqa: E402
import grpc  # noqa: E402

from coord._pb import rpc_pb2 as pb  # noqa: E402
from coord._pb import rpc_pb2_grpc as pbg  # noqa: E402

KEEPALIVE_TTL = 600
SERVER_ORDER = ("etcd", "coord")


class CheckFailed(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# servers


def make_server(args: argparse.Namespace, name: str, base: Path) -> common.ServerProcess:
    port, cmd = common.member_command(name, base, etcd=args.etcd, python=args.python)
    return common.ServerProcess(name, port, common.pinned(args.server_core, cmd), base / f"{name}.log", cwd=base)


def channel(server: common.ServerProcess) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.enable_http_proxy", 0)])


def wait_ready(server: common.ServerProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited early:\n{server.log_tail()}")
        try:
            with channel(server) as ch:
                pbg.KVStub(ch).Range(pb.RangeRequest(key=b"x"), timeout=2)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def grant_many(server: common.ServerProcess, ids: list[int], ttl: int, key_prefix: bytes | None = None,
               threads: int = 8) -> None:
    """Grant every ID, ``threads`` clients in parallel; then, with ``key_prefix``, put one key per
    lease (128 puts per Txn)."""
    chunks = [ids[i::threads] for i in range(threads)]

    def work(chunk: list[int]) -> None:
        with channel(server) as ch:
            lease, kv = pbg.LeaseStub(ch), pbg.KVStub(ch)
            for lease_id in chunk:
                lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=ttl), timeout=30)
            if key_prefix is None:
                return
            for i in range(0, len(chunk), 128):
                puts = [pb.RequestOp(request_put=pb.PutRequest(key=key_prefix + b"%d" % x, lease=x))
                        for x in chunk[i : i + 128]]
                kv.Txn(pb.TxnRequest(success=puts), timeout=30)

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(work, c) for c in chunks]:
            f.result()


def revoke_all(server: common.ServerProcess) -> None:
    with channel(server) as ch:
        lease = pbg.LeaseStub(ch)
        ids = [s.ID for s in lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=30).leases]
    chunks = [ids[i::8] for i in range(8)]

    def work(chunk: list[int]) -> None:
        with channel(server) as ch:
            stub = pbg.LeaseStub(ch)
            for lease_id in chunk:
                with contextlib.suppress(grpc.RpcError):  # may expire meanwhile
                    stub.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease_id), timeout=30)

    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(work, c) for c in chunks]:
            f.result()


# --------------------------------------------------------------------------------------------------
# 1. keep-alive throughput


def h2load_keepalive(args: argparse.Namespace, port: int, body: Path, *, requests: int | None = None,
                     duration: float | None = None) -> subprocess.Popen[str]:
    cmd = common.pinned(args.load_core, [args.h2load, "-d", str(body), "-H", "content-type: application/grpc",
                                  "-H", "te: trailers", "-c", "1", "-m", "1"])
    if requests is not None:
        cmd += ["-n", str(requests)]
    if duration is not None:
        cmd += ["-D", f"{max(1, round(duration * 1000))}ms"]
    cmd.append(f"http://127.0.0.1:{port}/etcdserverpb.Lease/LeaseKeepAlive")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_parallel(procs: list[subprocess.Popen[str]], timeout: float) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        r = common.parse_h2load(stdout)
        if "done" not in r:
            raise CheckFailed(f"h2load failed ({p.returncode}):\n{stdout}\n{stderr}")
        out.append(r)
    return out


def keepalive_throughput(args: argparse.Namespace, server: common.ServerProcess, scratch: Path) -> dict[str, Any]:
    n, streams = args.leases, args.streams
    ids = list(range(1, n + 1))
    t0 = time.monotonic()
    grant_many(server, ids, KEEPALIVE_TTL, threads=32)
    grant_s = time.monotonic() - t0
    shares = [ids[i::streams] for i in range(streams)]
    bodies = []
    for i, share in enumerate(shares):
        body = scratch / f"{server.name}-keepalive-{i}.grpc"
        body.write_bytes(b"".join(common.grpc_frame(pb.LeaseKeepAliveRequest(ID=x).SerializeToString()) for x in share))
        bodies.append(body)
    # The exact reply bytes of one pass: every reply carries TTL = the granted TTL (0 would be shorter).
    with channel(server) as ch:
        ref = next(iter(pbg.LeaseStub(ch).LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=1)]), timeout=10)))
    if ref.TTL != KEEPALIVE_TTL:
        raise CheckFailed(f"{server.name}: keep-alive answered TTL {ref.TTL}")
    expected = [sum(5 + pb.LeaseKeepAliveResponse(header=ref.header, ID=x, TTL=KEEPALIVE_TTL).ByteSize()
                    for x in share) for share in shares]
    # correctness run: 2 passes per stream, every byte accounted for
    checks = run_parallel([h2load_keepalive(args, server.port, b, requests=2) for b in bodies], timeout=120)
    for r, exp in zip(checks, expected, strict=True):
        if not (r["done"] == r["succeeded"] == r.get("status_2xx") == 2) or r["bytes_data"] != 2 * exp:
            raise CheckFailed(f"{server.name} keep-alive check: {r} (expected {2 * exp} reply bytes)")
    time.sleep(0.5)
    cpu0 = common.proc_cpu_seconds(server.pid)
    t0 = time.monotonic()
    runs = run_parallel([h2load_keepalive(args, server.port, b, duration=args.duration) for b in bodies],
                        timeout=120 + 3 * args.duration)
    wall = time.monotonic() - t0
    cpu = common.proc_cpu_seconds(server.pid) - cpu0
    passes = [r["done"] for r in runs]
    if any(r["failed"] or r["errored"] or r["succeeded"] != r["done"] or r["done"] == 0 for r in runs):
        raise CheckFailed(f"{server.name} keep-alive run: {runs}")
    # Every completed pass delivered all its replies (an abandoned last pass may add a few more bytes).
    for r, exp in zip(runs, expected, strict=True):
        if r["bytes_data"] < r["done"] * exp:
            raise CheckFailed(f"{server.name}: {r['bytes_data']} reply bytes for {r['done']} passes of {exp}")
    answered = sum(d * len(share) for d, share in zip(passes, shares, strict=True))
    # every lease still there with (nearly) its full TTL: renewed, not expired
    with channel(server) as ch:
        lease = pbg.LeaseStub(ch)
        listed = len(lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=30).leases)
        step = max(1, n // 200)
        sample = [lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=x), timeout=10).TTL for x in ids[::step]]
    # Renewed during the last pass or two (a pass takes well under a second): else the TTL would show
    # the seconds since the grants.
    if listed != n or min(sample) < KEEPALIVE_TTL - 3:
        raise CheckFailed(f"{server.name}: {listed} leases listed, min sampled TTL {min(sample)}")
    pass_ms = statistics.fmean(r["h2load_mean_us"] for r in runs) / 1000
    revoke_all(server)
    return {
        "leases": n, "streams": streams, "duration_s": args.duration, "grant_s": grant_s,
        "grants_per_s": n / grant_s,
        "keepalives": answered, "keepalives_per_s": answered / args.duration,
        "pass_ms_mean": pass_ms, "leases_per_stream": len(shares[0]),
        "server_cpu_us_per_keepalive": cpu / answered * 1e6, "server_cpu_util": cpu / wall,
    }


# --------------------------------------------------------------------------------------------------
# 2. expiry precision (and 3. pile-up): watch DELETE events


class DeleteWatch:
    """A watch on a key prefix that timestamps every DELETE (client monotonic clock)."""

    def __init__(self, server: common.ServerProcess, prefix: bytes) -> None:
        self.channel = channel(server)
        self.requests: queue.Queue[pb.WatchRequest | None] = queue.Queue()
        self.deleted: dict[bytes, float] = {}
        self.created = threading.Event()
        self.error: BaseException | None = None
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        self.requests.put(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=prefix, range_end=end)))
        self.call = pbg.WatchStub(self.channel).Watch(self._iter())
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        if not self.created.wait(10):
            raise CheckFailed(f"{server.name}: watch not created")

    def _iter(self) -> Iterator[pb.WatchRequest]:
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for resp in self.call:
                now = time.monotonic()
                if resp.created:
                    self.created.set()
                for ev in resp.events:
                    if ev.type == ev.DELETE:
                        self.deleted[ev.kv.key] = now
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc

    def close(self) -> None:
        self.call.cancel()
        self.requests.put(None)
        self.thread.join(5)
        self.channel.close()


def expiry_precision(args: argparse.Namespace, server: common.ServerProcess) -> dict[str, Any]:
    n, ttl, spread = args.expiry_leases, args.expiry_ttl, args.expiry_spread
    prefix = b"exp/"
    watch = DeleteWatch(server, prefix)
    sent: dict[bytes, float] = {}
    replied: dict[bytes, float] = {}
    try:
        with channel(server) as ch:
            lease, kv = pbg.LeaseStub(ch), pbg.KVStub(ch)
            start = time.monotonic()
            for i in range(n):
                target = start + spread * i / n
                delay = target - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                key = prefix + b"%06d" % i
                t_send = time.monotonic()
                resp = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=ttl), timeout=10)
                t_reply = time.monotonic()
                kv.Put(pb.PutRequest(key=key, lease=resp.ID), timeout=10)
                sent[key], replied[key] = t_send, t_reply
        deadline = time.monotonic() + ttl + 30
        while len(watch.deleted) < n and time.monotonic() < deadline and watch.error is None:
            time.sleep(0.05)
    finally:
        watch.close()
    if watch.error is not None:
        raise CheckFailed(f"{server.name}: watch failed: {watch.error}")
    if len(watch.deleted) != n:
        raise CheckFailed(f"{server.name}: {len(watch.deleted)} of {n} leases expired")
    early = [k for k, t in watch.deleted.items() if t < sent[k] + ttl]
    if early:
        raise CheckFailed(f"{server.name}: {len(early)} leases expired before their TTL")
    late = sorted((watch.deleted[k] - (replied[k] + ttl)) * 1000 for k in replied)
    return {
        "leases": n, "ttl_s": ttl, "spread_s": spread,
        "lateness_ms": {"min": late[0], "p50": common.percentile(late, 50), "p90": common.percentile(late, 90),
                        "p99": common.percentile(late, 99), "max": late[-1], "mean": statistics.fmean(late)},
    }


def pileup(args: argparse.Namespace, server: common.ServerProcess) -> dict[str, Any]:
    n, ttl = args.pileup, args.pileup_ttl
    prefix = b"pile/"
    ids = list(range(10_000_001, 10_000_001 + n))
    t0 = time.monotonic()
    grant_many(server, ids, ttl, key_prefix=prefix, threads=32)
    if time.monotonic() - t0 > ttl * 0.8:
        raise CheckFailed(f"{server.name}: granting took {time.monotonic() - t0:.1f}s, raise --pileup-ttl")
    watch = DeleteWatch(server, prefix)
    writes: list[tuple[float, float]] = []
    stop = threading.Event()

    def writer() -> None:
        with channel(server) as ch:
            kv = pbg.KVStub(ch)
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                kv.Put(pb.PutRequest(key=b"writer", value=b"%d" % i), timeout=30)
                writes.append((t0, time.monotonic() - t0))
                i += 1
                time.sleep(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    try:
        # Line the deadlines up: renew every lease at once on one stream (a few hundred ms).
        with channel(server) as ch:
            t_renew = time.monotonic()
            replies = list(pbg.LeaseStub(ch).LeaseKeepAlive(iter(pb.LeaseKeepAliveRequest(ID=x) for x in ids),
                                                            timeout=120))
            renew_s = time.monotonic() - t_renew
        renewed = sum(1 for r in replies if r.TTL == ttl)
        if renewed != n:
            raise CheckFailed(f"{server.name}: pile-up renewal: {renewed} of {n} leases renewed")
        thread.start()
        deadline = time.monotonic() + ttl + n / 500 + 30
        while len(watch.deleted) < n and time.monotonic() < deadline and watch.error is None:
            time.sleep(0.05)
        stop.set()
        thread.join(30)
    finally:
        stop.set()
        watch.close()
    if len(watch.deleted) != n:
        raise CheckFailed(f"{server.name}: {len(watch.deleted)} of {n} pile-up leases expired")
    times = sorted(watch.deleted.values())
    first, last = times[0], times[-1]
    during = sorted(lat * 1000 for t, lat in writes if first <= t <= last)
    before = sorted(lat * 1000 for t, lat in writes if t < first)

    def stats(v: list[float]) -> dict[str, float]:
        if not v:
            return {}
        return {"n": len(v), "p50": common.percentile(v, 50), "p99": common.percentile(v, 99), "max": v[-1]}

    return {
        "leases": n, "ttl_s": ttl, "renew_all_s": renew_s,
        "revoke_span_s": last - first, "revoked_per_s": n / (last - first) if last > first else float("inf"),
        "first_delete_after_deadline_ms": (first - (t_renew + ttl)) * 1000,
        "writes_before_ms": stats(before), "writes_during_ms": stats(during),
    }


# --------------------------------------------------------------------------------------------------
# report


def ratio(c: float | None, e: float | None) -> str:
    if not c or not e:
        return "-"
    return f"{c / e:.2f}x"


def render(results: dict[str, dict[str, Any]]) -> str:
    e, c = results.get("etcd", {}), results.get("coord", {})

    def get(r: dict[str, Any], *path: str) -> Any:
        for p in path:
            if not isinstance(r, dict) or p not in r:
                return None
            r = r[p]
        return r

    rows = [
        ("keep-alives/s (10k leases, streams)", ("keepalive", "keepalives_per_s"), "{:,.0f}", True),
        ("  one stream's pass over its leases, ms", ("keepalive", "pass_ms_mean"), "{:,.1f}", False),
        ("  server CPU per keep-alive, us", ("keepalive", "server_cpu_us_per_keepalive"), "{:,.1f}", False),
        ("grants/s (32 clients)", ("keepalive", "grants_per_s"), "{:,.0f}", True),
        ("expiry lateness p50, ms", ("expiry", "lateness_ms", "p50"), "{:,.1f}", False),
        ("expiry lateness p99, ms", ("expiry", "lateness_ms", "p99"), "{:,.1f}", False),
        ("expiry lateness max, ms", ("expiry", "lateness_ms", "max"), "{:,.1f}", False),
        ("pile-up: time to revoke all, s", ("pileup", "revoke_span_s"), "{:,.2f}", False),
        ("pile-up: revoked/s", ("pileup", "revoked_per_s"), "{:,.0f}", True),
        ("pile-up: write p50 before, ms", ("pileup", "writes_before_ms", "p50"), "{:,.2f}", False),
        ("pile-up: write p50 during, ms", ("pileup", "writes_during_ms", "p50"), "{:,.2f}", False),
        ("pile-up: write p99 during, ms", ("pileup", "writes_during_ms", "p99"), "{:,.2f}", False),
        ("pile-up: write max during, ms", ("pileup", "writes_during_ms", "max"), "{:,.2f}", False),
        ("other load on the server core: keep-alive / expiry / pile-up phase, %", None, "", False),
    ]
    out = ["| measure | etcd | coord | coord/etcd |", "|---|---|---|---|"]
    for label, path, fmt, _ in rows:
        if path is None:  # the disturbance row
            def other(r: dict[str, Any]) -> str:
                return " / ".join(f"{100 * r[p]['server_core_other_util']:.0f}" if p in r else "-"
                                  for p in ("keepalive", "expiry", "pileup"))
            out.append(f"| {label} | {other(e)} | {other(c)} | |")
            continue
        ev, cv = get(e, *path), get(c, *path)
        out.append(f"| {label} | {fmt.format(ev) if ev is not None else '-'} | "
                   f"{fmt.format(cv) if cv is not None else '-'} | {ratio(cv, ev)} |")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="etcd,coord")
    p.add_argument("--phases", default="keepalive,expiry,pileup", help="subset of keepalive,expiry,pileup")
    p.add_argument("--leases", type=int, default=10_000, help="leases kept alive (default 10,000)")
    p.add_argument("--streams", type=int, default=4, help="keep-alive streams, one h2load each (default 4)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of the timed keep-alive run")
    p.add_argument("--expiry-leases", type=int, default=1000)
    p.add_argument("--expiry-ttl", type=int, default=3)
    p.add_argument("--expiry-spread", type=float, default=2.0, help="grants spread over this many seconds")
    p.add_argument("--pileup", type=int, default=10_000, help="leases expiring at once (0: skip)")
    p.add_argument("--pileup-ttl", type=int, default=20, help="must exceed the time the grants take")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer leases, 2 s runs")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    p.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd")
    p.add_argument("--h2load", default=shutil.which("h2load") or "/usr/bin/h2load")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--tmp-dir", default=None, help="where the data dirs go (a real disk, not tmpfs)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.expiry_leases, args.pileup = 2.0, 200, 2000
    args.servers = [s for s in SERVER_ORDER if s in {x.strip() for x in args.servers.split(",")}]
    args.phases = {x.strip() for x in args.phases.split(",") if x.strip()}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not common.check_tools("lease_bench", args):
        return 2
    common.pin_self(args.load_core)
    base = Path(tempfile.mkdtemp(prefix="lease-bench-", dir=args.tmp_dir))
    info = common.machine_info()
    info["data_dir_fs"] = common.fs_type(base)
    results: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    env = common.server_env(PYTHONUNBUFFERED="1")  # coord-server's log lines at once
    print(f"lease_bench: {', '.join(args.servers)} on core {args.server_core}, load on core {args.load_core}; "
          f"data in {base} ({info['data_dir_fs']})", flush=True)
    try:
        for name in args.servers:
            server = make_server(args, name, base)
            server.start(env)
            try:
                wait_ready(server)
                r: dict[str, Any] = {}
                for phase, fn in (("keepalive", lambda s=server: keepalive_throughput(args, s, base)),
                                  ("expiry", lambda s=server: expiry_precision(args, s)),
                                  ("pileup", lambda s=server: pileup(args, s) if args.pileup else None)):
                    if phase not in args.phases:
                        continue
                    cores0, cpu0 = common.cores_busy_seconds(), common.proc_cpu_seconds(server.pid)
                    t0 = time.monotonic()
                    try:
                        got = fn()
                        if got is not None:
                            # Busy time of the server's core not spent by the server: someone else ran there.
                            wall = time.monotonic() - t0
                            busy = common.cores_busy_seconds()[args.server_core] - cores0[args.server_core]
                            mine = common.proc_cpu_seconds(server.pid) - cpu0
                            got["server_core_other_util"] = max(0.0, busy - mine) / wall
                    except (CheckFailed, grpc.RpcError) as exc:
                        failures.append(f"{name} {phase}: {exc}")
                        print(f"  {name:<6} {phase:<9} CHECK FAILED: {exc}", flush=True)
                        continue
                    if got is not None:
                        r[phase] = got
                        print(f"  {name:<6} {phase:<9} {json.dumps(got, default=float)}", flush=True)
                results[name] = r
            finally:
                server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    table = render(results)
    print()
    print(table)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"lease-{stamp}.json"
    path.write_text(json.dumps({"machine": info, "args": {k: v for k, v in vars(args).items()},
                                "results": results, "failures": failures, "table": table}, indent=2, default=str))
    print(f"\nresults: {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
