"""Plumbing shared by the benchmark programs; each program stays one readable script, the mechanics live here.

- servers: real etcd and coord-server as one-member clusters on free loopback ports
  (:func:`server_process`), started in their own session with a clean environment and stopped
  (:class:`ServerProcess`);
- cores: ``taskset`` prefixes (:func:`pinned`), the driver's own affinity (:func:`pin_self`), the
  tools a run needs (:func:`check_tools`);
- accounting: process CPU time and per-core busy time from /proc, the machine a run ran on, the file
  system of the data dirs;
- load and results: gRPC framing for h2load bodies, h2load's summary parsed, percentiles;
- two-process benchmarks (the driver and a ``--client`` process on the other core): their common flags,
  the client process started and its JSON result read, and the client's wait for the server.

Benchmarks import it as ``_common`` (a script's own folder is first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int, cmd: list[str]) -> list[str]:
    """``cmd`` run on ``core`` only (``taskset -c``)."""
    return ["taskset", "-c", str(core), *cmd]


def server_env(**extra: str) -> dict[str, str]:
    """This process's environment without ETCD* variables (they would configure etcd behind the flags' back),
    plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ETCD")}, **extra}


def member_command(kind: str, base: Path, *, etcd: str, python: str = sys.executable) -> tuple[int, list[str]]:
    """Real etcd (``kind`` "etcd") or coord-server (any other ``kind``) as a one-member cluster named
    ``bench-<kind>`` on free loopback ports, data in ``base/<kind>.data``: (client port, command line)."""
    port, peer = free_port(), free_port()
    url, purl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
    member = f"bench-{kind}"
    flags = ["--name", member, "--data-dir", str(base / f"{kind}.data"), "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
             "--initial-cluster", f"{member}={purl}"]
    return port, ([etcd, *flags] if kind == "etcd" else [python, "-m", "coord_server", *flags])


@dataclass
class ServerProcess:
    """A server run as a child process in its own session, stdout and stderr in ``log_path``."""

    name: str
    port: int
    cmd: list[str]
    log_path: Path
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start it with ``env`` (default: :func:`server_env`)."""
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=server_env() if env is None else env, cwd=self.cwd, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not exited 15 s later; then close the log. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None


def server_process(kind: str, base: Path, *, etcd: str, core: int, python: str = sys.executable) -> ServerProcess:
    """:func:`member_command` pinned to ``core``, its log in ``base/<kind>.log`` (not started yet)."""
    port, cmd = member_command(kind, base, etcd=etcd, python=python)
    return ServerProcess(kind, port, pinned(core, cmd), base / f"{kind}.log")


@contextlib.contextmanager
def running_server(kind: str, base: Path, *, etcd: str, core: int) -> Iterator[ServerProcess]:
    """:func:`server_process`, started (with :func:`server_env`) for the ``with`` block and stopped after it."""
    server = server_process(kind, base, etcd=etcd, core=core)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------
# cores and tools


def pin_self(core: int) -> None:
    """Keep this (driver) process on ``core``, off the server's; best effort."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {core})


def check_tools(prog: str, args: argparse.Namespace) -> bool:
    """Whether ``taskset``, ``args.h2load`` and (when ``args.servers`` has it) ``args.etcd`` are installed;
    prints ``<prog>: <tool> not found`` on stderr for the first that is not."""
    for tool in ("taskset", args.h2load, *([args.etcd] if "etcd" in args.servers else [])):
        if not shutil.which(tool):
            print(f"{prog}: {tool} not found", file=sys.stderr)
            return False
    return True


# --------------------------------------------------------------------------------------------------
# accounting


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def cores_busy_seconds() -> dict[int, float]:
    """Busy time (not idle, not iowait) of every core since boot, in seconds."""
    busy: dict[int, float] = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+) (.*)", line)
            if m:
                v = [int(x) for x in m.group(2).split()]
                # user nice system idle iowait irq softirq steal (guest is inside user)
                busy[int(m.group(1))] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK
    return busy


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    real = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split(":", 1)[1].strip()
    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return out.splitlines()[0].strip() if out else "?"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "h2load": version(["h2load", "--version"]),
        "loadavg_start": os.getloadavg(),
        "coord_git": git_state(),
    }


def git_state() -> str:
    """The commit coord-server ran from, with "+dirty" when src/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------------------------------
# load and results


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, body."""
    return b"\x00" + struct.pack(">I", len(message)) + message


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def parse_h2load(out: str) -> dict[str, Any]:
    """The numbers of h2load's summary: elapsed time and req/s, request counts, status classes, traffic
    bytes, min/max/mean time per request (in µs)."""
    r: dict[str, Any] = {}
    m = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    if m:
        r["elapsed_s"] = float(m.group(1)) * _UNITS[m.group(2)] / 1e6
        r["h2load_rps"] = float(m.group(3))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    if m:
        for k, v in zip(("total", "started", "done", "succeeded", "failed", "errored", "timeout"),
                        m.groups(), strict=True):
            r[k] = int(v)
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        r["status_2xx"], r["status_3xx"], r["status_4xx"], r["status_5xx"] = map(int, m.groups())
    m = re.search(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data", out)
    if m:
        r["bytes_total"], r["bytes_headers"], r["bytes_data"] = map(int, m.groups())
    m = re.search(r"time for request:\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)", out)
    if m:
        g = m.groups()
        r["h2load_min_us"] = float(g[0]) * _UNITS[g[1]]
        r["h2load_max_us"] = float(g[2]) * _UNITS[g[3]]
        r["h2load_mean_us"] = float(g[4]) * _UNITS[g[5]]
    return r


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in percent) of an already sorted list; NaN when it is empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return float(sorted_values[rank - 1])


def quantile(values: list[float], q: float) -> float:
    """The value at index ``floor(n * q)`` of the sorted values (``q`` from 0 to 1); NaN when empty."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


# --------------------------------------------------------------------------------------------------
# two-process benchmarks: the driver starts the servers, a client process on the other core drives them


def add_two_process_args(p: argparse.ArgumentParser) -> None:
    """``--etcd``, ``--servers``, ``--server-core``, ``--client-core``, ``--json``, and the hidden ``--client``
    that makes the script the client process."""
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd")
    p.add_argument("--servers", nargs="+", default=["etcd", "coord"])
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the results here")


def client_process(client_main: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]], cfg_json: str) -> int:
    """The client process's whole run: ``client_main(cfg)`` on uvloop, its result printed as one JSON line."""
    import uvloop

    print(json.dumps(uvloop.run(client_main(json.loads(cfg_json)))))
    return 0


def run_client(script: str, core: int, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Run ``script --client <cfg>`` pinned to ``core`` and return its JSON result. Raises RuntimeError
    ``client failed <where>`` with the end of its stderr if it fails."""
    out = subprocess.run(pinned(core, [sys.executable, script, "--client", json.dumps(cfg)]), capture_output=True,
                         text=True, check=False, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"client failed {where}:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def wait_for_server(target: str) -> None:
    """In the client process: return once the server at ``target`` answers a Range, or after 300 tries 0.1 s
    apart (the run then fails on its own calls)."""
    import grpc

    from coord._pb import rpc_pb2 as pb
    from coord._pb import rpc_pb2_grpc as pbg

    for _ in range(300):
        try:
            async with grpc.aio.insecure_channel(target) as ch:
                await pbg.KVStub(ch).Range(pb.RangeRequest(key=b"x"), timeout=1)
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
