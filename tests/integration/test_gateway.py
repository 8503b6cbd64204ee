"""The JSON gateway in-process: generic over Methods, unimplemented services, bidi streaming over one HTTP
request, robustness of the HTTP side next to gRPC on the same port, and the whole server's /health,
/metrics and gateway counters. (Byte-for-byte comparisons with etcd: tests/interop/test_http_gateway.py.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers.aio import aio_channel

from coord._pb import rpc_pb2, rpc_pb2_grpc
from coord_server.app import open_server
from coord_server.config import Config
from coord_server.errors import Code, EtcdError
from coord_server.gateway import Gateway
from coord_server.http import DefaultHttpApp, HttpRequest, HttpResponse
from coord_server.rpc import CallContext, Kind, Method
from coord_server.transport import ClientListener

pytestmark = pytest.mark.anyio



@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- a raw async HTTP/1.1 client ---------------------------------------------------------------------


class Http:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, port: int) -> AsyncIterator[Http]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            yield cls(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def request(self, method: str, path: str, body: bytes | None = b"", *, chunked: bool = False) -> None:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
        if chunked:
            head += "Transfer-Encoding: chunked\r\n"
        elif body is not None:
            head += f"Content-Length: {len(body)}\r\n"
        self.send(head.encode() + b"\r\n" + (b"" if chunked or body is None else body))

    def send_chunk(self, data: bytes) -> None:
        self.send(b"%x\r\n%s\r\n" % (len(data), data))

    async def head(self) -> tuple[int, dict[str, str]]:
        status = await self.reader.readuntil(b"\r\n")
        headers: dict[str, str] = {}
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        return int(status.split()[1]), headers

    async def chunk(self) -> bytes | None:
        size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await self.reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return None
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def reply(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = await self.head()
        if headers.get("transfer-encoding") == "chunked":
            parts = []
            while (c := await self.chunk()) is not None:
                parts.append(c)
            return status, headers, b"".join(parts)
        return status, headers, await self.reader.readexactly(int(headers.get("content-length", "0")))


async def call(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    async with Http.open(port) as h:
        h.request(method, path, body)
        return await h.reply()


# -- a listener serving test methods under etcd's gateway paths ------------------------------------------


class Seen:
    def __init__(self) -> None:
        self.done: list[tuple[str, Kind, Code]] = []
        self.contexts: list[CallContext] = []
        self.closed = asyncio.Event()


def gateway_methods(seen: Seen) -> list[Method]:
    async def grant(req: Any, ctx: CallContext) -> Any:
        seen.contexts.append(ctx)
        if req.TTL < 0:
            raise EtcdError(Code.OUT_OF_RANGE, "etcdserver: too large lease TTL")
        if req.TTL == 13:
            raise RuntimeError("boom <&>")
        return rpc_pb2.LeaseGrantResponse(ID=req.ID or 7, TTL=req.TTL)

    async def chat(requests: AsyncIterator[Any], ctx: CallContext) -> AsyncIterator[Any]:
        # A Watch stand-in: one reply per request, a failure on a request for key "fail"; like etcd's
        # watch it stays open after the requests end, until the call is cancelled.
        try:
            async for req in requests:
                key = req.create_request.key
                if key == b"fail":
                    raise EtcdError(Code.PERMISSION_DENIED, "etcdserver: permission denied")
                yield rpc_pb2.WatchResponse(watch_id=len(key), created=True)
            await asyncio.Event().wait()
        finally:
            seen.closed.set()

    async def silent_fail(requests: AsyncIterator[Any], ctx: CallContext) -> AsyncIterator[Any]:
        async for _ in requests:
            raise EtcdError(Code.UNAVAILABLE, "etcdserver: no leader")
        yield rpc_pb2.LeaseKeepAliveResponse()

    async def member_add(req: Any, ctx: CallContext) -> Any:
        return rpc_pb2.MemberAddResponse(members=[rpc_pb2.Member(ID=1, peerURLs=req.peerURLs)])

    return [
        Method("/etcdserverpb.Lease/LeaseGrant", Kind.UNARY, rpc_pb2.LeaseGrantRequest, rpc_pb2.LeaseGrantResponse,
               grant),
        Method("/etcdserverpb.Lease/LeaseKeepAlive", Kind.BIDI_STREAM, rpc_pb2.LeaseKeepAliveRequest,
               rpc_pb2.LeaseKeepAliveResponse, silent_fail),
        Method("/etcdserverpb.Watch/Watch", Kind.BIDI_STREAM, rpc_pb2.WatchRequest, rpc_pb2.WatchResponse, chat),
        Method("/etcdserverpb.Cluster/MemberAdd", Kind.UNARY, rpc_pb2.MemberAddRequest, rpc_pb2.MemberAddResponse,
               member_add),
    ]


@contextlib.asynccontextmanager
async def gateway_listener(seen: Seen, **kw: Any) -> AsyncIterator[tuple[ClientListener, int]]:
    methods = gateway_methods(seen)
    gateway = Gateway(methods, max_recv_bytes=1000, max_body_bytes=3000,
                      on_rpc_done=lambda p, k, c: seen.done.append((p, k, c)))
    fallback = DefaultHttpApp()

    async def app(request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/v3/"):
            return await gateway.handle(request, request.path[4:])
        return await fallback.handle(request)

    listener = ClientListener(methods, app, max_recv_bytes=1000, http_max_body_bytes=None, **kw)
    port = await listener.start("127.0.0.1", 0)
    try:
        yield listener, port
    finally:
        await listener.close(grace=1.0)


def _error(code: int, message: str) -> dict[str, Any]:
    return {"error": message, "message": message, "code": code}


async def test_unary_success_errors_and_unimplemented_methods() -> None:
    with anyio.fail_after(20):
        seen = Seen()
        async with gateway_listener(seen) as (_, port):
            status, headers, body = await call(port, "POST", "/v3/lease/grant", b'{"TTL":"5"}')
            assert (status, json.loads(body)) == (200, {"ID": "7", "TTL": "5"})
            assert headers["grpc-metadata-content-type"] == "application/grpc"
            status, headers, body = await call(port, "POST", "/v3/lease/grant", b'{"TTL":-1}')
            assert (status, json.loads(body)) == (400, _error(11, "etcdserver: too large lease TTL"))
            assert headers["trailer"] == "Grpc-Trailer-Content-Type"
            status, _, body = await call(port, "POST", "/v3/lease/grant", b'{"TTL":13}')
            assert (status, json.loads(body)) == (500, _error(2, "boom <&>"))
            assert b"\\u003c\\u0026\\u003e" in body  # Go's HTML-safe escaping
            # A registered service without this method, and a service not registered at all:
            # grpc-go's texts, 501, after the body was decoded (a bad body is still 400).
            status, _, body = await call(port, "POST", "/v3/lease/revoke", b'{"ID":1}')
            assert (status, json.loads(body)) == (501, _error(12, "unknown method LeaseRevoke for service "
                                                                  "etcdserverpb.Lease"))
            status, _, body = await call(port, "POST", "/v3/lock/lock", b"{}")
            assert (status, json.loads(body)) == (501, _error(12, "unknown service v3lockpb.Lock"))
            status, _, body = await call(port, "POST", "/v3/lock/lock", b'{"lease":"x"}')
            assert (status, json.loads(body)["code"]) == (400, 3)
            # Server streams answer the stream error object with the status of its code.
            status, headers, body = await call(port, "POST", "/v3/maintenance/snapshot", b"")
            assert status == 501
            assert json.loads(body) == {"error": {"grpc_code": 12, "http_code": 501, "message":
                                                  "unknown service etcdserverpb.Maintenance",
                                                  "http_status": "Not Implemented"}}
            status, _, body = await call(port, "POST", "/v3/election/observe", b"{")
            assert (status, json.loads(body)["code"]) == (400, 3)
            # Every call is counted like a gRPC call, unknown methods included.
            codes = [(p, c) for p, _, c in seen.done]
            assert ("/etcdserverpb.Lease/LeaseGrant", Code.OK) in codes
            assert ("/etcdserverpb.Lease/LeaseGrant", Code.OUT_OF_RANGE) in codes
            assert ("/v3lockpb.Lock/Lock", Code.UNIMPLEMENTED) in codes


async def test_metadata_reaches_the_service() -> None:
    with anyio.fail_after(20):
        seen = Seen()
        async with gateway_listener(seen) as (_, port), Http.open(port) as h:
            h.send(b"POST /v3/lease/grant HTTP/1.1\r\nHost: x\r\nAuthorization: tok.5\r\n"
                   b"Grpc-Metadata-Token: t2\r\nContent-Length: 2\r\n\r\n{}")
            status, _, _ = await h.reply()
            assert status == 200
            md = seen.contexts[-1].metadata
            assert md["authorization"] == "tok.5" and md["token"] == "t2"


async def test_bidi_stream_is_interactive_over_one_request() -> None:
    """Requests sent one by one in a chunked body are answered one by one while the body stays open."""
    with anyio.fail_after(20):
        seen = Seen()
        async with gateway_listener(seen) as (_, port), Http.open(port) as h:
            h.request("POST", "/v3/watch", chunked=True)
            h.send_chunk(b'{"create_request":{"key":"YQ=="}}')
            status, headers = await h.head()
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            assert json.loads((await h.chunk()) or b"") == {"result": {"watch_id": "1", "created": True}}
            # A message split across chunks, then two in one chunk.
            h.send_chunk(b'{"create_request":{"ke')
            await asyncio.sleep(0.05)
            h.send_chunk(b'y":"YWI="}}\n{"create_request":{"key":"YWJj"}}')
            assert json.loads((await h.chunk()) or b"")["result"]["watch_id"] == "2"
            assert json.loads((await h.chunk()) or b"")["result"]["watch_id"] == "3"
            # A failure after the first reply: the error object ends the body (no newline), status stays 200.
            h.send_chunk(json.dumps({"create_request": {"key": "ZmFpbA=="}}).encode())
            last = await h.chunk()
            assert last is not None and not last.endswith(b"\n")
            assert json.loads(last) == {"error": {"grpc_code": 7, "http_code": 403,
                                                  "message": "etcdserver: permission denied",
                                                  "http_status": "Forbidden"}}
            assert await h.chunk() is None
            await seen.closed.wait()
        assert ("/etcdserverpb.Watch/Watch", Kind.BIDI_STREAM, Code.PERMISSION_DENIED) in seen.done


async def test_bidi_error_before_first_reply_and_client_going_away() -> None:
    with anyio.fail_after(20):
        seen = Seen()
        async with gateway_listener(seen) as (_, port):
            status, headers, body = await call(port, "POST", "/v3/lease/keepalive", b'{"ID":1}')
            assert status == 503 and "grpc-metadata-content-type" not in headers
            assert json.loads(body)["error"]["message"] == "etcdserver: no leader"
            # The client disconnects in the middle of a stream: the service is closed, the call counted.
            async with Http.open(port) as h:
                h.request("POST", "/v3/watch", chunked=True)
                h.send_chunk(b'{"create_request":{"key":"YQ=="}}')
                await h.head()
                await h.chunk()
            await seen.closed.wait()
            for _ in range(100):
                if any(c is Code.CANCELLED for _, _, c in seen.done):
                    break
                await asyncio.sleep(0.01)
            assert ("/etcdserverpb.Watch/Watch", Kind.BIDI_STREAM, Code.CANCELLED) in seen.done


async def test_limits_malformed_http_and_idle_connections_leave_grpc_alone() -> None:
    with anyio.fail_after(30):
        seen = Seen()
        async with gateway_listener(seen, idle_timeout=0.5, http_keepalive_timeout=0.5) as (_, port):
            # A message over the receive limit (1000 here): grpc-go's error, 429, as etcd answers.
            ok = json.dumps({"peerURLs": ["u" * 900], "x": "y" * 900}).encode()  # unknown fields are dropped
            status, _, body = await call(port, "POST", "/v3/cluster/member/add", ok)
            assert status == 200
            big = json.dumps({"peerURLs": ["u" * 600, "v" * 600]}).encode()
            status, _, body = await call(port, "POST", "/v3/cluster/member/add", big)
            assert (status, json.loads(body)) == (
                429, _error(8, "grpc: received message larger than max (1206 vs. 1000)"))
            key = base64.b64encode(b"k" * 1195).decode()
            status, _, body = await call(port, "POST", "/v3/watch",
                                         json.dumps({"create_request": {"key": key}}).encode())
            assert status == 429
            assert json.loads(body)["error"]["message"] == "grpc: received message larger than max (1201 vs. 1000)"
            # A unary body over max_body_bytes: 413, the connection is closed.
            status, _, body = await call(port, "POST", "/v3/lease/grant", b" " * 4000)
            assert status == 413
            # A stream message that never ends is bounded too.
            async with Http.open(port) as h:
                h.request("POST", "/v3/watch", chunked=True)
                h.send_chunk(b'{"create_request":{"key":"' + b"A" * 4000)
                status, _ = await h.head()
                assert status == 500
            # Malformed HTTP: 400 and the connection closes.
            async with Http.open(port) as h:
                h.send(b"GARBAGE\r\n\r\n")
                status, _ = await h.head()
                assert status == 400
            # Idle and trickling connections are closed after the idle timeout...
            async with Http.open(port) as idle, Http.open(port) as trickle, aio_channel(f"127.0.0.1:{port}") as ch:
                trickle.send(b"POST /v3/lease/grant HTTP/1.1\r\n")
                # ... while gRPC on the same port is served meanwhile.
                grant = ch.unary_unary("/etcdserverpb.Lease/LeaseGrant",
                                       request_serializer=rpc_pb2.LeaseGrantRequest.SerializeToString,
                                       response_deserializer=rpc_pb2.LeaseGrantResponse.FromString)
                for i in range(20):
                    assert (await grant(rpc_pb2.LeaseGrantRequest(TTL=100 + i))).TTL == 100 + i
                assert await asyncio.wait_for(idle.reader.read(), 5) == b""
                assert await asyncio.wait_for(trickle.reader.read(), 5) == b""


# -- the whole server ------------------------------------------------------------------------------------


def _config(data_dir: Path, **kw: Any) -> Config:
    return Config(data_dir=data_dir, listen_client_urls=["http://127.0.0.1:0"],
                  advertise_client_urls=["http://127.0.0.1:2379"], **kw)


async def test_server_health_metrics_and_gateway_share_the_port(tmp_path: Path) -> None:
    with anyio.fail_after(30):
        async with open_server(_config(tmp_path)) as server:
            port = server.addresses[0][1]
            node = server.node
            status, _, body = await call(port, "POST", "/v3/kv/put", b'{"key":"YQ==","value":"MQ=="}')
            assert (status, json.loads(body)["header"]["revision"]) == (200, "2")
            async with aio_channel(f"127.0.0.1:{port}") as ch:
                resp = await rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"a"))
                assert resp.kvs[0].value == b"1"
            assert (await call(port, "GET", "/health"))[:3:2] == (200, b'{"health":"true"}')
            # An alarm makes /health fail unless it is excluded.
            node.alarms.add((node.member_id, rpc_pb2.NOSPACE))
            assert (await call(port, "GET", "/health"))[0] == 503
            assert (await call(port, "GET", "/health?exclude=NOSPACE"))[0] == 200
            node.alarms.clear()
            status, headers, body = await call(port, "GET", "/metrics")
            assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
            text = body.decode()
            assert "etcd_debugging_mvcc_current_revision 2.0" in text
            assert "etcd_server_health_success 2.0" in text and "etcd_server_health_failures 1.0" in text
            assert ('grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",'
                    'grpc_type="unary"} 1.0') in text
            assert ('grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",'
                    'grpc_type="unary"} 1.0') in text
            assert "coord_commit_batch_jobs_bucket" in text
            assert node.counters.health_success == 2


async def test_health_fails_when_the_write_path_is_stuck(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coord_server import metrics

    monkeypatch.setattr(metrics, "HEALTH_TIMEOUT", 0.2)
    with anyio.fail_after(30):
        async with open_server(_config(tmp_path)) as server:
            port = server.addresses[0][1]
            release = anyio.Event()

            async def blocked() -> None:
                await server.node.writer.exclusive(lambda: anyio.from_thread.run(release.wait))

            async with anyio.create_task_group() as tg:
                tg.start_soon(blocked)
                await anyio.sleep(0.05)
                status, _, body = await call(port, "GET", "/health")
                release.set()
            assert (status, body) == (503, b'{"health":"false"}\n')
            assert server.node.counters.health_failures == 1
            assert (await call(port, "GET", "/health"))[0] == 200
