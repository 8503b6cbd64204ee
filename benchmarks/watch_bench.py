"""Watch fan-out and catch-up: coord-server vs real etcd 3.4.23, side by side, ratios printed.

    python benchmarks/watch_bench.py [--watchers 1000] [--rate 20] [--seconds 10] [--replay 100000]

Each server runs pinned to core 0 (``taskset``); the client runs in a separate process pinned to
core 1 (grpc.aio on uvloop). A Python client cannot drain events as fast as a server can emit them,
so fan-out is measured the fair way round: one writer puts at a fixed rate while N watchers (over
several streams and connections) receive every event, and the benchmark reports
  - delivered events/s and p50/p99 delivery latency (put sent -> event received) at that rate,
  - the server's CPU time per delivered event (from /proc, the server alone on its core), and
  - the fan-out capacity it implies: events/s one core could sustain = 1 / CPU per event.
The target (issue 3) is coord capacity >= 0.5x etcd's. The catch-up case writes ``--replay`` events
first (100 puts per txn) and times one watcher replaying all of them from revision 1.
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

from _common import (
    ServerProcess,
    add_two_process_args,
    client_process,
    proc_cpu_seconds,
    quantile,
    run_client,
    running_server,
    wait_for_server,
)

# ------------------------------------------------------------------------------------------------
# the client (runs in its own process: `watch_bench.py --client ...`)


async def client_main(cfg: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from coord._pb import rpc_pb2 as pb
    from coord._pb import rpc_pb2_grpc as pbg

    target = f"127.0.0.1:{cfg['port']}"
    opts = [("grpc.max_receive_message_length", 256 << 20)]
    await wait_for_server(target)
    mode = cfg["mode"]
    if mode == "replay":
        return await replay(cfg, target, opts)
    streams, watchers = cfg["streams"], cfg["watchers"]
    channels = [grpc.aio.insecure_channel(target, options=opts) for _ in range(streams)]
    wch = grpc.aio.insecure_channel(target)
    kv = pbg.KVStub(wch)
    key = b"fan/key"
    calls = []
    for i, ch in enumerate(channels):
        call = pbg.WatchStub(ch).Watch()
        n = watchers // streams + (1 if i < watchers % streams else 0)
        for _ in range(n):
            if mode == "key":
                req = pb.WatchCreateRequest(key=key)
            else:
                req = pb.WatchCreateRequest(key=b"fan/", range_end=b"fan0")
            await call.write(pb.WatchRequest(create_request=req))
        for _ in range(n):
            assert (await call.read()).created
        calls.append(call)
    expected = watchers * cfg["writes"]
    got = 0
    latencies: list[float] = []
    done = asyncio.Event()
    last_recv = 0.0

    async def reader(call: Any) -> None:
        nonlocal got, last_recv
        while True:
            resp = await call.read()
            now = time.perf_counter_ns()
            for ev in resp.events:
                got += 1
                if got % 7 == 0:  # sample: parsing every value would cost the client more than the server
                    latencies.append((now - int(ev.kv.value)) / 1000)
            last_recv = now
            if got >= expected:
                done.set()

    tasks = [asyncio.ensure_future(reader(c)) for c in calls]
    pid = cfg["pid"]
    cpu0 = proc_cpu_seconds(pid)
    t0 = time.perf_counter_ns()
    interval = 1.0 / cfg["rate"]
    for i in range(cfg["writes"]):
        k = key if mode == "key" else b"fan/%d" % (i % 100)
        await kv.Put(pb.PutRequest(key=k, value=b"%d" % time.perf_counter_ns()))
        next_at = t0 / 1e9 + (i + 1) * interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    try:
        await asyncio.wait_for(done.wait(), 60)
    except TimeoutError:
        pass
    cpu = proc_cpu_seconds(pid) - cpu0
    elapsed = (last_recv - t0) / 1e9
    for t in tasks:
        t.cancel()
    for c in calls:
        c.cancel()
    for ch in channels:
        await ch.close()
    await wch.close()
    return {"mode": mode, "events": got, "expected": expected, "seconds": elapsed,
            "events_per_s": got / elapsed if elapsed else 0.0, "p50_us": quantile(latencies, 0.5),
            "p99_us": quantile(latencies, 0.99), "server_cpu_s": cpu,
            "cpu_us_per_event": cpu / got * 1e6 if got else float("nan")}


async def replay(cfg: dict[str, Any], target: str, opts: list[tuple[str, int]]) -> dict[str, Any]:
    import grpc

    from coord._pb import rpc_pb2 as pb
    from coord._pb import rpc_pb2_grpc as pbg

    total = cfg["replay"]
    async with grpc.aio.insecure_channel(target, options=opts) as ch:
        kv = pbg.KVStub(ch)
        first = 0
        for i in range(total // 100):
            ops = [pb.RequestOp(request_put=pb.PutRequest(key=b"r/%05d" % ((i * 100 + j) % 5000), value=b"v" * 64))
                   for j in range(100)]
            resp = await kv.Txn(pb.TxnRequest(success=ops))
            first = first or resp.header.revision
        call = pbg.WatchStub(ch).Watch()
        pid = cfg["pid"]
        cpu0 = proc_cpu_seconds(pid)
        t0 = time.perf_counter()
        await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=b"r/", range_end=b"r0", start_revision=first)))
        got = 0
        while got < total:
            resp = await call.read()
            got += len(resp.events)
        elapsed = time.perf_counter() - t0
        cpu = proc_cpu_seconds(pid) - cpu0
        call.cancel()
    return {"mode": "replay", "events": got, "seconds": elapsed, "events_per_s": got / elapsed,
            "server_cpu_s": cpu, "cpu_us_per_event": cpu / got * 1e6}


def measure(args: argparse.Namespace, server: ServerProcess, mode: str) -> dict[str, Any]:
    cfg = {"port": server.port, "pid": server.pid, "mode": mode, "watchers": args.watchers,
           "streams": args.streams, "writes": int(args.rate * args.seconds), "rate": args.rate,
           "replay": args.replay}
    return run_client(__file__, args.client_core, cfg, f"({server.name} {mode})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--watchers", type=int, default=1000)
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--rate", type=float, default=20.0, help="writes per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--replay", type=int, default=100_000)
    add_two_process_args(p)
    args = p.parse_args()
    if args.client:
        return client_process(client_main, args.client)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="watch-bench-") as tmp:
        for name in args.servers:
            for mode in ("key", "prefix", "replay"):
                base = Path(tmp) / f"{name}-{mode}"
                base.mkdir()
                with running_server(name, base, etcd=args.etcd, core=args.server_core) as srv:
                    results.setdefault(name, {})[mode] = measure(args, srv, mode)
    print(f"\nwatch fan-out: {args.watchers} watchers over {args.streams} streams, {args.rate:g} writes/s for "
          f"{args.seconds:g} s; replay of {args.replay} events (server on core {args.server_core})\n")
    head = f"{'case':8} {'server':6} {'events/s':>10} {'p50 us':>9} {'p99 us':>9} {'cpu us/ev':>10} {'capacity/s':>11}"
    print(head)
    for mode in ("key", "prefix", "replay"):
        for name in args.servers:
            r = results[name][mode]
            cap = 1e6 / r["cpu_us_per_event"] if r["cpu_us_per_event"] else float("nan")
            r["capacity_per_s"] = cap
            print(f"{mode:8} {name:6} {r['events_per_s']:10.0f} {r.get('p50_us', float('nan')):9.0f} "
                  f"{r.get('p99_us', float('nan')):9.0f} {r['cpu_us_per_event']:10.2f} {cap:11.0f}")
        if {"etcd", "coord"} <= set(args.servers):
            e, c = results["etcd"][mode], results["coord"][mode]
            print(f"{'':8} ratio coord/etcd: capacity {c['capacity_per_s'] / e['capacity_per_s']:.2f}x, "
                  f"delivered {c['events_per_s'] / e['events_per_s']:.2f}x"
                  + ("" if mode == "replay" else f", p99 latency {c['p99_us'] / e['p99_us']:.2f}x"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
