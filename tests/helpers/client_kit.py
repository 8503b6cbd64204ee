"""Helpers for the coord client suite: unique names, lease/key counting, a fenced resource, an etcd cluster.

``FencedResource`` is the thing a lock protects in the lock tests: a TCP line server (one thread per
connection) that accepts ``ENTER/WRITE/EXIT <token> <who>`` and refuses any write whose fencing token is
below the highest it has seen (the Kleppmann/Chubby sequencer check). It counts what the tests judge:
overlapping critical sections, writes accepted with a stale token, and the order of entries.
"""

from __future__ import annotations

import itertools
import socketserver
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import EtcdProcess, free_port, start_all

_counter = itertools.count()

# Slow tests run on one anyio backend per server, different ones so that both event-loop paths see them.
SLOW_BACKEND: dict[str, Any] = {"coord": "trio", "etcd": ("asyncio", {"use_uvloop": True})}


async def wait_until_exists(client: Any, key: str | bytes) -> None:
    """Return once ``key`` exists (a watch is opened first, so a put in between is not missed)."""
    async with client.watch(key) as events:
        if await client.get(key) is None:
            await events.receive()


def unique(prefix: str = "t") -> str:
    """A key/name no other test uses (tests share one server per module)."""
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


@dataclass
class FencedResource:
    """Counts overlaps and stale writes; see the module docstring. Thread-safe."""

    max_token: int = 0
    holders: set[str] = field(default_factory=set)
    entries: list[int] = field(default_factory=list)
    overlaps: int = 0
    accepted: list[tuple[int, str]] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, line: str) -> str:
        verb, token_s, who = line.split()
        token = int(token_s)
        with self.lock:
            if verb == "ENTER":
                if token < self.max_token:
                    self.rejected.append((token, who))
                    return "REJECT"
                if self.holders:
                    self.overlaps += 1
                self.holders.add(who)
                self.entries.append(token)
                self.max_token = token
                return "OK"
            if verb == "WRITE":
                if token < self.max_token:
                    self.rejected.append((token, who))
                    return "REJECT"
                self.max_token = token
                self.accepted.append((token, who))
                return "OK"
            if verb == "EXIT":
                self.holders.discard(who)
                return "OK"
        return "ERROR"


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        resource: FencedResource = self.server.resource  # type: ignore[attr-defined]
        for raw in self.rfile:
            line = raw.decode().strip()
            if not line:
                continue
            self.wfile.write((resource.handle(line) + "\n").encode())
            self.wfile.flush()


class FencedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.resource = FencedResource()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def __enter__(self) -> FencedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


def start_etcd_cluster(workdir: Path, binary: str, size: int = 3, extra_args: Sequence[str] = ()) -> list[EtcdProcess]:
    """A real etcd cluster of ``size`` members on loopback (each with its own data dir and ports)."""
    names = [f"m{i}" for i in range(size)]
    peer_ports = [free_port() for _ in names]
    initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, peer_ports, strict=True))
    members = [
        EtcdProcess(
            workdir / n,
            binary=binary,
            name=n,
            token="coord-client-cluster",
            peer_port=p,
            client_port=free_port(),
            extra_args=[f"--initial-cluster={initial}", "--initial-cluster-state=new", *extra_args],
        )
        for n, p in zip(names, peer_ports, strict=True)
    ]
    start_all(members, timeout=30.0)
    return members
