"""Server processes for tests: a real etcd 3.4 and coord-server, started with the same etcd flags.

Both are single-member clusters on 127.0.0.1 with ports picked by :func:`free_port`; both keep their log
in their work directory (``server.log``) so a failing test can print it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from coord._pb import rpc_pb2, rpc_pb2_grpc

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
DEFAULT_NAME = "node1"
DEFAULT_TOKEN = "etcd-cluster"

# Ports handed out by free_port() in this process: the kernel may give the same ephemeral port to two
# consecutive bind(0) calls once the first socket is closed, and two servers started together must not clash.
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (never assumes 2379)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def find_etcd() -> str | None:
    """Path of the real etcd binary: /usr/bin/etcd or `etcd` on PATH."""
    if os.access("/usr/bin/etcd", os.X_OK):
        return "/usr/bin/etcd"
    return shutil.which("etcd")


@dataclass(frozen=True)
class Identity:
    """What a server says about itself in a response header (read once it is ready)."""

    cluster_id: int
    member_id: int
    raft_term: int


class ServerProcess:
    """One single-member server process. Subclasses say which command line runs it."""

    kind = "server"

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = DEFAULT_NAME,
        token: str | None = None,
        extra_args: Sequence[str] = (),
        client_port: int | None = None,
        peer_port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.token = token
        self.extra_args = list(extra_args)
        self._auto_ports = client_port is None and peer_port is None
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.identity: Identity | None = None
        self._log_file: object = None
        self.starts = 0

    # -- addresses -------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """host:port as etcdctl's --endpoints and grpc channels want it."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def member_id(self) -> int:
        assert self.identity is not None, "server not ready yet"
        return self.identity.member_id

    @property
    def cluster_id(self) -> int:
        assert self.identity is not None, "server not ready yet"
        return self.identity.cluster_id

    @property
    def member_hex(self) -> str:
        """The member ID as etcdctl prints it (%x / %016x agree for IDs with a high nibble set)."""
        return f"{self.member_id:x}"

    def etcd_flags(self) -> list[str]:
        flags = [
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.name}={self.peer_url}",
        ]
        if self.token is not None:
            flags.append(f"--initial-cluster-token={self.token}")
        return flags + self.extra_args

    def command(self) -> list[str]:
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------------
    def spawn(self) -> None:
        """Start the process without waiting for it (so several servers can boot in parallel)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        log = open(self.log_path, "ab")  # closed in _reap()
        log.write(f"\n===== start #{self.starts}: {' '.join(self.command())}\n".encode())
        log.flush()
        self._log_file = log
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.env(),
            start_new_session=True,
        )

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Settings must come from flags only.
        for k in list(env):
            if k.startswith("ETCD_") or k.startswith("ETCDCTL_"):
                del env[k]
        return env

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll a TCP connect and then a gRPC Range until one succeeds."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last_err: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with rc={self.proc.returncode} while starting\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.5):
                    pass
            except OSError as exc:
                last_err = exc
                time.sleep(0.02)
                continue
            try:
                with grpc.insecure_channel(self.endpoint) as ch:
                    resp = rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"health"), timeout=1.0)
            except grpc.RpcError as exc:
                last_err = exc
                time.sleep(0.05)
                continue
            h = resp.header
            self.identity = Identity(h.cluster_id, h.member_id, h.raft_term)
            return
        raise TimeoutError(f"{self.kind} not ready after {timeout}s: {last_err}\n{self.log_tail()}")

    def start(self, timeout: float = READY_TIMEOUT) -> ServerProcess:
        start_all([self], timeout)
        return self

    def lost_port_race(self) -> bool:
        """True if the process died because one of its (auto-picked) ports was taken meanwhile; then the
        ports are replaced by fresh ones so that the caller can spawn again."""
        if not self._auto_ports or self.identity is not None:  # ports never change once it has served
            return False
        if self.proc is None or self.proc.poll() is None:
            return False
        if "address already in use" not in self.log_tail(20).lower():
            return False
        self._reap()
        self.client_port, self.peer_port = free_port(), free_port()
        return True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal (SIGKILL, SIGSTOP, SIGCONT, ...). After SIGKILL the process is reaped."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=STOP_TIMEOUT)
            self._reap()

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a grace period. Returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # a SIGSTOPped process cannot handle SIGTERM
                self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        self._reap()
        return self.proc.returncode

    def restart(self, timeout: float = READY_TIMEOUT) -> ServerProcess:
        """Stop (if running) and start again on the same data dir and ports."""
        self.stop()
        return self.start(timeout)

    def _reap(self) -> None:
        log = self._log_file
        self._log_file = None
        if log is not None:
            log.close()  # type: ignore[attr-defined]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        tail = text.splitlines()[-lines:]
        return f"----- {self.kind} log {self.log_path} (last {len(tail)} lines) -----\n" + "\n".join(tail)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.endpoint} workdir={self.workdir}>"


class EtcdProcess(ServerProcess):
    """The real etcd 3.4 binary."""

    kind = "etcd"

    def __init__(self, workdir: Path, *, binary: str | None = None, **kw: object) -> None:
        super().__init__(workdir, **kw)  # type: ignore[arg-type]
        binary = binary or find_etcd()
        if binary is None:
            raise RuntimeError("etcd binary not found")
        self.binary = binary

    def command(self) -> list[str]:
        return [self.binary, *self.etcd_flags()]


class CoordServerProcess(ServerProcess):
    """coord-server, run as ``python -m coord_server`` with etcd's flag names."""

    kind = "coord"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "coord_server", *self.etcd_flags()]


def start_all(servers: Sequence[ServerProcess], timeout: float = READY_TIMEOUT) -> None:
    """Spawn every server first, then wait for each: they boot in parallel. A server that lost a race for
    its auto-picked ports is retried on fresh ports (twice at most)."""
    for s in servers:
        s.spawn()
    for s in servers:
        for attempt in range(3):
            try:
                s.wait_ready(timeout)
                break
            except RuntimeError:
                if attempt == 2 or not s.lost_port_race():
                    raise
                s.spawn()
