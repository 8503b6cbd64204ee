#!/usr/bin/env python3
"""JSON gateway benchmark: coord-server's HTTP/1.1 side vs etcd's, and what HTTP traffic costs gRPC.

Each server (real etcd 3.4.23 and ``python -m coord_server``) is pinned to core 0 (``taskset``) with its
own free loopback ports and temporary data dir; load comes from ``h2load`` pinned to core 1:

- ``gw-range-c1`` / ``gw-range-c64``: ``POST /v3/kv/range`` (JSON) over HTTP/1.1 keep-alive
  (``h2load --h1``), 1 connection, or 64 connections with one request in flight each;
- ``gw-put-c64``: ``POST /v3/kv/put``, 64 connections;
- ``grpc-range-c64``: gRPC ``KV/Range`` over HTTP/2 (4 connections x 16 streams) alone, then the same
  while the *same port* serves HTTP/1.1: a second h2load at full speed (``gw-range`` at 16 connections),
  or a load balancer and Prometheus as they poll (``GET /health`` every 100 ms, ``GET /metrics`` every
  second; their latency is reported): the ratios show what the HTTP side takes from gRPC.

Every run is checked: all requests must complete with a 2xx status (h2load's counts), and every gRPC
reply must have the size of a correct Range reply (a gRPC error would still be HTTP 200). Prints a
side-by-side table with coord/etcd ratios and writes ``benchmarks/results/gateway-<timestamp>.json``.

    python benchmarks/gateway_bench.py            # 5 s per measurement
    python benchmarks/gateway_bench.py --quick    # 2 s smoke run

Needs: Linux, ``taskset``, ``h2load`` (nghttp2-client), ``etcd`` (etcd-server 3.4) and the coord package.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import HERE, ServerProcess, grpc_frame, pinned, running_server

KEY = b"bench-key"
VALUE = b"v" * 64


def wait_ready(server: ServerProcess, timeout: float = 60.0) -> None:
    """Until the server answers a put of KEY through the gateway; raises RuntimeError if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited:\n{server.log_path.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError):
            post(server.port, "/v3/kv/put", {"key": b64(KEY), "value": b64(VALUE)})
            return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready")


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def post(port: int, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


# --------------------------------------------------------------------------------------------------
# h2load


@dataclass
class Load:
    name: str
    path: str
    body: bytes | None  # None: GET
    conns: int
    streams: int = 1
    h1: bool = True
    extra: list[str] = field(default_factory=list)


def parse(out: str) -> dict[str, Any]:
    r: dict[str, Any] = {}
    if m := re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out):
        r["rps"] = float(m.group(3))
    if m := re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out):
        r["done"], r["succeeded"], r["failed"] = int(m.group(3)), int(m.group(4)), int(m.group(5))
    if m := re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out):
        r["2xx"], r["non2xx"] = int(m.group(1)), sum(int(x) for x in m.groups()[1:])
    if m := re.search(r"traffic: .*?\((\d+)\) data", out):
        r["data_bytes"] = int(m.group(1))
    if m := re.search(r"time for request:\s+[\d.]+\w+\s+[\d.]+\w+\s+([\d.]+)(\w+)", out):
        r["mean_ms"] = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    return r


