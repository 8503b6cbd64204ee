#!/usr/bin/env python3
"""KV benchmark: real etcd vs coord-server vs a do-nothing server on coord's RPC stack.

One run starts three servers, each pinned to one core (``taskset -c 0``) with its own free
loopback ports and temporary data dir:

- ``etcd``:    the real etcd binary (3.4.23 from the etcd-server package), default settings;
- ``coord``:   ``python -m coord_server`` (durable: LMDB, fsync per group commit);
- ``trivial``: ``benchmarks/trivial_server.py``: coord's transport (the same listener and HTTP/2
  path) with handlers that answer an empty response at once; the ceiling of the RPC stack.

It pre-loads ``bench-key`` (64-byte value) and drives every server with ``h2load`` pinned to the
other core (``taskset -c 1``), POSTing a pre-encoded gRPC message (5-byte prefix + protobuf) to
``/etcdserverpb.KV/Range`` or ``/etcdserverpb.KV/Put``. Workloads (``--workloads``):

- ``range-c1`` / ``put-c1``:   1 connection, 1 stream: latency of one call at a time;
- ``range-c64`` / ``put-c64``: 64 calls in flight (``--c64-shape``, default 4 connections x 16
  streams): throughput at saturation.

Each (server, workload) is measured as: a correctness run (``-n`` requests; every request must
succeed with HTTP 200, the gRPC reply bodies must add up to N replies of the expected size, and
for Put the server's revision must advance by exactly N), a warm-up run, then the measured
timed run (``-D``). For the timed run it reports throughput, p50/p99 latency (from h2load's
``--log-file`` per-request timings), and server CPU per request (``/proc/<pid>/stat`` utime +
stime before/after, divided by the requests h2load completed). h2load's own CPU and the
core-0 time spent outside the server (other processes, softirq) are recorded so that a run
disturbed by something else can be recognised.

Prints a side-by-side table with coord/etcd and coord/trivial ratios and PASS/MISS against the
targets of the KV foundation issue, and writes all numbers to
``benchmarks/results/kv-<timestamp>.json``.

    python benchmarks/kv_bench.py                # full run (10 s per measurement)
    python benchmarks/kv_bench.py --quick        # 2 s smoke run
    python benchmarks/kv_bench.py --workloads put-c1,put-c64 --servers etcd,coord --repeat 3
    python benchmarks/kv_bench.py --profile      # plus py-spy profiles of coord-server

Needs: Linux, ``taskset``, ``h2load`` (nghttp2-client), ``etcd`` (etcd-server 3.4), and the
coord package importable by this interpreter (``pip install -e .``); ``py-spy`` for ``--profile``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    HERE,
    ServerProcess,
    check_tools,
    cores_busy_seconds,
    free_port,
    fs_type,
    grpc_frame,
    machine_info,
    member_command,
    parse_h2load,
    percentile,
    pin_self,
    pinned,
    proc_cpu_seconds,
    server_env,
)

KEY = b"bench-key"
VALUE = b"v" * 64
SERVER_ORDER = ("etcd", "coord", "trivial")
DEFAULT_SERVERS = ("etcd", "coord", "trivial")
ALL_WORKLOADS = ("range-c1", "range-c64", "put-c1", "put-c64")


# --------------------------------------------------------------------------------------------------
# small helpers


def proc_io_syscalls(pid: int) -> tuple[int, int]:
    """(read-family, write-family) system calls made by a process so far (/proc/<pid>/io)."""
    counts = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            counts[k] = int(v)
    return counts.get("syscr", 0), counts.get("syscw", 0)


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------------------------------
# servers


@dataclass
class Server(ServerProcess):
    durable: bool = True  # has a store: revision checks apply


class Grpc:
    """Out-of-band checks with grpcio (never the load): reference calls and revisions."""

    def __init__(self) -> None:
        import grpc

        from coord._pb import rpc_pb2

        self.grpc = grpc
        self.pb = rpc_pb2

    def call(self, port: int, method: str, request: Any, timeout: float = 5.0) -> Any:
        resp_type: Any = {"Range": self.pb.RangeResponse, "Put": self.pb.PutResponse}[method]
        options = [("grpc.enable_http_proxy", 0)]
        with self.grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            fn = channel.unary_unary(f"/etcdserverpb.KV/{method}",
                                     request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=resp_type.FromString)
            return fn(request, timeout=timeout)

    def range(self, port: int) -> Any:
        return self.call(port, "Range", self.pb.RangeRequest(key=KEY))

    def put(self, port: int) -> Any:
        return self.call(port, "Put", self.pb.PutRequest(key=KEY, value=VALUE))

    def wait_ready(self, server: Server, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"{server.name} exited early:\n{server.log_tail()}")
            try:
                self.range(server.port)
                return
            except self.grpc.RpcError as exc:
                last = exc
                time.sleep(0.1)
        raise RuntimeError(f"{server.name} not ready after {timeout}s: {last}\n{server.log_tail()}")


def make_servers(args: argparse.Namespace, base: Path) -> list[Server]:
    servers = []
    for name in args.servers:
        if name == "trivial":
            port = free_port()
            cmd = [args.python, str(HERE / "trivial_server.py"), str(port)]
        else:
            port, cmd = member_command(name, base, etcd=args.etcd, python=args.python)
        durable = name in ("etcd", "coord")
        servers.append(Server(name, port, pinned(args.server_core, cmd), base / f"{name}.log", cwd=base,
                              durable=durable))
    return servers


# --------------------------------------------------------------------------------------------------
# h2load


@dataclass
class Workload:
    name: str
    method: str  # Range | Put
    conns: int
    streams: int

    @property
    def concurrency(self) -> int:
        return self.conns * self.streams


def workloads(args: argparse.Namespace) -> list[Workload]:
    conns, streams = (int(x) for x in args.c64_shape.lower().split("x"))
    if conns * streams != 64:
        raise SystemExit(f"--c64-shape {args.c64_shape}: connections x streams must be 64")
    table = {
        "range-c1": Workload("range-c1", "Range", 1, 1),
        "range-c64": Workload("range-c64", "Range", conns, streams),
        "put-c1": Workload("put-c1", "Put", 1, 1),
        "put-c64": Workload("put-c64", "Put", conns, streams),
    }
    return [table[name] for name in args.workloads]


def h2load(args: argparse.Namespace, port: int, wl: Workload, body: Path, *, requests: int | None = None,
           duration: float | None = None, log_file: Path | None = None) -> dict[str, Any]:
    cmd = pinned(args.load_core, [args.h2load, "-d", str(body), "-H", "content-type: application/grpc",
                                  "-H", "te: trailers", "-c", str(wl.conns), "-m", str(wl.streams)])
    if requests is not None:
        cmd += ["-n", str(requests)]
    if duration is not None:
        cmd += ["-D", f"{max(1, round(duration * 1000))}ms"]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    cmd.append(f"http://127.0.0.1:{port}/etcdserverpb.KV/{wl.method}")
    limit = 120 + (duration or 0) * 3
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    result = parse_h2load(proc.stdout)
    result["exit_code"] = proc.returncode
    if "done" not in result:
        raise RuntimeError(f"h2load failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return result


def read_latencies(path: Path) -> list[int]:
    values = []
    with open(path) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] == "200":
                values.append(int(parts[2]))
    values.sort()
    return values


# --------------------------------------------------------------------------------------------------
# one measurement


class CheckFailed(Exception):
    pass


def revision(g: Grpc, server: Server) -> int:
    return int(g.range(server.port).header.revision) if server.durable else 0


def reference_call(g: Grpc, server: Server, wl: Workload) -> int:
    """One call with grpcio: it must succeed (grpc-status 0); returns the reply's size on the wire."""
    try:
        if wl.method == "Range":
            resp = g.range(server.port)
            if server.durable and [kv.key for kv in resp.kvs] != [KEY]:
                raise CheckFailed(f"{server.name}: Range did not return {KEY!r}: {resp}")
        else:
            before = revision(g, server)
            resp = g.put(server.port)
            if server.durable and resp.header.revision != before + 1:
                raise CheckFailed(f"{server.name}: Put went from revision {before} to {resp.header.revision}")
    except g.grpc.RpcError as exc:
        raise CheckFailed(f"{server.name}: reference {wl.method} failed: {exc}") from None
    return 5 + int(resp.ByteSize())


