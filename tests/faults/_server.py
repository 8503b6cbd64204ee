"""coord-server processes for the fault tests: free ports, temp data dirs, SIGKILL, optional wrappers.

Local to ``tests/faults`` on purpose (the shared fixtures live in ``tests/helpers``). Every process is
started in a session of its own, so :meth:`ServerProcess.kill` can SIGKILL a wrapper (strace, fiu-run)
together with the server it runs, by the process-group id of the process this module started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from helpers.procs import free_port

from coord._pb import rpc_pb2, rpc_pb2_grpc

READY_MARK = "ready: serving client requests on"
READY_TIMEOUT = 30.0  # generous: a server under strace -f starts several times slower

class ServerExited(RuntimeError):
    """The server process ended before it said it was ready."""


class ServerProcess:
    """One coord-server process (possibly under a wrapper such as strace or fiu-run)."""

    def __init__(self, data_dir: Path, log_path: Path, *, wrapper: Sequence[str] = (),
                 env: dict[str, str] | None = None, port: int | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port if port is not None else free_port()
        url = f"http://127.0.0.1:{self.port}"
        self.argv = [*wrapper, sys.executable, "-m", "coord_server", "--name", "faults",
                     "--data-dir", str(data_dir), "--listen-client-urls", url,
                     "--advertise-client-urls", url, *extra_args]
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_at = 0.0
        self.returncode: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {' '.join(self.argv)}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Block until the ready line is in the log; returns the startup time in seconds."""
        assert self.proc is not None
        offset = self._log_size_at_start()
        deadline = time.monotonic() + timeout
        while True:
            text = self._log_from(offset)
            if READY_MARK in text:
                self.ready_at = time.monotonic()
                return self.ready_at - self.started_at
            rc = self.proc.poll()
            if rc is not None:
                self.returncode = rc
                raise ServerExited(f"coord-server exited with {rc} before ready:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"coord-server not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.005)

    def _log_size_at_start(self) -> int:
        # The log is appended to across restarts: look only at what this start wrote.
        text = self.log_path.read_bytes()
        return text.rfind(b"--- start ")

    def _log_from(self, offset: int) -> str:
        return self.log_path.read_bytes()[offset:].decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def kill(self) -> int | None:
        """SIGKILL the process group (wrapper and server) and reap; returns the exit status."""
        proc = self.proc
        if proc is None:
            return self.returncode
        if proc.returncode is None:
            # Not reaped yet, so the group id cannot have been reused: safe to signal the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            self.returncode = proc.wait(timeout=10)
        else:
            self.returncode = proc.returncode
        return self.returncode

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for the process to exit by itself; None if it is still running after ``timeout``."""
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=[("grpc.enable_retries", 0)])


@contextlib.contextmanager
def running_server(data_dir: Path, log_path: Path, **kw: object) -> Iterator[ServerProcess]:
    """Start a server, wait for it to be ready, and SIGKILL it (and its wrapper) at exit."""
    srv = ServerProcess(data_dir, log_path, **kw)  # type: ignore[arg-type]
    try:
        srv.start()
        srv.wait_ready()
        yield srv
    finally:
        srv.kill()


def kv_stub(channel: grpc.Channel) -> rpc_pb2_grpc.KVStub:
    return rpc_pb2_grpc.KVStub(channel)


def head_revision(kv: rpc_pb2_grpc.KVStub, timeout: float = 10.0) -> int:
    """The server's current revision (header of a count-only range)."""
    resp = kv.Range(rpc_pb2.RangeRequest(key=b"\0", range_end=b"\0", count_only=True), timeout=timeout)
    return int(resp.header.revision)
