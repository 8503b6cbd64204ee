"""The client port: gRPC (our HTTP/2 path behind a preface sniffer) and HTTP/1.1 (h11) on one listener.

Every test runs on the plain asyncio loop and on uvloop, with a deadline, on 127.0.0.1 port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import grpc
import h2.config
import h2.connection
import h2.events
import h11
import pytest
from google.protobuf import wrappers_pb2
from helpers.aio import aio_channel
from helpers.transport_kit import ASYNCIO_LOOPS, RawClient, grpc_frame, listening

from coord._pb import rpc_pb2
from coord_server.errors import Code, EtcdError, message_too_large
from coord_server.http import HttpRequest, HttpResponse
from coord_server.rpc import CallContext, Kind, Method
from coord_server.transport import (
    HEALTH_CHECK_PATH,
    HTTP2_PREFACE,
    ClientListener,
    HealthCheckRequest,
    HealthCheckResponse,
)

pytestmark = pytest.mark.anyio

S = wrappers_pb2.StringValue


@pytest.fixture(params=ASYNCIO_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def deadline(seconds: float) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., Awaitable[None]]]:
    """Fail the test (instead of hanging) if it runs longer than ``seconds``."""

    def decorate(fn: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> None:
            with anyio.fail_after(seconds):
                await fn(*args, **kwargs)

        return wrapper

    return decorate


# -- services used by the tests ---------------------------------------------------------------------


class Calls:
    """What the services saw, shared with the test."""

    def __init__(self) -> None:
        self.contexts: list[CallContext] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.done: list[tuple[str, Kind, Code]] = []

    def on_rpc_done(self, path: str, kind: Kind, code: Code) -> None:
        self.done.append((path, kind, code))


def methods(calls: Calls) -> list[Method]:
    async def echo(req: Any, ctx: CallContext) -> Any:
        calls.contexts.append(ctx)
        return S(value=req.value.upper())

    async def raw(req: Any, ctx: CallContext) -> Any:
        return S(value="pre-serialized").SerializeToString()

    async def fail(req: Any, ctx: CallContext) -> Any:
        raise EtcdError(Code(int(req.value.split("|", 1)[0])), req.value.split("|", 1)[1])

    async def crash(req: Any, ctx: CallContext) -> Any:
        raise RuntimeError("kaboom: (details) here")

    async def hang(req: Any, ctx: CallContext) -> Any:
        calls.contexts.append(ctx)
        calls.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            calls.cancelled.set()
            raise
        return S()

    async def stray_cancel(req: Any, ctx: CallContext) -> Any:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.cancel()
        await fut  # CancelledError, though nobody cancelled this call
        return S()

    async def slow(req: Any, ctx: CallContext) -> Any:
        await asyncio.sleep(float(req.value))
        return S(value="slow done")

    async def count(req: Any, ctx: CallContext) -> AsyncIterator[Any]:
        for i in range(int(req.value)):
            yield S(value=str(i))

    async def endless(req: Any, ctx: CallContext) -> AsyncIterator[Any]:
        calls.started.set()
        i = 0
        try:
            while True:  # never awaits by itself: only the transport's yield lets others run
                i += 1
                yield S(value=str(i))
        finally:
            calls.cancelled.set()

    async def one_then_hang(req: Any, ctx: CallContext) -> AsyncIterator[Any]:
        yield S(value="first")
        calls.started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            calls.cancelled.set()
        yield S(value="never")

    async def chat(requests: AsyncIterator[Any], ctx: CallContext) -> AsyncIterator[Any]:
        # Speaks first, before the client has sent anything, then echoes until the client closes.
        yield S(value="hello")
        async for req in requests:
            yield S(value=f"echo:{req.value}")
        yield S(value="bye")

    return [
        Method("/test.Svc/Echo", Kind.UNARY, S, S, echo),
        Method("/test.Svc/Raw", Kind.UNARY, S, S, raw),
        Method("/test.Svc/Fail", Kind.UNARY, S, S, fail),
        Method("/test.Svc/Crash", Kind.UNARY, S, S, crash),
        Method("/test.Svc/Hang", Kind.UNARY, S, S, hang),
        Method("/test.Svc/Slow", Kind.UNARY, S, S, slow),
        Method("/test.Svc/StrayCancel", Kind.UNARY, S, S, stray_cancel),
        Method("/test.Svc/Count", Kind.SERVER_STREAM, S, S, count),
        Method("/test.Svc/Endless", Kind.SERVER_STREAM, S, S, endless),
        Method("/test.Svc/OneThenHang", Kind.SERVER_STREAM, S, S, one_then_hang),
        Method("/test.Svc/Chat", Kind.BIDI_STREAM, S, S, chat),
    ]


async def http_app(request: HttpRequest) -> HttpResponse:
    if request.path == "/echo":
        return HttpResponse(200, [("Content-Type", "application/octet-stream")], await request.body())
    if request.path == "/stream":

        async def lines() -> AsyncIterator[bytes]:
            for i in range(3):
                yield b'{"result":%d}\n' % i
                await asyncio.sleep(0.01)

        return HttpResponse(200, [("Content-Type", "application/json")], lines())
    if request.path == "/boom":
        raise RuntimeError("app bug")
    from coord_server.http import DefaultHttpApp

    return await DefaultHttpApp().handle(request)


@contextlib.asynccontextmanager
async def running(calls: Calls | None = None, **kwargs: Any) -> AsyncIterator[tuple[ClientListener, int, Calls]]:
    calls = calls or Calls()
    async with listening(methods(calls), on_rpc_done=calls.on_rpc_done, **kwargs) as (listener, port):
        yield listener, port, calls


def channel(port: int) -> contextlib.AbstractAsyncContextManager[grpc.aio.Channel]:
    return aio_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])


def unary(ch: grpc.aio.Channel, name: str) -> Any:
    return ch.unary_unary(
        f"/test.Svc/{name}", request_serializer=S.SerializeToString, response_deserializer=S.FromString
    )


def stream(ch: grpc.aio.Channel, name: str) -> Any:
    return ch.unary_stream(
        f"/test.Svc/{name}", request_serializer=S.SerializeToString, response_deserializer=S.FromString
    )


async def rpc_error(awaitable: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


def other_tasks(baseline: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Tasks still pending that were not there at ``baseline`` (the test runner has its own)."""
    return {t for t in asyncio.all_tasks() - baseline if t is not asyncio.current_task() and not t.done()}