def verify(args: argparse.Namespace, g: Grpc, server: Server, wl: Workload, body: Path) -> dict[str, Any]:
    """A fixed-count h2load run whose every request is accounted for."""
    n = args.verify_requests
    ref = reference_call(g, server, wl)
    rev0 = revision(g, server)
    r = h2load(args, server.port, wl, body, requests=n)
    rev1 = revision(g, server)
    problems = []
    if not (r["done"] == r["succeeded"] == r["status_2xx"] == n) or r["failed"] or r["errored"]:
        problems.append(f"h2load: {n} requests, {r['done']} done, {r['succeeded']} succeeded, "
                        f"{r['status_2xx']} 2xx, {r['failed']} failed, {r['errored']} errored")
    # A gRPC error is a trailers-only reply (HTTP 200, no DATA): missing reply bodies show here.
    # Put replies may grow by a byte as the revision's varint grows.
    slack = 1 if (wl.method == "Put" and server.durable) else 0
    if not n * ref <= r["bytes_data"] <= n * (ref + slack):
        problems.append(f"reply bytes {r['bytes_data']} != {n} x {ref} (a reply missing or wrong)")
    if server.durable and wl.method == "Put" and rev1 - rev0 != n:
        problems.append(f"revision advanced by {rev1 - rev0}, expected {n}")
    if server.durable and wl.method == "Range" and rev1 != rev0:
        problems.append(f"Range changed the revision {rev0} -> {rev1}")
    if problems:
        raise CheckFailed(f"{server.name} {wl.name}: " + "; ".join(problems))
    return {"requests": n, "reply_bytes": ref, "revision_delta": rev1 - rev0, "ok": True}


