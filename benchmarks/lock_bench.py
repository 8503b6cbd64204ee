"""Lock hand-off under contention and leadership hand-off on Resign: coord-server vs real etcd 3.4.23.

    python benchmarks/lock_bench.py [--contenders 1 8 32] [--seconds 5] [--resigns 50]

Each server runs pinned to core 0; the client (grpc.aio on uvloop, one process, core 1) drives the
v3lock and v3election services directly. Lock: N contenders, each with its own lease, loop
Lock -> Unlock on one name for --seconds; reported: hand-offs per second, p50/p99 wait (Lock call
to grant) and fairness as Jain's index over the contenders' acquisition counts (1.0 = perfectly
even). Election: two campaigners take turns; the leader resigns and the time until the other's
Campaign returns is the hand-over latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_two_process_args, client_process, quantile, run_client, running_server, wait_for_server


async def contender(locks: Any, lpb: Any, name: bytes, lease: int, i: int, stop: float, counts: list[int],
                    waits: list[float]) -> None:
    """Lock -> Unlock until ``stop``, counting acquisitions and their waits."""
    while time.perf_counter() < stop:
        t = time.perf_counter()
        resp = await locks.Lock(lpb.LockRequest(name=name, lease=lease))
        waits.append(time.perf_counter() - t)
        counts[i] += 1
        await locks.Unlock(lpb.UnlockRequest(key=resp.key))


async def client_main(cfg: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from coord._pb import rpc_pb2 as pb
    from coord._pb import rpc_pb2_grpc as pbg
    from coord._pb import v3election_pb2 as epb
    from coord._pb import v3election_pb2_grpc as epbg
    from coord._pb import v3lock_pb2 as lpb
    from coord._pb import v3lock_pb2_grpc as lpbg

    target = f"127.0.0.1:{cfg['port']}"
    await wait_for_server(target)
    out: dict[str, Any] = {"lock": {}}
    async with grpc.aio.insecure_channel(target) as ch:
        leases = pbg.LeaseStub(ch)
        for n in cfg["contenders"]:
            ids = [(await leases.LeaseGrant(pb.LeaseGrantRequest(TTL=60))).ID for _ in range(n)]
            locks = lpbg.LockStub(ch)
            counts = [0] * n
            waits: list[float] = []
            stop = time.perf_counter() + cfg["seconds"]
            name = b"bench-%d" % n

            t0 = time.perf_counter()
            await asyncio.gather(*(contender(locks, lpb, name, lease, i, stop, counts, waits)
                                   for i, lease in enumerate(ids)))
            elapsed = time.perf_counter() - t0
            total = sum(counts)
            jain = total * total / (n * sum(c * c for c in counts)) if total else 0.0
            out["lock"][str(n)] = {"handoffs_per_s": total / elapsed, "p50_ms": quantile(waits, 0.5) * 1e3,
                                   "p99_ms": quantile(waits, 0.99) * 1e3, "jain": jain, "acquisitions": total}
        el = epbg.ElectionStub(ch)
        a, b = [(await leases.LeaseGrant(pb.LeaseGrantRequest(TTL=60))).ID for _ in range(2)]
        lat: list[float] = []
        leader = (await el.Campaign(epb.CampaignRequest(name=b"bench-e", lease=a, value=b"a"))).leader
        other = b
        for _ in range(cfg["resigns"]):
            waiting = asyncio.ensure_future(el.Campaign(epb.CampaignRequest(name=b"bench-e", lease=other, value=b"x")))
            for _ in range(500):  # until the waiter is queued
                r = await pbg.KVStub(ch).Range(pb.RangeRequest(key=b"bench-e/", range_end=b"bench-e0", count_only=True))
                if r.count == 2:
                    break
                await asyncio.sleep(0.001)
            t = time.perf_counter()
            await el.Resign(epb.ResignRequest(leader=leader))
            leader = (await waiting).leader
            lat.append(time.perf_counter() - t)
            other = a if other == b else b
        out["resign"] = {"p50_ms": quantile(lat, 0.5) * 1e3, "p99_ms": quantile(lat, 0.99) * 1e3}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contenders", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--resigns", type=int, default=50)
    add_two_process_args(p)
    args = p.parse_args()
    if args.client:
        return client_process(client_main, args.client)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lock-bench-") as tmp:
        for name in args.servers:
            base = Path(tmp) / name
            base.mkdir()
            with running_server(name, base, etcd=args.etcd, core=args.server_core) as srv:
                cfg = {"port": srv.port, "contenders": args.contenders, "seconds": args.seconds,
                       "resigns": args.resigns}
                results[name] = run_client(__file__, args.client_core, cfg, f"on {name}")
    print(f"\nlock hand-off: contenders loop Lock -> Unlock for {args.seconds:g} s "
          f"(server on core {args.server_core})\n")
    print(f"{'N':>4} {'server':6} {'handoffs/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'Jain':>6}")
    for n in args.contenders:
        for name in args.servers:
            r = results[name]["lock"][str(n)]
            print(f"{n:4} {name:6} {r['handoffs_per_s']:11.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['jain']:6.3f}")
        if {"etcd", "coord"} <= set(args.servers):
            e, c = results["etcd"]["lock"][str(n)], results["coord"]["lock"][str(n)]
            print(f"{'':4} ratio coord/etcd: hand-offs {c['handoffs_per_s'] / e['handoffs_per_s']:.2f}x, "
                  f"p99 wait {c['p99_ms'] / e['p99_ms']:.2f}x")
    print(f"\nleadership hand-over on Resign ({args.resigns} times)")
    for name in args.servers:
        r = results[name]["resign"]
        print(f"     {name:6} p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