# -- gRPC --------------------------------------------------------------------------------------------


@deadline(10)
async def test_unary_echo_and_call_context() -> None:
    async with running() as (_, port, calls), channel(port) as ch:
        reply = await unary(ch, "Echo")(S(value="hi"), metadata=[("token", "Tok"), ("x-a", "1")], timeout=5)
        assert reply.value == "HI"
        reply = await unary(ch, "Echo")(S(value="again"))
        assert reply.value == "AGAIN"
        assert (await unary(ch, "Raw")(S())).value == "pre-serialized"  # bytes pass through as-is

    first, second = calls.contexts
    assert first.metadata["token"] == "Tok" and first.metadata["x-a"] == "1"
    assert first.peer.startswith("127.0.0.1:")
    assert first.deadline is not None and 3 < first.deadline - time.monotonic() < 5.5
    assert second.deadline is None and "token" not in second.metadata
    assert ("/test.Svc/Echo", Kind.UNARY, Code.OK) in calls.done


@deadline(10)
async def test_etcd_error_code_and_message_arrive_exactly() -> None:
    cases = [
        (Code.INVALID_ARGUMENT, "etcdserver: key is not provided"),
        (Code.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted"),
        (Code.RESOURCE_EXHAUSTED, "grpc: received message larger than max (2150410 vs. 2097152)"),
        (Code.UNKNOWN, 'weird: 100% (sure) ü\t"x" %41'),
    ]
    async with running() as (_, port, calls), channel(port) as ch:
        for code, message in cases:
            err = await rpc_error(unary(ch, "Fail")(S(value=f"{int(code)}|{message}")))
            assert err.code().value[0] == int(code)
            assert err.details() == message
    assert ("/test.Svc/Fail", Kind.UNARY, Code.OUT_OF_RANGE) in calls.done


@deadline(10)
async def test_unexpected_exception_is_unknown_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async with running() as (_, port, calls), channel(port) as ch:
        err = await rpc_error(unary(ch, "Crash")(S()))
        assert err.code() == grpc.StatusCode.UNKNOWN
        assert err.details() == "kaboom: (details) here"
        assert (await unary(ch, "Echo")(S(value="still up"))).value == "STILL UP"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert ("/test.Svc/Crash", Kind.UNARY, Code.UNKNOWN) in calls.done


@deadline(10)
async def test_stray_cancelled_error_is_answered(caplog: pytest.LogCaptureFixture) -> None:
    async with running() as (_, port, calls), channel(port) as ch:
        err = await rpc_error(unary(ch, "StrayCancel")(S(), timeout=5))
        assert err.code() == grpc.StatusCode.CANCELLED
        assert (await unary(ch, "Echo")(S(value="up"))).value == "UP"
    assert ("/test.Svc/StrayCancel", Kind.UNARY, Code.CANCELLED) in calls.done
    assert [r.levelno for r in caplog.records if r.name == "coord_server.transport"] == [logging.WARNING]


@deadline(10)
async def test_oversized_message_is_refused_and_server_stays_up() -> None:
    async with running() as (listener, port, calls), channel(port) as ch:
        assert listener.max_recv_bytes == 2_097_152
        big = S(value="x" * 2_150_000)
        err = await rpc_error(unary(ch, "Echo")(big))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details() == message_too_large(big.ByteSize(), 2_097_152).message
        assert err.details() == f"grpc: received message larger than max ({big.ByteSize()} vs. 2097152)"
        assert (await unary(ch, "Echo")(S(value="next"))).value == "NEXT"
    assert ("/test.Svc/Echo", Kind.UNARY, Code.RESOURCE_EXHAUSTED) in calls.done


@deadline(10)
async def test_receive_limit_is_inclusive() -> None:
    async with running(max_recv_bytes=1000) as (_, port, _calls), channel(port) as ch:
        at_limit = S(value="y" * 997)  # 3 bytes of tag + length
        assert at_limit.ByteSize() == 1000
        assert (await unary(ch, "Echo")(at_limit)).value == "Y" * 997
        err = await rpc_error(unary(ch, "Echo")(S(value="y" * 998)))
        assert err.details() == "grpc: received message larger than max (1001 vs. 1000)"


@deadline(10)
async def test_unparseable_request_is_internal() -> None:
    async with running() as (_, port, _calls), channel(port) as ch:
        bad = ch.unary_unary("/test.Svc/Echo", request_serializer=lambda b: b, response_deserializer=S.FromString)
        err = await rpc_error(bad(b"\x0a\x05ab"))  # field 1, length 5, only 2 bytes
        assert err.code() == grpc.StatusCode.INTERNAL
        assert err.details().startswith("grpc: error unmarshalling request: ")


@deadline(10)
async def test_unknown_service_and_method() -> None:
    async with running() as (_, port, _calls), channel(port) as ch:
        err = await rpc_error(unary(ch, "Nope")(S()))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert err.details() == "unknown method Nope for service test.Svc"
        reflection = ch.unary_unary("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        err = await rpc_error(reflection(b""))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert err.details() == "unknown service grpc.reflection.v1alpha.ServerReflection"
        err = await rpc_error(ch.unary_unary("/grpc.health.v1.Health/Watch")(b""))
        assert err.details() == "unknown method Watch for service grpc.health.v1.Health"


@deadline(10)
async def test_health_check() -> None:
    async with running() as (listener, port, calls), channel(port) as ch:
        check = ch.unary_unary(
            HEALTH_CHECK_PATH,
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        reply = await check(HealthCheckRequest(service=""))
        assert reply.status == 1  # SERVING
        assert reply.SerializeToString() == b"\x08\x01"
        err = await rpc_error(check(HealthCheckRequest(service="etcdserverpb.KV")))
        assert err.code() == grpc.StatusCode.NOT_FOUND and err.details() == "unknown service"
        listener.set_serving_status("", 2)
        assert (await check(HealthCheckRequest())).status == 2
    assert (HEALTH_CHECK_PATH, Kind.UNARY, Code.OK) in calls.done


@deadline(10)
async def test_server_stream() -> None:
    async with running() as (_, port, calls), channel(port) as ch:
        got = [r.value async for r in stream(ch, "Count")(S(value="50"))]
        assert got == [str(i) for i in range(50)]
        assert [r async for r in stream(ch, "Count")(S(value="0"))] == []
    assert ("/test.Svc/Count", Kind.SERVER_STREAM, Code.OK) in calls.done


@deadline(10)
async def test_bidi_server_speaks_before_client_finishes() -> None:
    async with running() as (_, port, calls), channel(port) as ch:
        call = ch.stream_stream(
            "/test.Svc/Chat", request_serializer=S.SerializeToString, response_deserializer=S.FromString
        )()
        assert (await call.read()).value == "hello"  # nothing sent yet
        for word in ("a", "b", "c"):
            await call.write(S(value=word))
            assert (await call.read()).value == f"echo:{word}"
        await call.done_writing()
        assert (await call.read()).value == "bye"
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert ("/test.Svc/Chat", Kind.BIDI_STREAM, Code.OK) in calls.done


@deadline(10)
async def test_oversized_message_on_a_bidi_stream() -> None:
    async with running(max_recv_bytes=100) as (_, port, calls), channel(port) as ch:
        call = ch.stream_stream(
            "/test.Svc/Chat", request_serializer=S.SerializeToString, response_deserializer=S.FromString
        )()
        assert (await call.read()).value == "hello"
        await call.write(S(value="ok"))
        assert (await call.read()).value == "echo:ok"
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(S(value="z" * 200))
        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await call.details() == "grpc: received message larger than max (203 vs. 100)"
    assert ("/test.Svc/Chat", Kind.BIDI_STREAM, Code.RESOURCE_EXHAUSTED) in calls.done


@deadline(10)
async def test_client_cancel_cancels_the_handler(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    baseline = asyncio.all_tasks()
    async with running() as (_, port, calls), channel(port) as ch:
        call = unary(ch, "Hang")(S())
        await calls.started.wait()
        call.cancel()
        await calls.cancelled.wait()
        with pytest.raises(asyncio.CancelledError):
            await call
        # and a server stream
        calls.started.clear()
        calls.cancelled.clear()
        scall = stream(ch, "OneThenHang")(S())
        assert (await scall.read()).value == "first"
        await calls.started.wait()
        scall.cancel()
        await calls.cancelled.wait()
        assert (await unary(ch, "Echo")(S(value="x"))).value == "X"
        for _ in range(100):  # the handler tasks finish right after the cancellation
            if len(calls.done) >= 3:
                break
            await asyncio.sleep(0.01)
    assert ("/test.Svc/Hang", Kind.UNARY, Code.CANCELLED) in calls.done
    assert ("/test.Svc/OneThenHang", Kind.SERVER_STREAM, Code.CANCELLED) in calls.done
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    assert not other_tasks(baseline)


@deadline(10)
async def test_deadline_cancels_the_handler() -> None:
    # grpc's client resets the stream at its own deadline, which comes first (it started the clock earlier),
    # so whether the server's timer or that reset ends the handler is a race: both must cancel it.
    async with running() as (_, port, calls), channel(port) as ch:
        err = await rpc_error(unary(ch, "Hang")(S(), timeout=0.3))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await calls.cancelled.wait()
        assert calls.contexts[0].deadline is not None
        for _ in range(100):
            if calls.done:
                break
            await asyncio.sleep(0.01)
    assert calls.done in (
        [("/test.Svc/Hang", Kind.UNARY, Code.DEADLINE_EXCEEDED)],
        [("/test.Svc/Hang", Kind.UNARY, Code.CANCELLED)],
    )


@deadline(10)
async def test_server_deadline_timer_ends_the_call_with_deadline_exceeded() -> None:
    # A client that never resets by itself (raw HTTP/2): the server's own timer must cancel the handler and
    # answer DEADLINE_EXCEEDED in the trailers.
    async with running() as (_, port, calls):
        client = await RawClient.connect(port)
        try:
            sid = client.call("/test.Svc/Hang", grpc_frame(b""), extra=[("grpc-timeout", "300m")])
            await client.until(lambda: client.ended(sid))
            trailers = client.trailers(sid)
        finally:
            await client.close()
        assert calls.cancelled.is_set()
    assert trailers[b"grpc-status"] == str(int(Code.DEADLINE_EXCEEDED)).encode()
    assert calls.done == [("/test.Svc/Hang", Kind.UNARY, Code.DEADLINE_EXCEEDED)]


@deadline(10)
async def test_busy_stream_does_not_starve_other_calls() -> None:
    async with running() as (_, port, calls), channel(port) as ch, channel(port) as ch2:
        scall = stream(ch, "Endless")(S())
        assert (await scall.read()).value == "1"
        started = time.monotonic()
        assert (await unary(ch2, "Echo")(S(value="quick"), timeout=3)).value == "QUICK"
        assert time.monotonic() - started < 2
        scall.cancel()
        await calls.cancelled.wait()


@deadline(10)
async def test_close_finishes_unary_calls_and_ends_streams() -> None:
    baseline = asyncio.all_tasks()
    calls = Calls()
    listener = ClientListener(methods(calls), on_rpc_done=calls.on_rpc_done)
    port = await listener.start("127.0.0.1", 0)
    async with channel(port) as ch:
        scall = stream(ch, "OneThenHang")(S())
        assert (await scall.read()).value == "first"
        slow = asyncio.ensure_future(unary(ch, "Slow")(S(value="0.3")))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await listener.close(grace=2.0)
        assert time.monotonic() - started < 1.5
        assert (await slow).value == "slow done"
        assert await scall.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert calls.cancelled.is_set()
    assert not other_tasks(baseline)
    # the port is closed
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# -- raw HTTP/2: partial preface, compressed flag, truncated message ---------------------------------


async def raw_h2_call(
    port: int, path: str, payload: bytes, *, trickle_preface: bool = False
) -> tuple[dict[str, str], bytes]:
    """One gRPC call with a hand-driven h2 client: (headers + trailers, response body bytes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    out = conn.data_to_send()
    assert out.startswith(HTTP2_PREFACE)
    if trickle_preface:  # the sniffer must buffer a preface that arrives a few bytes at a time
        for i in range(0, len(HTTP2_PREFACE), 5):
            writer.write(out[i : min(i + 5, len(HTTP2_PREFACE))])
            await writer.drain()
            await asyncio.sleep(0.01)
        out = out[len(HTTP2_PREFACE) :]
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    conn.send_data(sid, payload, end_stream=True)
    writer.write(out + conn.data_to_send())
    headers: dict[str, str] = {}
    body = b""
    try:
        while True:
            data = await reader.read(65536)
            assert data, "connection closed before the call ended"
            ended = False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers.update(dict(event.headers))  # type: ignore[arg-type]
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    ended = True
            writer.write(conn.data_to_send())
            if ended:
                return headers, body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@deadline(10)
async def test_preface_arriving_in_pieces() -> None:
    async with running() as (_, port, _calls):
        headers, body = await raw_h2_call(port, HEALTH_CHECK_PATH, grpc_frame(b""), trickle_preface=True)
        assert headers["grpc-status"] == "0"
        assert body == grpc_frame(b"\x08\x01")


@deadline(10)
async def test_compressed_and_truncated_messages_are_refused() -> None:
    async with running() as (_, port, _calls):
        headers, _ = await raw_h2_call(port, "/test.Svc/Echo", grpc_frame(b"\x0a\x01a", flag=1))
        assert headers["grpc-status"] == str(int(Code.UNIMPLEMENTED))
        assert "compressed" in headers["grpc-message"]
        headers, _ = await raw_h2_call(port, "/test.Svc/Echo", grpc_frame(b"\x0a\x01a")[:6])
        assert headers["grpc-status"] == str(int(Code.INTERNAL))
        assert "unexpected EOF" in headers["grpc-message"]
        headers, body = await raw_h2_call(port, "/test.Svc/Echo", grpc_frame(S(value="ok").SerializeToString()))
        assert headers["grpc-status"] == "0" and S.FromString(body[5:]).value == "OK"


# -- HTTP/1.1 ------------------------------------------------------------------------------------------


async def read_response(
    reader: asyncio.StreamReader, buffered: bytes = b"", method: str = "GET"
) -> tuple[int, dict[str, str], list[bytes], bytes]:
    """(status, headers, body chunks as received, bytes left over after this response)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    if buffered:
        conn.receive_data(buffered)  # (b"" would mean EOF to h11)
    status, headers, chunks = 0, {}, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, chunks, conn.trailing_data[0]
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("closed before the response ended")


VERSION = b'{"etcdserver":"3.4.23","etcdcluster":"3.4.0"}'


@deadline(10)
async def test_http_version_404_and_keepalive() -> None:
    async with running() as (_, port, _calls):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, chunks, rest = await read_response(reader)
        assert (status, headers["content-type"], b"".join(chunks)) == (200, "application/json", VERSION)
        writer.write(b"GET /v3alpha/kv/range HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection
        status, headers, chunks, rest = await read_response(reader, rest)
        assert status == 404 and b"".join(chunks) == b"404 page not found\n"
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert headers["access-control-allow-origin"] == "*"  # etcd: CORS headers on every reply
        # pipelined: three requests in one write, answered in order
        writer.write(
            b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /version HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, _, chunks, rest = await read_response(reader, rest)
        assert (status, b"".join(chunks)) == (200, VERSION)
        status, headers, _, rest = await read_response(reader, rest)
        assert status == 405 and headers["allow"] == "GET"
        status, _, _, rest = await read_response(reader, rest)
        assert status == 404
        assert rest + await reader.read() == b""  # closed after "Connection: close"
        writer.close()


@deadline(10)
async def test_http_app_body_streaming_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    async with running(http_app=http_app) as (_, port, _calls):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        status, _, chunks, rest = await read_response(reader)
        assert (status, b"".join(chunks)) == (200, b"hello")
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, chunks, rest = await read_response(reader, rest)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert b"".join(chunks) == b'{"result":0}\n{"result":1}\n{"result":2}\n'
        writer.write(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _, rest = await read_response(reader, rest)
        assert status == 500
        writer.write(b"HEAD /nothing HTTP/1.1\r\nHost: x\r\n\r\n")  # a HEAD reply has no body
        status, _, chunks, rest = await read_response(reader, rest, method="HEAD")
        assert status == 404 and chunks == []
        writer.write(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, chunks, rest = await read_response(reader, rest)
        assert (status, b"".join(chunks)) == (200, VERSION)
        writer.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == ["HTTP GET /boom failed"]


@deadline(10)
async def test_bad_request_gets_400_and_close() -> None:
    async with running() as (_, port, _calls):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\nthis is not http\r\n\r\n")
        status, _, _, rest = await read_response(reader)
        assert status == 200
        data = rest + await reader.read()
        assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n") and data.endswith(b"400 Bad Request")
        writer.close()


@deadline(10)
async def test_garbage_does_not_crash_the_server() -> None:
    async with running() as (_, port, _calls):
        garbage = [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS ClientHello
            b"\x00" * 100,
            HTTP2_PREFACE + b"\xff" * 64,  # HTTP/2 preface, then nonsense frames
            b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",  # almost a preface
        ]
        for junk in garbage:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(junk)
                with contextlib.suppress(ConnectionError):
                    reply = await asyncio.wait_for(reader.read(), 5)  # answered or not, then closed
                    assert reply == b"" or reply.startswith(b"HTTP/1.1 ")
            finally:
                writer.close()
        async with channel(port) as ch:
            assert (await unary(ch, "Echo")(S(value="alive"))).value == "ALIVE"


@deadline(10)
async def test_silent_connection_is_closed() -> None:
    async with running(idle_timeout=0.2) as (_, port, _calls):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        assert await reader.read() == b""
        assert 0.1 < time.monotonic() - started < 3
        writer.close()
        # a partial preface that never completes is closed as well
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HTTP2_PREFACE[:10])
        assert await reader.read() == b""
        writer.close()


# -- real etcdctl --------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("etcdctl") is None, reason="etcdctl not installed")
@deadline(14)
async def test_etcdctl_interop() -> None:
    async def range_ok(req: Any, ctx: CallContext) -> Any:
        assert ctx.metadata.get("client-api-version") == "3.4"
        return rpc_pb2.RangeResponse(header=rpc_pb2.ResponseHeader(revision=1))

    async def range_err(req: Any, ctx: CallContext) -> Any:
        raise EtcdError(Code.INVALID_ARGUMENT, "etcdserver: key is not provided")

    async def etcdctl(port: int, *args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            "etcdctl", f"--endpoints=127.0.0.1:{port}", "--command-timeout=3s", *args,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    async def serve(func: Callable[[Any, CallContext], Awaitable[Any]]) -> ClientListener:
        method = Method("/etcdserverpb.KV/Range", Kind.UNARY, rpc_pb2.RangeRequest, rpc_pb2.RangeResponse, func)
        listener = ClientListener([method])
        await listener.start("127.0.0.1", 0)
        return listener

    listener = await serve(range_ok)
    try:
        assert await etcdctl(listener.port, "get", "foo") == (0, "")
        rc, out = await etcdctl(listener.port, "endpoint", "health")
        assert rc == 0 and f"127.0.0.1:{listener.port} is healthy" in out
    finally:
        await listener.close()
    listener = await serve(range_err)
    try:
        rc, out = await etcdctl(listener.port, "get", "foo")
        assert rc == 1 and out.splitlines()[-1] == "Error: etcdserver: key is not provided"
    finally:
        await listener.close()