def settle(g: Grpc, server: Server, timeout: float = 10.0) -> None:
    """Wait until the server's revision stops moving (and give a store-less server a moment)."""
    time.sleep(0.2)
    if not server.durable:
        return
    deadline = time.monotonic() + timeout
    last = revision(g, server)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = revision(g, server)
        if now == last:
            return
        last = now


def wait_quiet(args: argparse.Namespace) -> float:
    """Wait (up to --quiet-wait s) until both cores are mostly idle; returns the busy share seen last.

    The benchmark's own servers are idle at this point: what is busy is someone else.
    """
    deadline = time.monotonic() + args.quiet_wait
    cores = (args.server_core, args.load_core)
    while True:
        b0, t0 = cores_busy_seconds(), time.monotonic()
        time.sleep(0.5)
        b1, t1 = cores_busy_seconds(), time.monotonic()
        busy = max((b1[c] - b0[c]) / (t1 - t0) for c in cores)
        if busy <= args.quiet_threshold or time.monotonic() >= deadline:
            return busy
        time.sleep(1.0)


def measure(args: argparse.Namespace, g: Grpc, server: Server, wl: Workload, body: Path,
            scratch: Path) -> dict[str, Any]:
    checks = verify(args, g, server, wl, body)
    if args.warmup > 0:
        h2load(args, server.port, wl, body, duration=args.warmup)
    # h2load abandons the calls in flight when its time is up; let the server finish them first.
    settle(g, server)
    quiet = wait_quiet(args)
    log_file = scratch / f"{server.name}-{wl.name}.log"
    rev0 = revision(g, server)
    cpu0, cores0, kids0 = proc_cpu_seconds(server.pid), cores_busy_seconds(), children_cpu_seconds()
    io0 = proc_io_syscalls(server.pid)
    t0 = time.monotonic()
    r = h2load(args, server.port, wl, body, duration=args.duration, log_file=log_file)
    wall = time.monotonic() - t0
    cpu1, cores1, kids1 = proc_cpu_seconds(server.pid), cores_busy_seconds(), children_cpu_seconds()
    io1 = proc_io_syscalls(server.pid)
    rev1 = revision(g, server)
    if not server.alive():
        raise CheckFailed(f"{server.name} died:\n{server.log_tail()}")
    lat = read_latencies(log_file)
    log_file.unlink()
    done = r["done"]
    problems = []
    if r["failed"] or r["errored"] or r["succeeded"] != done or done == 0:
        problems.append(f"{done} done, {r['succeeded']} succeeded, {r['failed']} failed, {r['errored']} errored")
    if len(lat) != done:
        problems.append(f"--log-file has {len(lat)} 200 rows for {done} requests")
    # Every completed put is applied; the calls in flight when the time was up may be or not.
    if server.durable and wl.method == "Put" and not done <= rev1 - rev0 <= r["started"]:
        problems.append(f"revision advanced by {rev1 - rev0} for {done} completed and {r['started']} "
                        "started puts")
    if problems:
        raise CheckFailed(f"{server.name} {wl.name} (timed run): " + "; ".join(problems))
    server_cpu = cpu1 - cpu0
    core = args.server_core
    server_other = max(0.0, (cores1[core] - cores0[core]) - server_cpu) / wall
    load_other = max(0.0, (cores1[args.load_core] - cores0[args.load_core]) - (kids1 - kids0)) / wall
    return {
        "server": server.name,
        "workload": wl.name,
        "conns": wl.conns,
        "streams": wl.streams,
        "duration_s": args.duration,
        "requests": done,
        "throughput_rps": done / args.duration,
        "h2load_rps": r.get("h2load_rps"),
        "latency_us": {
            "p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99),
            "p999": percentile(lat, 99.9), "max": float(lat[-1]), "mean": statistics.fmean(lat),
        },
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_req": server_cpu / done * 1e6,
        "server_cpu_util": server_cpu / wall,
        "h2load_cpu_util": (kids1 - kids0) / wall,
        "server_core_other_util": server_other,
        "load_core_other_util": load_other,
        # Someone else used the cores: before the run, or beside the server / h2load during it.
        "disturbed": quiet > args.quiet_threshold or server_other > 0.15 or load_other > 0.30,
        "read_syscalls_per_req": (io1[0] - io0[0]) / done,
        "write_syscalls_per_req": (io1[1] - io0[1]) / done,
        "started": r["started"],
        "revision_delta": rev1 - rev0,
        "wall_s": wall,
        "quiet_before": quiet,
        "checks": checks,
    }


