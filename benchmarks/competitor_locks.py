"""Lock hand-off of the Python etcd clients users have today, for client_bench.py to compare against.

Runs inside the competitor's own virtual environment (see client_bench.py for how to make them):

    /tmp/venv-etcd3/bin/python benchmarks/competitor_locks.py etcd3 127.0.0.1:2379 --contenders 1 8 32
    /tmp/venv-aetcd/bin/python benchmarks/competitor_locks.py aetcd 127.0.0.1:2379 --contenders 1 8 32

Each of N contenders (threads for python-etcd3, which is synchronous; asyncio tasks for aetcd) loops
acquire -> release on one lock name for --seconds, each with its own client. Prints one JSON line:
{N: {"handoffs_per_s": ..., "jain": ..., "acquisitions": ...}}. Imports nothing from coord.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from typing import Any


def jain(counts: list[int]) -> float:
    total = sum(counts)
    return total * total / (len(counts) * sum(c * c for c in counts)) if total else 0.0


def run_etcd3(host: str, port: int, n: int, seconds: float, name: str) -> dict[str, Any]:
    import etcd3

    counts = [0] * n
    stop = time.monotonic() + seconds
    clients = [etcd3.client(host=host, port=port) for _ in range(n)]

    def contender(i: int) -> None:
        while time.monotonic() < stop:
            lock = clients[i].lock(name, ttl=10)
            if lock.acquire(timeout=max(0.1, stop - time.monotonic())):
                counts[i] += 1
                lock.release()

    t0 = time.monotonic()
    threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    for c in clients:
        c.close()
    return {"handoffs_per_s": sum(counts) / elapsed, "jain": jain(counts), "acquisitions": sum(counts)}


async def run_aetcd(host: str, port: int, n: int, seconds: float, name: str) -> dict[str, Any]:
    import aetcd

    counts = [0] * n
    stop = time.monotonic() + seconds
    clients = [aetcd.Client(host=host, port=port) for _ in range(n)]

    async def contender(i: int) -> None:
        while time.monotonic() < stop:
            lock = clients[i].lock(name.encode(), ttl=10)
            try:
                await asyncio.wait_for(lock.acquire(), max(0.1, stop - time.monotonic()))
            except TimeoutError:
                continue
            counts[i] += 1
            await lock.release()

    t0 = time.monotonic()
    await asyncio.gather(*(contender(i) for i in range(n)))
    elapsed = time.monotonic() - t0
    for c in clients:
        await c.close()
    return {"handoffs_per_s": sum(counts) / elapsed, "jain": jain(counts), "acquisitions": sum(counts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("client", choices=["etcd3", "aetcd"])
    p.add_argument("endpoint")
    p.add_argument("--contenders", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    host, port = args.endpoint.rsplit(":", 1)
    out = {}
    for n in args.contenders:
        name = f"bench-{args.client}-{n}"
        if args.client == "etcd3":
            out[n] = run_etcd3(host, int(port), n, args.seconds, name)
        else:
            out[n] = asyncio.run(run_aetcd(host, int(port), n, args.seconds, name))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
