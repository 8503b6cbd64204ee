"""HTTP client libraries from the package index against the JSON gateway: etcd3gw's public API and
OpenStack tooz's etcd3gw driver, run against real etcd 3.4.23 and coord-server alike (``server`` fixture).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from helpers import ServerProcess

etcd3gw = pytest.importorskip("etcd3gw")
coordination = pytest.importorskip("tooz.coordination")

TIMEOUT = 10.0


def client(server: ServerProcess) -> Any:
    return etcd3gw.client(host="127.0.0.1", port=server.client_port, timeout=TIMEOUT)


def _gauge(server: ServerProcess, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{server.client_url}/metrics", timeout=TIMEOUT) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_etcd3gw_kv_prefix_and_txn(server: ServerProcess) -> None:
    c = client(server)
    assert c.api_path == "/v3/"  # chosen from /version: etcdserver 3.4.x
    assert c.put("k1", "v1") is True
    assert c.get("k1") == [b"v1"]
    meta = c.get("k1", metadata=True)
    assert meta[0][0] == b"v1" and meta[0][1]["key"] == b"k1" and int(meta[0][1]["version"]) == 1
    assert c.get("missing") == []
    assert c.create("k2", "v2") is True
    assert c.create("k2", "again") is False
    for i in range(3):
        c.put(f"pfx/{i}", f"{i}")
    assert sorted(v for v, _ in c.get_prefix("pfx/")) == [b"0", b"1", b"2"]
    assert c.replace("k1", "v1", "v1b") is True
    assert c.replace("k1", "wrong", "x") is False
    assert c.get("k1") == [b"v1b"]
    assert c.delete("k1") is True
    assert c.delete("k1") is False
    assert c.delete_prefix("pfx/") is True
    assert c.get_prefix("pfx/") == []
    status = c.status()
    assert status["version"] == "3.4.23"
    members = c.members()
    assert len(members) == 1 and members[0]["name"] == server.name


def test_etcd3gw_lease_refresh_and_keys(server: ServerProcess) -> None:
    c = client(server)
    lease = c.lease(ttl=30)
    assert 0 < lease.ttl() <= 30
    assert c.put("lk", "v", lease=lease) is True
    assert lease.keys() == [b"lk"]
    assert lease.refresh() == 30
    assert lease.revoke() is True
    assert c.get("lk") == []


def test_etcd3gw_lock(server: ServerProcess) -> None:
    c = client(server)
    first = c.lock("job", ttl=30)
    second = c.lock("job", ttl=30)
    assert first.acquire() is True
    assert first.is_acquired()
    assert second.acquire() is False  # etcd3gw's lock is a lease plus a txn: no waiting
    assert first.refresh() == 30
    assert first.release() is True
    assert second.acquire() is True
    assert second.release() is True
    with c.lock("ctx", ttl=30) as lock:
        assert lock.is_acquired()


def test_etcd3gw_watch_and_cancel_frees_the_stream(server: ServerProcess) -> None:
    c = client(server)
    events, cancel = c.watch("wk")
    got: list[Any] = []

    def reader() -> None:
        for event in events:
            got.append(event)
            if len(got) == 2:
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    deadline = time.monotonic() + TIMEOUT
    while _gauge(server, "etcd_debugging_mvcc_watch_stream_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    c.put("wk", "1")
    c.delete("wk")
    t.join(TIMEOUT)
    assert not t.is_alive()
    # PUT is the enum default, so it is left out of the JSON; etcd3gw hands the event on as it is.
    assert [(e.get("type", "PUT"), e["kv"]["key"]) for e in got] == [("PUT", b"wk"), ("DELETE", b"wk")]
    cancel()
    # The server notices the client going away and drops the watch stream.
    while _gauge(server, "etcd_debugging_mvcc_watch_stream_total") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gauge(server, "etcd_debugging_mvcc_watch_stream_total") == 0


def test_tooz_etcd3gw_locks_and_heartbeat(server: ServerProcess) -> None:
    url = f"etcd3+http://127.0.0.1:{server.client_port}?timeout=10"
    a = coordination.get_coordinator(url, b"member-a")
    b = coordination.get_coordinator(url, b"member-b")
    a.start()
    b.start()
    try:
        assert a.heartbeat() > 0
        lock_a = a.get_lock(b"resource")
        lock_b = b.get_lock(b"resource")
        assert lock_a.acquire(blocking=False) is True
        assert lock_b.acquire(blocking=False) is False
        assert a.heartbeat() > 0  # refreshes the leases of the locks it holds
        assert lock_a.release() is True
        assert lock_b.acquire(blocking=2) is True
        assert lock_b.release() is True
        with a.get_lock(b"other"):
            assert b.get_lock(b"other").acquire(blocking=False) is False
    finally:
        a.stop()
        b.stop()
