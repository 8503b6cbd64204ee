"""The JSON gateway, /health, /version and /metrics: the same HTTP requests against real etcd 3.4.23 and
coord-server, statuses, headers and bodies compared after normalising only IDs, terms and sizes.

Requests are sent as raw HTTP/1.1 (one connection each, like curl), so that framing (Content-Length or
chunked), trailers and every header except ``Date`` are compared too. What is normalised (and nothing else):
the server's member and cluster IDs (by value), ``raft_term``/``raftTerm``, ``raftIndex``/``raftAppliedIndex``,
``dbSize``/``dbSizeInUse``, Maintenance/Hash's ``hash``, lease IDs the server picked (numbered in order of
appearance), the Content-Length value (bodies differ in length only where a normalised value does).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import ServerProcess, compare_transcripts, start_all

pytestmark = pytest.mark.etcd

TIMEOUT = 10.0


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


# ---------------------------------------------------------------------------------------------------
# a raw HTTP/1.1 client


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One HTTP/1.1 connection read incrementally (streams are read line by line)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("connection closed")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("connection closed")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def head(self) -> Reply:
        status_line = self._line().decode("latin-1")
        _, code, reason = status_line.split(" ", 2)
        headers = []
        while True:
            line = self._line().decode("latin-1")
            if not line:
                break
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
        reply = Reply(int(code), reason, headers, b"", False)
        reply.chunked = (reply.header("Transfer-Encoding") or "").lower() == "chunked"
        return reply

    def chunk(self) -> bytes | None:
        """The next chunk of a chunked body (None at its end, trailers consumed into ``self.trailers``)."""
        size = int(self._line().split(b";")[0], 16)
        if size == 0:
            self.trailers = []
            while True:
                line = self._line().decode("latin-1")
                if not line:
                    return None
                k, _, v = line.partition(":")
                self.trailers.append((k.strip(), v.strip()))
        data = self._exact(size)
        self._exact(2)
        return data

    def body(self, reply: Reply, method: str) -> Reply:
        if method == "HEAD" or reply.status in (204, 304):
            return reply
        if reply.chunked:
            parts = []
            while (c := self.chunk()) is not None:
                parts.append(c)
            reply.body = b"".join(parts)
            reply.trailers = self.trailers
        else:
            reply.body = self._exact(int(reply.header("Content-Length") or 0))
        return reply


def request_bytes(method: str, path: str, body: bytes | None = None,
                  headers: Sequence[tuple[str, str]] = ()) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: coord-tests\r\n"
    for k, v in headers:
        head += f"{k}: {v}\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def exchange(port: int, method: str, path: str, body: bytes | str | None = None,
             headers: Sequence[tuple[str, str]] = ()) -> Reply:
    """One request on a fresh connection (curl-like); the whole reply."""
    data = body.encode() if isinstance(body, str) else body
    conn = Conn(port)
    try:
        conn.send(request_bytes(method, path, data, headers))
        return conn.body(conn.head(), method)
    finally:
        conn.close()


def post(port: int, path: str, body: Any = None) -> Reply:
    data = body if isinstance(body, str | bytes) else json.dumps(body if body is not None else {})
    return exchange(port, "POST", path, data)


# ---------------------------------------------------------------------------------------------------
# normalisation


@dataclass
class Norm:
    """Server-specific values of one server, replaced by value."""

    member_id: int
    cluster_id: int
    port: int
    peer_port: int
    leases: dict[str, str] = field(default_factory=dict)

    def text(self, s: str) -> str:
        s = s.replace(str(self.member_id), "<MEMBER_ID>").replace(str(self.cluster_id), "<CLUSTER_ID>")
        s = s.replace(f"{self.member_id:x}", "<MEMBER_HEX>").replace(str(self.port), "<PORT>")
        s = s.replace(str(self.peer_port), "<PEER_PORT>")
        for key in ("raft_term", "raftTerm", "raftIndex", "raftAppliedIndex", "dbSize", "dbSizeInUse", "hash"):
            s = re.sub(rf'("{key}":)"?\d+"?', rf'\1"<{key.upper()}>"', s)

        def lease(m: re.Match[str]) -> str:
            value = m.group(2)
            if int(value) < 1 << 40:  # IDs the test chose itself are small: compared as they are
                return m.group(0)
            name = self.leases.setdefault(value, f"<LEASE{len(self.leases)}>")
            return f'{m.group(1)}"{name}"'

        return re.sub(r'("ID":)"(\d+)"', lease, s)


def render(reply: Reply, norm: Norm) -> str:
    headers = sorted(
        (k.lower(), v) for k, v in reply.headers if k.lower() not in ("date", "content-length")
    )
    framing = "chunked" if reply.chunked else "length"
    body = norm.text(reply.body.decode("utf-8", "backslashreplace"))
    lines = [f"{reply.status} {reply.reason} [{framing}]"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += [f"trailer {k}: {v}" for k, v in reply.trailers]
    lines.append(body)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# scenarios


@dataclass(frozen=True)
class Step:
    """One request of a scenario. ``body`` may be a callable of the server (for member IDs)."""

    method: str
    path: str
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()

    def title(self) -> str:
        body = self.body if not callable(self.body) else "<per server>"
        text = body if isinstance(body, str) else json.dumps(body)
        if isinstance(body, str | bytes) and len(body) > 200:
            text = f"<{len(body)} bytes>"
        return f"$ {self.method} {self.path} {text if self.body is not None else ''}"


def run(server: ServerProcess, steps: Sequence[Step | Callable[[ServerProcess], str]]) -> str:
    norm = Norm(server.member_id, server.cluster_id, server.client_port, server.peer_port)
    out = []
    for step in steps:
        if not isinstance(step, Step):
            out.append(f"# action\n{norm.text(step(server))}")
            continue
        body = step.body(server) if callable(step.body) else step.body
        if body is not None and not isinstance(body, str | bytes):
            body = json.dumps(body)
        try:
            reply = exchange(server.client_port, step.method, step.path, body, step.headers)
        except (TimeoutError, OSError) as exc:
            raise AssertionError(f"{server.kind}: no answer to {step.title()!r} ({exc!r})") from exc
        out.append(f"{step.title()}\n{render(reply, norm)}")
    return "\n\n".join(out) + "\n"


def differential(pair: tuple[ServerProcess, ServerProcess], steps: Sequence[Any]) -> str:
    etcd, coord = pair
    with ThreadPoolExecutor(2) as pool:
        f1 = pool.submit(run, etcd, steps)
        f2 = pool.submit(run, coord, steps)
        ref, cand = f1.result(), f2.result()
    compare_transcripts(ref, cand, "etcd", "coord")
    return ref


@pytest.fixture
def pair(server_factory: Any, etcd_binary: str) -> tuple[ServerProcess, ServerProcess]:
    servers = (server_factory("etcd"), server_factory("coord"))
    start_all(servers)
    return servers


def P(path: str, body: Any = None, *headers: tuple[str, str]) -> Step:
    return Step("POST", path, body if body is not None else {}, tuple(headers))


KV_STEPS = [
    Step("GET", "/version"),
    P("/v3/kv/put", {"key": b64("foo"), "value": b64("bar")}),
    P("/v3/kv/put", {"key": b64("foo"), "value": b64("baz"), "prev_kv": True}),
    P("/v3/kv/put", {"key": b64("fop"), "value": b64("1"), "prevKv": True}),
    P("/v3/kv/put", {"key": b64("ключ"), "value": b64("значение <&>")}),
    P("/v3/kv/range", {"key": b64("foo")}),
    P("/v3/kv/range", {"key": b64("f"), "range_end": b64("g")}),
    P("/v3/kv/range", {"key": b64("f"), "rangeEnd": b64("g"), "limit": 1}),
    P("/v3/kv/range", {"key": b64("f"), "range_end": b64("g"), "limit": "1", "sort_order": "DESCEND",
                       "sort_target": "MOD"}),
    P("/v3/kv/range", {"key": b64("f"), "range_end": b64("g"), "sortOrder": 2, "sortTarget": "VALUE"}),
    P("/v3/kv/range", {"key": b64("f"), "range_end": b64("g"), "keys_only": True}),
    P("/v3/kv/range", {"key": b64("f"), "range_end": b64("g"), "countOnly": True}),
    P("/v3/kv/range", {"key": b64("\0"), "range_end": b64("\0"), "revision": 2}),
    P("/v3/kv/range", {"key": b64("nothing")}),
    P("/v3/kv/range", {"key": b64("foo"), "keys_only": True, "keysOnly": False}),  # camelCase wins
    P("/v3/kv/range", {"key": b64("foo"), "bogus": [1, {"x": None}]}),  # unknown fields are ignored
    P("/v3/kv/range", {"key": b64("foo")}, ("Content-Type", "text/plain")),
    P("/v3beta/kv/range", {"key": b64("foo")}),
    P("/v3/kv/range", '{"key":"Zm9v"} trailing garbage is never read'),
    P("/v3/kv/range", '  \n{"key":"Zm9v","limit":null,"revision":"0","serializable":null}'),
    P("/v3/kv/range", '{"key":[102,111,111]}'),  # Go decodes a JSON array into []byte
    P("/v3/kv/deleterange", {"key": b64("fop"), "prev_kv": True}),
    P("/v3/kv/deleterange", {"key": b64("nothing")}),
    P("/v3/kv/txn", {
        "compare": [{"key": b64("foo"), "result": "EQUAL", "target": "VALUE", "value": b64("baz")}],
        "success": [{"request_put": {"key": b64("t1"), "value": b64("v")}},
                    {"requestRange": {"key": b64("t1")}},
                    {"request_delete_range": {"key": b64("nothing")}}],
        "failure": [{"request_range": {"key": b64("foo")}}],
    }),
    P("/v3/kv/txn", {
        "compare": [{"key": b64("foo"), "target": "VERSION", "result": "GREATER", "version": "10"}],
        "success": [{"request_put": {"key": b64("t2"), "value": b64("v")}}],
        "failure": [{"request_range": {"key": b64("foo")}},
                    {"request_txn": {"success": [{"request_range": {"key": b64("t1")}}]}}],
    }),
    P("/v3/kv/txn", {"compare": [{"key": b64("t1"), "target": "CREATE", "create_revision": 0}]}),
    P("/v3/kv/txn", {}),
    P("/v3/kv/compaction", {"revision": 3}),
    P("/v3/kv/range", {"key": b64("foo"), "revision": 2}),
    P("/v3/kv/range", {"key": b64("foo"), "revision": 1000}),
    P("/v3/kv/compaction", {"revision": "1000", "physical": True}),
]

ERROR_STEPS = [
    P("/v3/kv/range", {}),
    P("/v3/kv/range", ""),
    P("/v3/kv/range", "null"),
    P("/v3/kv/put", {"key": b64("k"), "value": b64("v"), "ignore_value": True}),
    P("/v3/kv/put", {"key": b64("k"), "lease": "12345"}),
    P("/v3/kv/range", {"key": b64("foo"), "sort_order": "BOGUS"}),
    P("/v3/kv/range", {"key": b64("foo"), "sort_order": "1"}),
    P("/v3/kv/range", {"key": b64("foo"), "sort_order": 1.5}),
    P("/v3/kv/range", {"key": b64("foo"), "sort_order": True}),
    P("/v3/kv/range", '{"key":'),
    P("/v3/kv/range", "{"),
    P("/v3/kv/range", '{"key":"Zm9v",}'),
    P("/v3/kv/range", '{"key" "Zm9v"}'),
    P("/v3/kv/range", '{"key":"Zm9v" "x":1}'),
    P("/v3/kv/range", "{'key':1}"),
    P("/v3/kv/range", '{"key":tru}'),
    P("/v3/kv/range", '{"key":nul}'),
    P("/v3/kv/range", '{"key":"Zm9v","limit":01}'),
    P("/v3/kv/range", '{"key":"Zm9v","limit":1.}'),
    P("/v3/kv/range", '{"key":"Zm9v","limit":1e}'),
    P("/v3/kv/range", '{"key":"Zm9v","limit":-}'),
    P("/v3/kv/range", '{"key":"\\x"}'),
    P("/v3/kv/range", '{"key":"\\u00zz"}'),
    P("/v3/kv/range", '{"key":"a\tb"}'),
    P("/v3/kv/range", '{"key":NaN}'),
    P("/v3/kv/range", '[1,2'),
    P("/v3/kv/range", '[1;2]'),
    P("/v3/kv/range", "[]"),
    P("/v3/kv/range", '"x"'),
    P("/v3/kv/range", "12"),
    P("/v3/kv/range", "true"),
    P("/v3/kv/range", "\x01"),
    P("/v3/kv/range", {"key": "Zm9"}),
    P("/v3/kv/range", {"key": "Zm9v_"}),
    P("/v3/kv/range", {"key": "Zg"}),
    P("/v3/kv/range", {"key": "Zg="}),
    P("/v3/kv/range", {"key": "Z==="}),
    P("/v3/kv/range", {"key": "Zm9v===="}),
    P("/v3/kv/range", {"key": "Zm9v\nYmFy"}),
    P("/v3/kv/range", {"key": "Zm-v"}),
    P("/v3/kv/range", {"key": 123}),
    P("/v3/kv/range", {"key": True}),
    P("/v3/kv/range", {"key": {"a": 1}}),
    P("/v3/kv/range", {"key": [256]}),
    P("/v3/kv/range", {"key": ["a"]}),
    P("/v3/kv/range", {"key": b64("foo"), "limit": "abc"}),
    P("/v3/kv/range", {"key": b64("foo"), "limit": "1.5"}),
    P("/v3/kv/range", {"key": b64("foo"), "limit": ""}),
    P("/v3/kv/range", {"key": b64("foo"), "limit": "1 2"}),
    P("/v3/kv/range", {"key": b64("foo"), "limit": "true"}),
    P("/v3/kv/range", {"key": b64("foo"), "limit": 1e2}),
    P("/v3/kv/range", {"key": b64("foo"), "limit": 99999999999999999999}),
    P("/v3/kv/range", {"key": b64("foo"), "limit": [1]}),
    P("/v3/kv/range", {"key": b64("foo"), "limit": {}}),
    P("/v3/kv/range", {"key": b64("foo"), "keys_only": "true"}),
    P("/v3/kv/range", {"key": b64("foo"), "keys_only": 1}),
    P("/v3/kv/txn", {"compare": {"key": b64("a")}}),
    P("/v3/kv/txn", {"compare": ["x"]}),
    P("/v3/kv/txn", {"success": [{"request_put": {"key": b64("a")}}, {"request_put": {"key": b64("a")}}]}),
    P("/v3/kv/txn", {"success": [{}]}),
    P("/v3/kv/txn", {"success": [{"request_put": {"key": b64(f"k{i}")}} for i in range(129)]}),
    P("/v3/maintenance/alarm", {"action": "BOGUS"}),
    P("/v3/maintenance/alarm", {"action": "GET", "memberID": "-1"}),
    P("/v3/cluster/member/remove", {"ID": "1"}),
    P("/v3/cluster/member/update", {"ID": 1, "peerURLs": ["http://x:1"]}),
    P("/v3/cluster/member/promote", {"ID": "1"}),
    P("/v3/maintenance/transfer-leadership", {"targetID": "1"}),
    P("/v3/kv/put", {"key": b64("big"), "value": b64(b"x" * 1_600_000)}),
    P("/v3/kv/put", {"key": b64("big"), "value": b64(b"x" * 2_200_000)}),
]

ROUTING_STEPS = [
    Step("GET", "/v3/kv/range"),
    Step("PUT", "/v3/kv/range", "{}"),
    Step("DELETE", "/v3/kv/range"),
    Step("HEAD", "/v3/kv/range"),
    Step("OPTIONS", "/v3/kv/range"),
    Step("OPTIONS", "/anything/at/all"),
    Step("POST", "/v3/nope", "{}"),
    Step("GET", "/v3/nope"),
    Step("POST", "/v3/kv/range/", "{}"),
    Step("POST", "/v3/kv/range:x", "{}"),
    Step("POST", "/v3alpha/kv/range", "{}"),
    Step("POST", "/v3", "{}"),
    Step("GET", "/v3"),
    Step("POST", "/v3//kv/range", "{}"),
    Step("GET", "/v3/./kv/../kv/range?x=1"),
    Step("POST", "/v3/kv/%72ange", json.dumps({"key": b64("foo")})),
    Step("POST", "/v3beta/maintenance/status", "{}"),
    Step("GET", "/"),
    Step("GET", "/v2/keys"),
    Step("GET", "/livez"),
    Step("GET", "/version/x"),
    Step("POST", "/version"),
    Step("HEAD", "/version"),
    Step("GET", "/health"),
    Step("POST", "/health"),
    Step("GET", "/health/"),
    Step("GET", "/health?exclude=NOSPACE"),
]


def test_kv_unary(pair: tuple[ServerProcess, ServerProcess]) -> None:
    differential(pair, KV_STEPS)


def test_errors_and_json_edge_cases(pair: tuple[ServerProcess, ServerProcess]) -> None:
    differential(pair, [P("/v3/kv/put", {"key": b64("foo"), "value": b64("bar")}), *ERROR_STEPS])


def test_routing_methods_cors_and_redirects(pair: tuple[ServerProcess, ServerProcess]) -> None:
    differential(pair, [P("/v3/kv/put", {"key": b64("foo"), "value": b64("bar")}), *ROUTING_STEPS])


def _alarm(action: str) -> Callable[[ServerProcess], dict[str, str]]:
    return lambda s: {"action": action, "memberID": str(s.member_id), "alarm": "NOSPACE"}


def test_maintenance_cluster_and_nospace_health(pair: tuple[ServerProcess, ServerProcess]) -> None:
    differential(pair, [
        P("/v3/kv/put", {"key": b64("a"), "value": b64("1")}),
        P("/v3/maintenance/status"),
        P("/v3/maintenance/alarm"),
        P("/v3/maintenance/alarm", {"action": "GET"}),
        P("/v3/maintenance/hash"),
        P("/v3/maintenance/defragment"),
        P("/v3/maintenance/transfer-leadership", lambda s: {"targetID": str(s.member_id)}),
        P("/v3/cluster/member/list"),
        P("/v3/cluster/member/list", {"linearizable": True}),
        Step("GET", "/health"),
        P("/v3/maintenance/alarm", _alarm("ACTIVATE")),
        Step("GET", "/health"),
        Step("GET", "/health?exclude=NOSPACE"),
        Step("GET", "/health?exclude=CORRUPT"),
        Step("GET", "/health?exclude=nospace"),
        Step("GET", "/health?exclude=CORRUPT&exclude=NOSPACE"),
        P("/v3/maintenance/status"),
        P("/v3/maintenance/alarm", {"action": "GET", "alarm": "NOSPACE"}),
        P("/v3/kv/put", {"key": b64("a"), "value": b64("2")}),
        P("/v3/kv/deleterange", {"key": b64("a")}),
        P("/v3/maintenance/alarm", _alarm("DEACTIVATE")),
        Step("GET", "/health"),
        P("/v3/kv/put", {"key": b64("a"), "value": b64("3")}),
    ])


LEASE_STEPS = [
    P("/v3/lease/grant", {"TTL": 100, "ID": 1000}),
    P("/v3/lease/grant", {"TTL": "60", "ID": "1000"}),
    P("/v3/lease/grant", {"TTL": 100}),
    P("/v3/lease/grant", {"TTL": 1, "ID": 2000}),
    P("/v3/kv/put", {"key": b64("lk"), "value": b64("v"), "lease": 1000}),
    P("/v3/lease/timetolive", {"ID": 1000, "keys": True}),
    P("/v3/kv/lease/timetolive", {"ID": 2000}),
    P("/v3/lease/timetolive", {"ID": 5}),
    P("/v3/lease/revoke", {"ID": 5}),
    P("/v3/kv/lease/revoke", {"ID": "2000"}),
    P("/v3/lease/grant", {"TTL": 9000000001}),
    P("/v3/lease/revoke", {"ID": 1000}),
    P("/v3/kv/range", {"key": b64("lk")}),
    P("/v3/lease/keepalive", {"ID": 5}),
    P("/v3/lease/keepalive", ""),
    P("/v3/lease/keepalive", '{"ID":"x"}'),
    P("/v3/lease/keepalive", "{"),
]


def test_lease_unary_and_keepalive(pair: tuple[ServerProcess, ServerProcess]) -> None:
    differential(pair, LEASE_STEPS)


def test_lease_keepalive_stream_and_leases(pair: tuple[ServerProcess, ServerProcess]) -> None:
    differential(pair, [
        P("/v3/lease/grant", {"TTL": 100, "ID": 7}),
        P("/v3/lease/keepalive", '{"ID":7}{"ID":"7"}\n{"ID":8}  {"ID":7}'),
        P("/v3/lease/keepalive", '{"ID":7} {"ID":"bad"} {"ID":7}'),  # a later bad message ends the requests
        P("/v3/kv/lease/leases"),
        P("/v3/lease/leases"),
    ])


# ---------------------------------------------------------------------------------------------------
# watch: a long-lived streaming response


def _watch_open(port: int, body: str) -> tuple[Conn, Reply]:
    conn = Conn(port)
    data = body.encode()
    conn.send(request_bytes("POST", "/v3/watch", data))
    return conn, conn.head()


def _lines(conn: Conn, n: int) -> list[str]:
    out = []
    for _ in range(n):
        chunk = conn.chunk()
        assert chunk is not None, "stream ended early"
        out.append(chunk.decode())
    return out


def _by_watcher(chunks: list[str]) -> list[str]:
    """Group stream chunks by watch_id, keeping each watcher's order: etcd orders a stream's responses
    per watcher only (different watchers' replies for one revision come in no fixed order)."""
    def wid(chunk: str) -> int:
        return int(json.loads(chunk).get("result", {}).get("watch_id", "0"))
    return sorted(chunks, key=wid)


def _watch_scenario(server: ServerProcess) -> str:
    norm = Norm(server.member_id, server.cluster_id, server.client_port, server.peer_port)
    port = server.client_port
    post(port, "/v3/kv/put", {"key": b64("w0"), "value": b64("old")})
    body = "".join(json.dumps(r) for r in [
        {"create_request": {"key": b64("w"), "range_end": b64("x"), "prev_kv": True}},
        {"create_request": {"key": b64("w0"), "start_revision": 2, "watch_id": 7}},
        {"create_request": {"key": b64("z"), "filters": ["NOPUT"]}},
    ])
    conn, head = _watch_open(port, body)
    try:
        out = [render(head, norm)]
        out += _by_watcher(_lines(conn, 4))  # 3 created (in request order per watcher), watcher 7's catch-up
        post(port, "/v3/kv/put", {"key": b64("w1"), "value": b64("a")})
        post(port, "/v3/kv/put", {"key": b64("w0"), "value": b64("new")})
        post(port, "/v3/kv/put", {"key": b64("z"), "value": b64("filtered")})
        post(port, "/v3/kv/deleterange", {"key": b64("z")})
        post(port, "/v3/kv/txn", {"success": [{"request_delete_range": {"key": b64("w0")}},
                                              {"request_put": {"key": b64("w2"), "value": b64("b")}}]})
        out += _by_watcher(_lines(conn, 6))
        return norm.text("\n".join(out))
    finally:
        conn.close()


def _watch_bad_and_empty(server: ServerProcess) -> str:
    norm = Norm(server.member_id, server.cluster_id, server.client_port, server.peer_port)
    port = server.client_port
    out = []
    # Created, then a bad second message: the stream stays open (only the sending side ends).
    conn, head = _watch_open(port, '{"create_request":{"key":"YQ=="}} {"create_request":"bad"}')
    try:
        out.append(render(head, norm))
        out += _lines(conn, 1)
        post(port, "/v3/kv/put", {"key": b64("a"), "value": b64("1")})
        out += _lines(conn, 1)
    finally:
        conn.close()
    # An empty body: no reply at all (Go sends the status line with the first message, and none comes).
    conn = Conn(port)
    try:
        conn.send(request_bytes("POST", "/v3/watch", b""))
        conn.sock.settimeout(0.5)
        try:
            conn.head()
            out.append("unexpected reply")
        except TimeoutError:
            out.append("(no reply)")
    finally:
        conn.close()
    # Range empty and duplicate watch ID replies, cancel of an unknown ID (no reply), progress.
    conn, head = _watch_open(port, json.dumps({"create_request": {"key": b64("b"), "range_end": b64("a")}})
                             + json.dumps({"create_request": {"key": b64("c"), "watch_id": 3}})
                             + json.dumps({"create_request": {"key": b64("d"), "watch_id": 3}})
                             + json.dumps({"cancel_request": {"watch_id": 3}})
                             + json.dumps({"cancel_request": {"watch_id": 99}})
                             + json.dumps({"progress_request": {}}))
    try:
        out.append(render(head, norm))
        out += _lines(conn, 5)
    finally:
        conn.close()
    return norm.text("\n".join(out))


def test_watch_stream(pair: tuple[ServerProcess, ServerProcess]) -> None:
    differential(pair, [_watch_scenario])


def test_watch_stream_edge_cases(pair: tuple[ServerProcess, ServerProcess]) -> None:
    differential(pair, [_watch_bad_and_empty])


# ---------------------------------------------------------------------------------------------------
# /metrics: the names etcd exposes that coord-server implements


METRIC_NAMES = [
    "etcd_server_has_leader",
    "etcd_server_is_leader",
    "etcd_server_id",
    "etcd_server_version",
    "etcd_cluster_version",
    "etcd_server_quota_backend_bytes",
    "etcd_server_proposals_committed_total",
    "etcd_server_proposals_applied_total",
    "etcd_server_proposals_pending",
    "etcd_server_proposals_failed_total",
    "etcd_server_health_success",
    "etcd_server_health_failures",
    "etcd_server_leader_changes_seen_total",
    "etcd_server_is_learner",
    "etcd_debugging_mvcc_current_revision",
    "etcd_debugging_mvcc_compact_revision",
    "etcd_debugging_mvcc_keys_total",
    "etcd_debugging_mvcc_watch_stream_total",
    "etcd_debugging_mvcc_watcher_total",
    "etcd_debugging_mvcc_pending_events_total",
    "etcd_debugging_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
    "etcd_debugging_lease_granted_total",
    "etcd_debugging_lease_revoked_total",
    "etcd_debugging_lease_renewed_total",
    "etcd_debugging_server_lease_expired_total",
    "grpc_server_handled_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
]


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_names_and_values(pair: tuple[ServerProcess, ServerProcess]) -> None:
    for server in pair:
        port = server.client_port
        post(port, "/v3/kv/put", {"key": b64("m1"), "value": b64("1")})
        post(port, "/v3/kv/put", {"key": b64("m2"), "value": b64("2")})
        post(port, "/v3/kv/range", {})  # InvalidArgument, counted
        exchange(port, "GET", "/health")
        reply = exchange(port, "GET", "/metrics")
        assert reply.status == 200
        assert reply.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
        samples = _samples(reply.body.decode())
        names = {n.partition("{")[0] for n in samples}
        missing = [n for n in METRIC_NAMES if n not in names]
        assert not missing, f"{server.kind}: missing {missing}"
        assert samples["etcd_server_has_leader"] == 1
        assert samples["etcd_debugging_mvcc_current_revision"] == 3
        assert samples["etcd_debugging_mvcc_keys_total"] == 2
        assert samples[f'etcd_server_id{{server_id="{server.member_id:x}"}}'] == 1
        assert samples['etcd_server_version{server_version="3.4.23"}'] == 1
        assert samples["etcd_server_health_success"] >= 1
        key = ('grpc_server_handled_total{grpc_code="InvalidArgument",grpc_method="Range",'
               'grpc_service="etcdserverpb.KV",grpc_type="unary"}')
        assert samples[key] >= 1, server.kind
        ok_put = ('grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",'
                  'grpc_type="unary"}')
        assert samples[ok_put] >= 2, server.kind
        watch = ('grpc_server_handled_total{grpc_code="OK",grpc_method="Watch",grpc_service="etcdserverpb.Watch",'
                 'grpc_type="bidi_stream"}')
        assert watch in samples, server.kind


def test_health_and_metrics_answer_while_grpc_load_runs(coord: ServerProcess) -> None:
    """No starvation: /health and /metrics keep answering (bounded, generous) under gRPC write load."""
    import grpc

    from coord._pb import rpc_pb2, rpc_pb2_grpc

    stop = time.monotonic() + 4.0
    done = 0

    def load() -> int:
        n = 0
        with grpc.insecure_channel(coord.endpoint) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            futures: list[Any] = []
            while time.monotonic() < stop:
                futures = [kv.Put.future(rpc_pb2.PutRequest(key=b"load%d" % i, value=b"x")) for i in range(32)]
                for f in futures:
                    f.result(timeout=TIMEOUT)
                n += len(futures)
        return n

    latencies = []
    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(load) for _ in range(2)]
        time.sleep(0.3)
        while time.monotonic() < stop - 0.3:
            for path in ("/health", "/metrics"):
                t0 = time.monotonic()
                reply = exchange(coord.client_port, "GET", path)
                latencies.append(time.monotonic() - t0)
                assert reply.status == 200, (path, reply.body[:200])
            time.sleep(0.05)
        done = sum(f.result() for f in loads)
    assert done > 0
    assert len(latencies) >= 4
    assert max(latencies) < 3.0, f"/health or /metrics took {max(latencies):.2f}s under load"