# --------------------------------------------------------------------------------------------------
# profiling (optional)

# Component of a sampled stack: the innermost frame that belongs to a known component decides
# (interpreter frames such as _PyEval_EvalFrameDefault count for the Python code they run).
# Matched against the file/library part of a py-spy frame, "function (file:line)".
PROFILE_COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("protobuf (upb parse/serialize)", ("_message.abi3.so", "google/protobuf", "_pb2.py", "upb")),
    ("LMDB / WAL (backend.py, wal.py, lmdb)", ("server/backend.py", "server/wal.py", "lmdb/", "mdb.c",
                                               "cpython.c", "crc32c")),
    ("hpack (request header decoding)", ("hpack/",)),
    ("coord HTTP/2 core (h2conn.py, h2grpc.py)", ("server/h2conn.py", "server/h2grpc.py")),
    ("coord transport.py (calls, handlers, context)", ("server/transport.py",)),
    ("coord services (kv, node, validation, mvcc)", ("server/services/", "server/node.py", "server/validation.py",
                                                     "server/mvcc.py", "server/errors.py", "server/counters.py",
                                                     "sortedcontainers/", "_bisectmodule")),
    ("coord writer (group commit)", ("server/writer.py",)),
    ("thread hop (anyio.to_thread, threading, queue)", ("anyio/to_thread.py", "threading.py", "queue.py",
                                                        "concurrent/futures")),
    ("anyio (events, memory streams, task groups)", ("anyio/",)),
    # Python mode: a sample whose innermost Python frame is asyncio.Runner.run is inside uvloop's
    # C loop (polling, which includes waiting when the server is not saturated, I/O, callbacks).
    ("uvloop / libuv (loop, polling, callbacks, transports)", ("loop.c", "core.c", "stream.c", "linux.c",
                                                               "loop-watcher.c", "queue.h", "uv-common.c",
                                                               "asyncio/runners.py")),
    ("asyncio tasks / futures (Python + _asyncio C)", ("asyncio/", "_asynciomodule")),
]
# Leaf frames of a thread that is blocked, not running: left out of the shares.
_IDLE = ("pthread_cond", "PyThread_acquire_lock", "Condition.wait (threading.py", "epoll_", "futex",
         "sem_wait", "sem_clockwait", "fdatasync", "fsync", "msync", "nanosleep", "clock_nanosleep")