def h2load(args: argparse.Namespace, port: int, load: Load, seconds: float, tmp: Path) -> dict[str, Any]:
    cmd = pinned(args.load_core, [args.h2load, "-c", str(load.conns), "-m", str(load.streams),
                                  "-D", f"{int(seconds * 1000)}ms", *load.extra])
    if load.h1:
        cmd.append("--h1")
    if load.body is not None:
        body = tmp / f"{load.name}.body"
        body.write_bytes(load.body)
        cmd += ["-d", str(body)]
    cmd.append(f"http://127.0.0.1:{port}{load.path}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 4 + 60)
    r = parse(proc.stdout)
    if "done" not in r:
        raise RuntimeError(f"h2load failed:\n{proc.stdout}\n{proc.stderr}")
    if r.get("non2xx", 0) or r.get("failed", 0):
        raise RuntimeError(f"{load.name}: {r.get('non2xx')} non-2xx, {r.get('failed')} failed:\n{proc.stdout}")
    return r


def loads() -> dict[str, Load]:
    from coord._pb import rpc_pb2

    range_json = json.dumps({"key": b64(KEY)}).encode()
    put_json = json.dumps({"key": b64(KEY), "value": b64(VALUE)}).encode()
    grpc_range = grpc_frame(rpc_pb2.RangeRequest(key=KEY).SerializeToString())
    grpc_headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    return {
        "gw-range-c1": Load("gw-range-c1", "/v3/kv/range", range_json, 1),
        "gw-range-c64": Load("gw-range-c64", "/v3/kv/range", range_json, 64),
        "gw-put-c64": Load("gw-put-c64", "/v3/kv/put", put_json, 64),
        "grpc-range-c64": Load("grpc-range-c64", "/etcdserverpb.KV/Range", grpc_range, 4, 16, h1=False,
                               extra=grpc_headers),
        "gw-range-c16": Load("gw-range-c16", "/v3/kv/range", range_json, 16),
    }


def concurrent(args: argparse.Namespace, port: int, main: Load, others: list[Load], seconds: float,
               tmp: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``main`` measured while ``others`` run on the same port (they start first and end last)."""
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def run(load: Load) -> None:
        try:
            results[load.name] = h2load(args, port, load, seconds + 1.0, tmp)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(o,)) for o in others]
    for t in threads:
        t.start()
    time.sleep(0.5)
    r = h2load(args, port, main, seconds, tmp)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return r, results


class Poller(threading.Thread):
    """GET ``path`` every ``interval`` seconds (a load balancer, a Prometheus scrape); latencies recorded."""

    def __init__(self, port: int, path: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = f"http://127.0.0.1:{port}{path}", interval
        self.latencies: list[float] = []
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    r.read()
                self.latencies.append(time.monotonic() - t0)
            except OSError:
                self.errors += 1
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {"count": len(lat), "errors": self.errors, "mean_ms": 1e3 * sum(lat) / max(1, len(lat)),
                "max_ms": 1e3 * (lat[-1] if lat else 0.0)}


def with_pollers(args: argparse.Namespace, port: int, main: Load, seconds: float,
                 tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    pollers = [Poller(port, "/health", 0.1), Poller(port, "/metrics", 1.0)]
    for p in pollers:
        p.start()
    try:
        r = h2load(args, port, main, seconds, tmp)
    finally:
        for p in pollers:
            p.stop.set()
        for p in pollers:
            p.join()
    return r, {"health": pollers[0].summary(), "metrics": pollers[1].summary()}


def reply_size() -> int:
    """Bytes of one gRPC Range reply for KEY (5-byte prefix + message), the same on both servers."""
    from coord._pb import kv_pb2, rpc_pb2

    header = rpc_pb2.ResponseHeader(cluster_id=2**63, member_id=2**63, revision=2, raft_term=2)
    kv = kv_pb2.KeyValue(key=KEY, value=VALUE, create_revision=2, mod_revision=2, version=1)
    return 5 + len(rpc_pb2.RangeResponse(header=header, kvs=[kv], count=1).SerializeToString())


def check_grpc(r: dict[str, Any], expected: int) -> None:
    per = r.get("data_bytes", 0) / max(1, r["done"])
    # IDs are varints: allow a few bytes either way, but an error reply (no kvs) is far smaller.
    if abs(per - expected) > 6:
        raise RuntimeError(f"gRPC replies of {per:.1f} bytes, expected about {expected}: not all calls succeeded")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="2 s per measurement")
    ap.add_argument("--servers", default="etcd,coord")
    ap.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd")
    ap.add_argument("--h2load", default=shutil.which("h2load") or "h2load")
    ap.add_argument("--server-core", type=int, default=0)
    ap.add_argument("--load-core", type=int, default=1)
    args = ap.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    table = loads()
    report: dict[str, Any] = {"when": dt.datetime.now(dt.UTC).isoformat(), "seconds": seconds, "servers": {}}
    with tempfile.TemporaryDirectory(prefix="gwbench-") as d:
        tmp = Path(d)
        for name in args.servers.split(","):
            with running_server(name, tmp, etcd=args.etcd, core=args.server_core) as server:
                wait_ready(server)
                res: dict[str, Any] = {}
                for wl in ("gw-range-c1", "gw-range-c64", "gw-put-c64"):
                    h2load(args, server.port, table[wl], min(1.0, seconds), tmp)  # warm-up
                    res[wl] = h2load(args, server.port, table[wl], seconds, tmp)
                grpc = table["grpc-range-c64"]
                # Only the key's own put ran on this server: revision 2, as reply_size() assumes.
                h2load(args, server.port, grpc, min(1.0, seconds), tmp)
                res["grpc-alone"] = h2load(args, server.port, grpc, seconds, tmp)
                res["grpc-with-gw"], res["gw-beside-grpc"] = concurrent(
                    args, server.port, grpc, [table["gw-range-c16"]], seconds, tmp)
                res["grpc-with-health-metrics"], res["health-metrics-beside-grpc"] = with_pollers(
                    args, server.port, grpc, seconds, tmp)
                for key in ("grpc-alone", "grpc-with-gw", "grpc-with-health-metrics"):
                    check_grpc(res[key], reply_size())
                report["servers"][name] = res

    names = list(report["servers"])
    rows = [("gateway Range, 1 conn (req/s)", "gw-range-c1"), ("gateway Range, 64 conns (req/s)", "gw-range-c64"),
            ("gateway Put, 64 conns (req/s)", "gw-put-c64"), ("gRPC Range c64 alone (req/s)", "grpc-alone"),
            ("gRPC Range c64 + gateway c16 (req/s)", "grpc-with-gw"),
            ("gRPC Range c64 + /health,/metrics (req/s)", "grpc-with-health-metrics")]
    print(f"\n{'':44}" + "".join(f"{n:>12}" for n in names) + ("   coord/etcd" if len(names) == 2 else ""))
    for title, key in rows:
        vals = [report["servers"][n][key]["rps"] for n in names]
        line = f"{title:44}" + "".join(f"{v:12.0f}" for v in vals)
        if len(vals) == 2 and vals[0]:
            line += f"   {vals[1] / vals[0]:10.2f}"
        print(line)
    for n in names:
        s = report["servers"][n]
        with_gw = s["grpc-with-gw"]["rps"] / s["grpc-alone"]["rps"]
        with_hm = s["grpc-with-health-metrics"]["rps"] / s["grpc-alone"]["rps"]
        beside = s["gw-beside-grpc"]["gw-range-c16"]["rps"]
        hm = s["health-metrics-beside-grpc"]
        print(f"{n}: gRPC keeps {with_gw:.0%} of its throughput beside full-speed gateway traffic ({beside:.0f} "
              f"gateway req/s) and {with_hm:.0%} beside /health (10/s) + /metrics (1/s) pollers; under that load "
              f"/health took mean {hm['health']['mean_ms']:.1f} ms, max {hm['health']['max_ms']:.1f} ms "
              f"({hm['health']['count']} polls, {hm['health']['errors']} errors), /metrics mean "
              f"{hm['metrics']['mean_ms']:.1f} ms, max {hm['metrics']['max_ms']:.1f} ms")
    out = HERE / "results" / f"gateway-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