def iter_chunks(conn: Conn) -> Iterator[bytes]:
    while (c := conn.chunk()) is not None:
        yield c


# ---------------------------------------------------------------------------------------------------
# v3lock / v3election over HTTP (leases chosen by the test, so keys are the same on both servers)


def _observe(server: ServerProcess) -> str:
    norm = Norm(server.member_id, server.cluster_id, server.client_port, server.peer_port)
    port = server.client_port
    conn = Conn(port)
    try:
        conn.send(request_bytes("POST", "/v3/election/observe", json.dumps({"name": b64("e")}).encode()))
        out = [render(conn.head(), norm)]
        out += _lines(conn, 1)  # the current leader
        post(port, "/v3/election/proclaim", {"leader": {"name": b64("e"), "key": b64("e/bb8"),
                                                        "rev": "2", "lease": "3000"}, "value": b64("v2")})
        out += _lines(conn, 1)
        return norm.text("\n".join(out))
    finally:
        conn.close()


def test_lock_and_election(pair: tuple[ServerProcess, ServerProcess]) -> None:
    differential(pair, [
        P("/v3/lease/grant", {"TTL": 100, "ID": 3000}),
        P("/v3/election/campaign", {"name": b64("e"), "lease": 3000, "value": b64("v1")}),
        P("/v3/election/leader", {"name": b64("e")}),
        P("/v3/election/leader", {"name": b64("nobody")}),
        _observe,
        P("/v3/election/proclaim", {"leader": {"name": b64("e"), "key": b64("e/bb8"), "rev": "99",
                                               "lease": "3000"}, "value": b64("v3")}),
        P("/v3/election/proclaim", {"value": b64("v3")}),
        P("/v3/election/resign", {"leader": {"name": b64("e"), "key": b64("e/bb8"), "rev": "2", "lease": "3000"}}),
        P("/v3/election/leader", {"name": b64("e")}),
        P("/v3/lease/grant", {"TTL": 100, "ID": 4000}),
        P("/v3/lock/lock", {"name": b64("l"), "lease": 4000}),
        P("/v3/lock/lock", {"name": b64("l"), "lease": "4000"}),
        P("/v3/kv/range", {"key": b64("l/"), "range_end": b64("l0")}),
        P("/v3/lock/lock", {"name": b64("l"), "lease": 12345}),
        P("/v3/lock/unlock", {"key": b64("l/fa0")}),
        P("/v3/lock/unlock", {"key": b64("l/fa0")}),
        P("/v3/lock/unlock", {}),
        P("/v3/lock/lock", "{"),
    ])