_SYSCALLS = ("write (", "writev (", "read (", "readv (", "send (", "sendmsg (", "recv (", "recvmsg (")
_FILE = re.compile(r"\((.*?)(?::\d+)?\)$")


def categorize(frames: list[str]) -> str:
    inner = frames[-6:]
    if any(any(n in f for n in _IDLE) for f in inner):
        return "idle"
    leaf = frames[-1]
    if leaf.startswith(_SYSCALLS) and "libc" in leaf:
        return "socket syscalls (write/read, incl. kernel TCP loopback)"
    # The collector (CPython's gc_collect_main, native mode) runs inside whatever allocated.
    if any(f.startswith("gc_collect") for f in frames):
        return "Python GC"
    for frame in reversed(frames):
        m = _FILE.search(frame)
        where = m.group(1) if m else frame
        for name, needles in PROFILE_COMPONENTS:
            if any(n in where for n in needles):
                return name
    return "other (interpreter, libc)"


def summarize_profile(raw: Path) -> dict[str, Any]:
    """Share of busy samples per component from py-spy's raw (collapsed) stacks, plus top leaf frames."""
    by_cat: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        cat = categorize(frames)
        if cat == "idle":
            idle += n
            continue
        total += n
        by_cat[cat] += n
        leaves[frames[-1]] += n
    if not total:
        return {"samples": 0, "idle_samples": idle}
    return {
        "samples": total,
        "idle_samples": idle,
        "categories": {k: v / total for k, v in by_cat.most_common()},
        "top_frames": [(k, v / total) for k, v in leaves.most_common(30)],
    }


def profile(args: argparse.Namespace, server: Server, wl: Workload, body: Path, out_dir: Path,
            stamp: str) -> dict[str, Any]:
    """py-spy samples of ``server`` under ``wl`` (an extra run: sampling slows the server down).

    ``--profile-mode python`` samples Python frames without stopping the process;
    ``--profile-mode native`` also unwinds C frames (upb, lmdb, uvloop, GC, libc system calls).
    """
    pyspy = args.py_spy or shutil.which("py-spy") or str(Path(args.python).parent / "py-spy")
    raw = out_dir / f"profile-{stamp}-{server.name}-{wl.name}.txt"  # collapsed stacks (flamegraph.pl input)
    duration = max(2.0, args.profile_duration)
    cmd = pinned(args.load_core, [pyspy, "record", "--pid", str(server.pid), "--rate", str(args.profile_rate),
                                  "--duration", str(round(duration) + 1), "--format", "raw", "-o", str(raw)])
    # python: Python frames only, sampled without stopping the process (no bias, little slow-down;
    # C work counts for the Python line that called it). native: C frames too, but py-spy must stop
    # the process, which takes effect at its next kernel entry: system calls are over-represented.
    cmd.append("--native" if args.profile_mode == "native" else "--nonblocking")
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    r = h2load(args, server.port, wl, body, duration=duration)
    _, err = spy.communicate(timeout=120)
    if not raw.exists():
        return {"error": f"py-spy failed: {err.strip()[-500:]}"}
    summary = summarize_profile(raw)
    summary["raw"] = str(raw)
    summary["mode"] = args.profile_mode
    summary["throughput_while_sampled_rps"] = r["done"] / duration
    return summary


# --------------------------------------------------------------------------------------------------
# report

