"""Client benchmark: lock hand-off throughput and fairness, and client CPU per unary call.

    python benchmarks/client_bench.py [--seconds 5] [--contenders 1,8,32] [--calls 2000] [--json out.json]

Starts a real etcd 3.4 (/usr/bin/etcd) and a coord-server on free loopback ports, then for each server:

* lock hand-off: N contenders (tasks of this process, each with its own session) loop on
  ``async with client.lock(name)`` for ``--seconds``; prints acquisitions/s and Jain's fairness index over
  the per-contender counts (1.0 = perfectly even);
* unary CPU: ``--calls`` sequential ``get`` calls on Trio and on asyncio; prints this process's CPU time per
  call (the server runs in another process, so it is not counted) and the wall time per call.

Competitor clients (python-etcd3, aetcd) need their own virtual environments and are not run here.
A program, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import coord


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(kind: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    cport, pport = free_port(), free_port()
    flags = [
        "--name=bench",
        f"--data-dir={workdir / 'data'}",
        f"--listen-client-urls=http://127.0.0.1:{cport}",
        f"--advertise-client-urls=http://127.0.0.1:{cport}",
        f"--listen-peer-urls=http://127.0.0.1:{pport}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{pport}",
        f"--initial-cluster=bench=http://127.0.0.1:{pport}",
    ]
    cmd = ["/usr/bin/etcd", *flags] if kind == "etcd" else [sys.executable, "-m", "coord_server", *flags]
    log = open(workdir / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    endpoint = f"127.0.0.1:{cport}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(["etcdctl", f"--endpoints={endpoint}", "get", "x"], capture_output=True, timeout=5,
                                 env={**os.environ, "ETCDCTL_API": "3"})
            if out.returncode == 0:
                return proc, endpoint
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def jain(counts: list[int]) -> float:
    if not counts or not any(counts):
        return 0.0
    return sum(counts) ** 2 / (len(counts) * sum(c * c for c in counts))


async def lock_handoff(endpoint: str, contenders: int, seconds: float) -> dict[str, Any]:
    counts = [0] * contenders
    name = f"bench-lock-{contenders}-{time.monotonic_ns()}"
    async with coord.open_client(endpoint) as client:
        stop = anyio.Event()

        async def contender(i: int) -> None:
            async with client.session(ttl=10) as session:
                lock = session.lock(name)
                while not stop.is_set():
                    async with lock:
                        counts[i] += 1

        async with anyio.create_task_group() as tg:
            for i in range(contenders):
                tg.start_soon(contender, i)
            await anyio.sleep(1.0)  # warm-up: sessions granted, queue formed
            base = sum(counts)
            base_counts = list(counts)
            t0 = anyio.current_time()
            await anyio.sleep(seconds)
            done = sum(counts) - base
            elapsed = anyio.current_time() - t0
            window = [c - b for c, b in zip(counts, base_counts, strict=True)]
            stop.set()
    return {"contenders": contenders, "handoffs_per_s": done / elapsed, "jain": jain(window)}


async def unary_cpu(endpoint: str, calls: int) -> dict[str, float]:
    async with coord.open_client(endpoint) as client:
        await client.put("bench-key", "v")
        for _ in range(100):
            await client.get("bench-key")
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await client.get("bench-key")
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"cpu_us_per_call": cpu / calls * 1e6, "wall_us_per_call": wall / calls * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--contenders", default="1,8,32")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    ns = [int(x) for x in args.contenders.split(",")]
    results: dict[str, Any] = {}
    for kind in ("etcd", "coord"):
        work = Path(tempfile.mkdtemp(prefix=f"client-bench-{kind}-"))
        proc, endpoint = start_server(kind, work)
        try:
            res: dict[str, Any] = {"locks": [], "unary": {}}
            for n in ns:
                r = anyio.run(lock_handoff, endpoint, n, args.seconds, backend="trio")
                res["locks"].append(r)
                print(f"{kind:5} lock  contenders={n:3}  {r['handoffs_per_s']:8.1f} hand-offs/s  "
                      f"Jain={r['jain']:.3f}", flush=True)
            for backend, opts in (("trio", {}), ("asyncio", {}), ("asyncio", {"use_uvloop": True})):
                label = "uvloop" if opts else backend
                u = anyio.run(unary_cpu, endpoint, args.calls, backend=backend, backend_options=opts)
                res["unary"][label] = u
                print(f"{kind:5} unary {label:8} {u['cpu_us_per_call']:7.0f} µs CPU/call  "
                      f"{u['wall_us_per_call']:7.0f} µs wall/call", flush=True)
            results[kind] = res
        finally:
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
