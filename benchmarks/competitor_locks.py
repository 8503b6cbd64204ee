"""Lock hand-off of the Python etcd clients users have today, for client_bench.py to compare against.

Runs inside the competitor's own virtual environment (see client_bench.py for how to make them):

    /tmp/venv-etcd3/bin/python benchmarks/competitor_locks.py etcd3 127.0.0.1:2379 --contenders 1 8 32
    /tmp/venv-aetcd/bin/python benchmarks/competitor_locks.py aetcd 127.0.0.1:2379 --contenders 1 8 32

Each of N contenders (threads for python-etcd3, which is synchronous; asyncio tasks for aetcd) loops
acquire -> release on one lock name, each with its own client, for a 1 s warm-up (clients connected, the
queue formed; not counted) and then --seconds. Prints one JSON line:
{N: {"acquisitions_per_s": ..., "handoffs_per_s": ..., "jain": ..., "acquisitions": ...}} where a hand-off
is an acquisition by a different contender than the one before (a contender that re-takes the lock it just
released, which a racing lock allows, acquires without handing off). Imports nothing from coord;
client_bench.py counts coord's runs with the same Tally, warm-up and result().
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from typing import Any

WARMUP = 1.0


def jain(counts: list[int]) -> float:
    total = sum(counts)
    return total * total / (len(counts) * sum(c * c for c in counts)) if total else 0.0


class Tally:
    """Acquisitions per contender and changes of holder; only the lock holder calls ``acquired``."""

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.changes = 0
        self.last = -1

    def acquired(self, i: int) -> None:
        self.counts[i] += 1
        if i != self.last:
            self.changes += 1
            self.last = i

    def snapshot(self) -> tuple[list[int], int]:
        return list(self.counts), self.changes


def result(base: tuple[list[int], int], end: tuple[list[int], int], elapsed: float) -> dict[str, Any]:
    window = [e - b for e, b in zip(end[0], base[0], strict=True)]
    return {
        "acquisitions_per_s": sum(window) / elapsed,
        "handoffs_per_s": (end[1] - base[1]) / elapsed,
        "jain": jain(window),
        "acquisitions": sum(window),
    }


def run_etcd3(host: str, port: int, n: int, seconds: float, name: str) -> dict[str, Any]:
    import etcd3

    tally = Tally(n)
    clients = [etcd3.client(host=host, port=port) for _ in range(n)]
    stop = time.monotonic() + WARMUP + seconds

    def contender(i: int) -> None:
        while time.monotonic() < stop:
            lock = clients[i].lock(name, ttl=10)
            if lock.acquire(timeout=max(0.1, stop - time.monotonic())):
                tally.acquired(i)
                lock.release()

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(WARMUP)
    base, t0 = tally.snapshot(), time.monotonic()
    time.sleep(max(0.0, stop - time.monotonic()))
    end, elapsed = tally.snapshot(), time.monotonic() - t0
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    return result(base, end, elapsed)


async def run_aetcd(host: str, port: int, n: int, seconds: float, name: str) -> dict[str, Any]:
    import aetcd

    tally = Tally(n)
    clients = [aetcd.Client(host=host, port=port) for _ in range(n)]
    stop = time.monotonic() + WARMUP + seconds

    async def contender(i: int) -> None:
        while time.monotonic() < stop:
            lock = clients[i].lock(name.encode(), ttl=10)
            try:
                await asyncio.wait_for(lock.acquire(), max(0.1, stop - time.monotonic()))
            except TimeoutError:
                continue
            tally.acquired(i)
            await lock.release()

    tasks = [asyncio.create_task(contender(i)) for i in range(n)]
    await asyncio.sleep(WARMUP)
    base, t0 = tally.snapshot(), time.monotonic()
    await asyncio.sleep(max(0.0, stop - time.monotonic()))
    end, elapsed = tally.snapshot(), time.monotonic() - t0
    await asyncio.gather(*tasks)
    for c in clients:
        await c.close()
    return result(base, end, elapsed)


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
