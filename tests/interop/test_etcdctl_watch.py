"""`etcdctl watch` in all its forms, differential: real etcd 3.4.23 vs coord-server.

The same history is written to both servers; each form watches from a known revision (so no event
can be missed before the watch is in place) and runs until a final sentinel event shows up, then the
etcdctl process is stopped and the outputs are compared after normalising only IDs and terms.
One live form (no --rev) waits for the watch by re-writing a sentinel until it appears.
"""

from __future__ import annotations

import base64
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CoordServerProcess, EtcdProcess, ServerProcess, etcdctl, find_etcdctl, normalize, start_all

SENTINEL = "END-OF-HISTORY"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, etcd_binary: str) -> Iterator[tuple[ServerProcess, ...]]:
    base = Path(tmp_path_factory.mktemp("etcdctl-watch"))
    servers = (EtcdProcess(base / "etcd", binary=etcd_binary), CoordServerProcess(base / "coord"))
    start_all(servers)
    for srv in servers:
        ep = srv.endpoint
        for args in (("put", "foo1", "a"), ("put", "foo2", "b"), ("put", "bar", "x"), ("put", "foo1", "c"),
                     ("del", "foo2"), ("put", "foo5", "multi\nline"), ("del", "foo", "--prefix", "--prev-kv"),
                     ("put", "foo1", "d"), ("put", "foo1", SENTINEL)):
            etcdctl(ep, *args).check()
    try:
        yield servers
    finally:
        for srv in servers:
            srv.stop()


class WatchProcess:
    """A running ``etcdctl watch``; its stdout lines arrive in a queue."""

    def __init__(self, server: ServerProcess, args: list[str], stdin: str | None = None) -> None:
        binary = find_etcdctl()
        assert binary is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
        env["ETCDCTL_API"] = "3"
        self.proc = subprocess.Popen([binary, f"--endpoints={server.endpoint}", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.flush()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read_until(self, marker: str, timeout: float = 20.0) -> str:
        out = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                break
            out.append(line)
            if marker in line if not marker.endswith("\n") else line == marker:
                break
        return "".join(out)

    def stop(self) -> tuple[int, str]:
        """Stop etcdctl; returns its exit code and stderr."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            _, err = self.proc.communicate()
        return self.proc.returncode, err


FORMS = {
    "key": ["watch", "foo1", "--rev=2"],
    "range": ["watch", "foo1", "foo9", "--rev=2"],
    "prefix": ["watch", "--prefix", "foo", "--rev=2"],
    "prev-kv": ["watch", "foo1", "--prev-kv", "--rev=2"],
    "json": ["watch", "foo1", "--rev=2", "-w", "json"],
    "from-key-all": ["watch", "--prefix", "", "--rev=2"],
    "exec": ["watch", "foo", "--prefix", "--rev=2", "--", "sh", "-c",
             'echo "exec: $ETCD_WATCH_EVENT_TYPE $ETCD_WATCH_KEY $ETCD_WATCH_VALUE rev=$ETCD_WATCH_REVISION"'],
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_watch_forms_match_etcd(pair: tuple[ServerProcess, ...], form: str) -> None:
    outputs = []
    for srv in pair:
        w = WatchProcess(srv, FORMS[form])
        marker = {"exec": f'{SENTINEL}" rev=',  # etcdctl quotes the variables' values
                  "json": base64.b64encode(SENTINEL.encode()).decode()}.get(form, SENTINEL)
        out = w.read_until(marker)
        w.stop()
        assert marker in out, f"{srv.kind}: {out!r}"
        outputs.append(normalize(out, srv))
    assert outputs[1] == outputs[0]


def test_interactive_watch_matches_etcd(pair: tuple[ServerProcess, ...]) -> None:
    outputs = []
    for srv in pair:
        w = WatchProcess(srv, ["watch", "-i"], stdin="watch foo --prefix --rev=2\n")
        out = w.read_until(SENTINEL)
        w.stop()
        outputs.append(normalize(out, srv))
    assert outputs[1] == outputs[0]
    assert SENTINEL in outputs[0]


def test_compacted_rev_matches_etcd(tmp_path: Path, etcd_binary: str) -> None:
    servers = (EtcdProcess(tmp_path / "etcd", binary=etcd_binary), CoordServerProcess(tmp_path / "coord"))
    start_all(servers)
    try:
        results = []
        for srv in servers:
            for i in range(5):
                etcdctl(srv.endpoint, "put", "k", str(i)).check()
            etcdctl(srv.endpoint, "compaction", "5").check()
            w = WatchProcess(srv, ["watch", "k", "--rev=2"])
            rc = w.proc.wait(timeout=20)
            _, err = w.stop()
            assert w.proc.stdout is not None
            results.append((rc, normalize(err, srv)))
        assert results[1] == results[0]
        assert "required revision has been compacted" in results[0][1]
    finally:
        for srv in servers:
            srv.stop()


def test_live_watch_without_rev(pair: tuple[ServerProcess, ...]) -> None:
    """The plain form: events from now on. The sentinel is re-written until the watch shows it."""
    outputs = []
    for srv in pair:
        w = WatchProcess(srv, ["watch", "live-key"])
        for attempt in range(100):
            etcdctl(srv.endpoint, "put", "live-key", f"ping{attempt}").check()
            try:
                first = w.lines.get(timeout=0.2)
                break
            except queue.Empty:
                continue
        else:
            pytest.fail(f"{srv.kind}: the live watch never reported an event")
        assert first == "PUT\n"
        w.read_until(f"ping{attempt}\n")  # that event and any earlier ping
        etcdctl(srv.endpoint, "put", "live-key", "after").check()
        etcdctl(srv.endpoint, "del", "live-key").check()
        etcdctl(srv.endpoint, "put", "live-key", SENTINEL).check()
        outputs.append(w.read_until(SENTINEL))
        w.stop()
    assert outputs[1] == outputs[0], outputs
    assert outputs[0] == f"PUT\nlive-key\nafter\nDELETE\nlive-key\n\nPUT\nlive-key\n{SENTINEL}\n"