TARGETS = [
    # (label, workload, against, minimum ratio of coord throughput)
    ("durable Put c=1 at least as fast as etcd", "put-c1", "etcd", 1.0),
    ("Range c=64 >= 0.35x etcd throughput", "range-c64", "etcd", 0.35),
    ("Put c=64 >= 0.35x etcd throughput", "put-c64", "etcd", 0.35),
    ("Range c=64: coord's own work <= 20% of the trivial ceiling (>= 0.8x)", "range-c64", "trivial", 0.8),
    ("Put c=64: coord's own work <= 20% of the trivial ceiling (>= 0.8x)", "put-c64", "trivial", 0.8),
]


def pick_median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["throughput_rps"])
    return ordered[(len(ordered) - 1) // 2]


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        grouped.setdefault((r["server"], r["workload"]), []).append(r)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for (srv, wl), runs in grouped.items():
        clean = [r for r in runs if not r["disturbed"]]
        med = dict(pick_median(clean or runs))
        med["repeats"] = len(runs)
        med["clean_repeats"] = len(clean)
        med["throughput_all"] = [round(r["throughput_rps"], 1) for r in runs]
        summary.setdefault(wl, {})[srv] = med
    return summary


def evaluate_targets(summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for label, wl, against, minimum in TARGETS:
        row = summary.get(wl, {})
        if "coord" not in row or against not in row:
            continue
        ratio = row["coord"]["throughput_rps"] / row[against]["throughput_rps"]
        out.append({"target": label, "workload": wl, "against": against, "minimum": minimum,
                    "ratio": ratio, "pass": ratio >= minimum})
    return out


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def render_table(summary: dict[str, dict[str, dict[str, Any]]], servers: list[str], wls: list[Workload],
                 targets: list[dict[str, Any]]) -> str:
    metrics = [
        ("throughput (req/s)", lambda r: r["throughput_rps"], 0, True),
        ("latency p50 (us)", lambda r: r["latency_us"]["p50"], 0, False),
        ("latency p99 (us)", lambda r: r["latency_us"]["p99"], 0, False),
        ("server CPU (us/req)", lambda r: r["server_cpu_us_per_req"], 1, False),
        ("server core busy (%)", lambda r: 100 * r["server_cpu_util"], 0, None),
        ("read+write syscalls/req", lambda r: r["read_syscalls_per_req"] + r["write_syscalls_per_req"], 1, None),
        ("h2load core busy (%)", lambda r: 100 * r["h2load_cpu_util"], 0, None),
    ]
    ratio_cols = [(a, b) for a, b in (("coord", "etcd"), ("coord", "trivial")) if a in servers and b in servers]
    head = ["workload", "metric", *servers, *(f"{a}/{b}" for a, b in ratio_cols)]
    rows = [head]
    for wl in wls:
        row = summary.get(wl.name, {})
        shape = f"{wl.name} ({wl.conns}x{wl.streams})"
        for i, (label, get, digits, _) in enumerate(metrics):
            cells = [shape if i == 0 else "", label]
            vals = {s: (get(row[s]) if s in row else None) for s in servers}
            cells += [_fmt(vals[s], digits) + ("*" if s in row and row[s]["disturbed"] else "") for s in servers]
            for a, b in ratio_cols:
                va, vb = vals.get(a), vals.get(b)
                cells.append(f"{va / vb:.2f}x" if va is not None and vb else "-")
            rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if targets:
        lines.append("")
        lines.append("targets (coord throughput ratio; informational):")
        for t in targets:
            verdict = "PASS" if t["pass"] else "MISS"
            lines.append(f"  {verdict}  {t['target']}: {t['ratio']:.2f}x (need {t['minimum']:.2f}x)")
    return "\n".join(lines)


def markdown_table(summary: dict[str, dict[str, dict[str, Any]]], servers: list[str], wls: list[Workload]) -> str:
    """The same table in Markdown, for docs/performance.md."""
    ratio_cols = [(a, b) for a, b in (("coord", "etcd"), ("coord", "trivial")) if a in servers and b in servers]
    head = ["workload", "metric", *servers, *(f"{a}/{b}" for a, b in ratio_cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    metrics = [
        ("req/s", lambda r: r["throughput_rps"], 0),
        ("p50 µs", lambda r: r["latency_us"]["p50"], 0),
        ("p99 µs", lambda r: r["latency_us"]["p99"], 0),
        ("CPU µs/req", lambda r: r["server_cpu_us_per_req"], 1),
    ]
    for wl in wls:
        row = summary.get(wl.name, {})
        for i, (label, get, digits) in enumerate(metrics):
            vals = {s: (get(row[s]) if s in row else None) for s in servers}
            cells = [f"{wl.name} ({wl.conns}x{wl.streams})" if i == 0 else "", label]
            cells += [_fmt(vals[s], digits) + ("*" if s in row and row[s]["disturbed"] else "") for s in servers]
            for a, b in ratio_cols:
                va, vb = vals.get(a), vals.get(b)
                cells.append(f"{va / vb:.2f}x" if va is not None and vb else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each run (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="measure every cell N times, report the median run")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s runs, 0.5 s warm-up, small checks")
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                   help=f"comma-separated subset of {','.join(ALL_WORKLOADS)}")
    p.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                   help="comma-separated subset of etcd,coord,trivial (default: all three)")
    p.add_argument("--c64-shape", default="4x16", help="connections x streams for the c64 workloads (default 4x16)")
    p.add_argument("--verify-requests", type=int, default=2000,
                   help="requests in the fixed-count correctness run before each measurement")
    p.add_argument("--quiet-threshold", type=float, default=0.10,
                   help="before each measured run wait until both cores are at most this busy (default 0.10)")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="...but wait at most this many seconds (default 60; 0 = do not wait)")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    p.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd")
    p.add_argument("--h2load", default=shutil.which("h2load") or "/usr/bin/h2load")
    p.add_argument("--python", default=sys.executable, help="interpreter for coord-server and the trivial server")
    p.add_argument("--tmp-dir", default=None, help="where the data dirs go (must be a real disk, not tmpfs)")
    p.add_argument("--keep", action="store_true", help="keep the data dirs and server logs")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON results")
    p.add_argument("--profile", action="store_true",
                   help="after measuring, profile coord-server with py-spy under each workload (separate run)")
    p.add_argument("--profile-mode", choices=("python", "native"), default="python",
                   help="python (default): Python frames, non-blocking sampling; native: py-spy --native, "
                        "C frames too (upb, lmdb, uvloop, GC, syscalls) but slower and biased to syscalls")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--profile-duration", type=float, default=15.0, help="seconds per profiled run (default 15)")
    p.add_argument("--py-spy", default=None, help="path of py-spy (default: PATH, then next to --python)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.verify_requests = 2.0, 0.5, 300
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for w in args.workloads:
        if w not in ALL_WORKLOADS:
            p.error(f"unknown workload {w!r}")
    for s in args.servers:
        if s not in SERVER_ORDER:
            p.error(f"unknown server {s!r}")
    args.servers = [s for s in SERVER_ORDER if s in args.servers]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not check_tools("kv_bench", args):
        return 2
    ncpu = len(os.sched_getaffinity(0))
    if max(args.server_core, args.load_core) >= (os.cpu_count() or 1) or ncpu < 2:
        print("kv_bench: needs two cores (--server-core, --load-core)", file=sys.stderr)
    pin_self(args.load_core)  # this driver only waits and checks: keep it off the server's core

    g = Grpc()
    wls = workloads(args)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="kv-bench-", dir=args.tmp_dir))
    fstype = fs_type(base)
    info = machine_info()
    info["data_dir_fs"] = fstype
    if fstype in ("tmpfs", "ramfs"):
        print(f"kv_bench: WARNING: {base} is on {fstype}: fsync is free there, durable Put is not measured",
              file=sys.stderr)

    bodies = {"Range": base / "range.grpc", "Put": base / "put.grpc"}
    bodies["Range"].write_bytes(grpc_frame(g.pb.RangeRequest(key=KEY).SerializeToString()))
    bodies["Put"].write_bytes(grpc_frame(g.pb.PutRequest(key=KEY, value=VALUE).SerializeToString()))

    env = server_env(PYTHONUNBUFFERED="1")  # coord-server's log lines at once
    results: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    failures: list[str] = []
    started = time.monotonic()
    print(f"kv_bench: {', '.join(args.servers)} pinned to core {args.server_core}, h2load on core "
          f"{args.load_core}; {args.duration:g} s per run (+{args.warmup:g} s warm-up), x{args.repeat}; "
          f"data in {base} ({fstype})", flush=True)
    if "etcd" in args.servers:
        info["etcd"] = subprocess.run([args.etcd, "--version"], capture_output=True,
                                      text=True).stdout.splitlines()[0]
    servers: list[Server] = []
    try:
        # Every repeat starts fresh servers on fresh data dirs: the Range runs always see the same
        # store (one key, one revision), not the history the previous repeat's puts left behind.
        for rep in range(args.repeat):
            rep_dir = base / f"repeat-{rep + 1}"
            rep_dir.mkdir()
            servers = make_servers(args, rep_dir)
            for s in servers:
                s.start(env)
            for s in servers:
                g.wait_ready(s)
                g.put(s.port)  # pre-load bench-key
            for wl in wls:
                for s in servers:
                    tag = f"[{rep + 1}/{args.repeat}] {wl.name:<9} {s.name:<7}"
                    try:
                        r = measure(args, g, s, wl, bodies[wl.method], base)
                    except CheckFailed as exc:
                        failures.append(str(exc))
                        print(f"{tag} CHECK FAILED: {exc}", flush=True)
                        continue
                    r["repeat"] = rep
                    results.append(r)
                    lat = r["latency_us"]
                    print(f"{tag} {r['throughput_rps']:>9,.0f} req/s  p50 {lat['p50']:>7,.0f} us  "
                          f"p99 {lat['p99']:>7,.0f} us  cpu {r['server_cpu_us_per_req']:>6.1f} us/req  "
                          f"(server core {100 * r['server_cpu_util']:.0f}% + other "
                          f"{100 * r['server_core_other_util']:.0f}%, h2load {100 * r['h2load_cpu_util']:.0f}%)"
                          + (" disturbed" if r["disturbed"] else ""), flush=True)
            if rep + 1 < args.repeat:
                for s in servers:
                    s.stop()
        if args.profile:
            coord = next((s for s in servers if s.name == "coord"), None)
            if coord is None:
                print("kv_bench: --profile needs the coord server", file=sys.stderr)
            else:
                for wl in wls:
                    prof = profile(args, coord, wl, bodies[wl.method], out_dir, stamp)
                    profiles[wl.name] = prof
                    print(f"\nprofile of coord-server under {wl.name} ({prof.get('samples', 0)} busy samples; "
                          f"{prof.get('throughput_while_sampled_rps', 0):,.0f} req/s while sampled):")
                    for cat, share in prof.get("categories", {}).items():
                        print(f"  {100 * share:5.1f}%  {cat}")
                    if "error" in prof:
                        print(f"  {prof['error']}")
    finally:
        for s in servers:
            s.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    info["loadavg_end"] = os.getloadavg()
    summary = summarize(results)
    targets = evaluate_targets(summary)
    print()
    print(render_table(summary, args.servers, wls, targets))
    noisy = [r for r in results if r["disturbed"]]
    if noisy:
        print(f"\n* {len(noisy)} of {len(results)} run(s) were disturbed: another process kept a core busy "
              f"(>{100 * args.quiet_threshold:.0f}% before the run or >15% of the server core during it). "
              "Summaries use undisturbed repeats when there are any; cells marked * had none.")
    if failures:
        print("\nCHECK FAILURES:\n  " + "\n  ".join(failures))
    doc = {
        "timestamp": stamp,
        "elapsed_s": time.monotonic() - started,
        "machine": info,
        "config": {k: v for k, v in vars(args).items()},
        "workloads": [asdict(w) for w in wls],
        "summary": summary,
        "targets": targets,
        "runs": results,
        "profiles": profiles,
        "failures": failures,
        "markdown_table": markdown_table(summary, args.servers, wls),
    }
    path = out_dir / f"kv-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"\nresults: {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
