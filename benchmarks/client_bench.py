"""Client benchmark: lock hand-off throughput and fairness, and client CPU per unary call.

    python benchmarks/client_bench.py [--seconds 5] [--contenders 1,8,32] [--calls 2000] [--json out.json]

Starts a real etcd 3.4 (/usr/bin/etcd) and a coord-server on free loopback ports, then for each server:

* lock hand-off: N contenders (tasks of this process, each with its own session, sharing one client) loop on
  ``async with session.lock(name)`` for ``--seconds`` after a 1 s warm-up; prints hand-offs/s (acquisitions
  by another contender than the last holder), acquisitions/s (re-takes included: a racing lock lets the
  releaser take it again without handing off) and Jain's fairness index over the per-contender counts (1.0 =
  perfectly even). Against etcd it is run a second time with one client per
  contender, the shape of the competitor runs (a hand-off between two tasks of one client skips a read: the
  releaser's txn already tells the next owner; between clients the next owner reads the queue itself);
* unary CPU: ``--calls`` sequential ``get`` calls on Trio and on asyncio; prints this process's CPU time per
  call (the server runs in another process, so it is not counted) and the wall time per call.

Competitors (against the same real etcd, in the same run): python-etcd3 and aetcd locks, each in its own
virtual environment, run by benchmarks/competitor_locks.py. Make the environments once:

    python3 -m venv /tmp/venv-etcd3 && /tmp/venv-etcd3/bin/pip install etcd3 'protobuf<4' 'tenacity==6.3.1'
    python3 -m venv /tmp/venv-aetcd && /tmp/venv-aetcd/bin/pip install aetcd

(python-etcd3's last release needs protobuf < 4 and a tenacity that still accepts its two-argument wait
function), then pass ``--etcd3-python /tmp/venv-etcd3/bin/python --aetcd-python /tmp/venv-aetcd/bin/python``.
The tables end with coord's rates at the largest N (shared client, client per contender) over the best
competitor's (issue 6 target: hand-offs >= 3x, with Jain's fairness >= 0.99).

A program, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
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
from competitor_locks import WARMUP, Tally, result

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


async def lock_handoff(endpoint: str, contenders: int, seconds: float, own_clients: bool = False) -> dict[str, Any]:
    """``contenders`` tasks of this process, each with its own session, in one shared client (or, with
    ``own_clients``, each with its own client: the shape of the competitor runs, where no hand-off happens
    inside a client)."""
    tally = Tally(contenders)  # counted as the competitors are counted
    name = f"bench-lock-{contenders}-{time.monotonic_ns()}"
    async with contextlib.AsyncExitStack() as stack:
        shared = None if own_clients else await stack.enter_async_context(coord.open_client(endpoint))
        stop = anyio.Event()

        async def contender(i: int) -> None:
            async with contextlib.AsyncExitStack() as mine:
                client = shared if shared is not None else await mine.enter_async_context(coord.open_client(endpoint))
                session = await mine.enter_async_context(client.session(ttl=10))
                lock = session.lock(name)
                while not stop.is_set():
                    async with lock:
                        tally.acquired(i)

        async with anyio.create_task_group() as tg:
            for i in range(contenders):
                tg.start_soon(contender, i)
            await anyio.sleep(WARMUP)  # sessions granted, queue formed
            base, t0 = tally.snapshot(), anyio.current_time()
            await anyio.sleep(seconds)
            end, elapsed = tally.snapshot(), anyio.current_time() - t0
            stop.set()
    return {"contenders": contenders, **result(base, end, elapsed)}


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
    ap.add_argument("--etcd3-python", default="", help="python of a venv with python-etcd3")
    ap.add_argument("--aetcd-python", default="", help="python of a venv with aetcd")
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
                print(f"{kind:5} lock  contenders={n:3}  {lock_line(r)}", flush=True)
            if kind == "etcd":
                res["locks_own_clients"] = []
                for n in ns:
                    r = anyio.run(lock_handoff, endpoint, n, args.seconds, True, backend="trio")
                    res["locks_own_clients"].append(r)
                    print(f"{kind:5} lock  contenders={n:3}  {lock_line(r)}  (one client per contender)", flush=True)
            if kind == "etcd":
                for name, python in (("python-etcd3", args.etcd3_python), ("aetcd", args.aetcd_python)):
                    if python:
                        res[name] = competitor(python, name, endpoint, ns, args.seconds)
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
    own = ("locks", "locks_own_clients", "unary")
    competitors = {name: r for name, r in results["etcd"].items() if name not in own}
    if competitors:
        rows = {
            "coord": {r["contenders"]: r for r in results["etcd"]["locks"]},
            "coord (client each)": {r["contenders"]: r for r in results["etcd"]["locks_own_clients"]},
        }
        rows.update({name: {int(n): r for n, r in res.items()} for name, res in competitors.items()})
        top = max(ns)
        for metric, title in (("handoffs_per_s", "hand-offs/s (the lock passed to another contender)"),
                              ("acquisitions_per_s", "acquisitions/s (including re-takes by the last holder)")):
            print(f"\nlock {title} against the same real etcd ({args.seconds:g} s per N; Jain in brackets)")
            print(f"{'client':22}" + "".join(f"{'N=' + str(n):>18}" for n in ns))
            for name, by_n in rows.items():
                cells = "".join(f"{by_n[n][metric]:10.1f} ({by_n[n]['jain']:.3f})" for n in ns)
                print(f"{name:22}{cells}")
            best = max(r[top][metric] for name, r in rows.items() if not name.startswith("coord"))
            for name in ("coord", "coord (client each)"):
                print(f"{name} / best competitor at N={top}: {rows[name][top][metric] / best:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def lock_line(r: dict[str, Any]) -> str:
    return (f"{r['handoffs_per_s']:8.1f} hand-offs/s  {r['acquisitions_per_s']:8.1f} acquisitions/s  "
            f"Jain={r['jain']:.3f}")


def competitor(python: str, name: str, endpoint: str, ns: list[int], seconds: float) -> dict[str, Any]:
    """Run benchmarks/competitor_locks.py in the competitor's venv; its JSON keyed by N."""
    which = "etcd3" if name == "python-etcd3" else "aetcd"
    out = subprocess.run([python, str(Path(__file__).with_name("competitor_locks.py")), which, endpoint,
                          "--contenders", *map(str, ns), "--seconds", str(seconds)],
                         capture_output=True, text=True, timeout=60 + 3 * seconds * len(ns), check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    for n in ns:
        r = result[str(n)]
        print(f"etcd  {name:12} contenders={n:3}  {lock_line(r)}", flush=True)
    return result


if __name__ == "__main__":
    main()
