"""The HTTP/2 gRPC path of the client port under load and hostile input: flow control, limits, fuzzing.

Complements test_transport.py (the gRPC semantics): here raw HTTP/2 clients (h2's state machine
over asyncio streams) control windows and frames exactly. Counts decide, never timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import AsyncIterator
from typing import Any

import anyio
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from google.protobuf import wrappers_pb2
from helpers.aio import aio_channel
from helpers.transport_kit import ASYNCIO_LOOPS, RawClient, grpc_frame, listening

from coord_server.errors import Code
from coord_server.h2conn import ErrorCode, frame
from coord_server.rpc import CallContext, Kind, Method
from coord_server.transport import HEALTH_CHECK_PATH, HTTP2_PREFACE, ClientListener, HealthCheckResponse, _Binding

pytestmark = pytest.mark.anyio

S = wrappers_pb2.StringValue


@pytest.fixture(params=ASYNCIO_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


class Probe:
    """What the handlers did, for the test to count."""

    def __init__(self) -> None:
        self.produced = 0
        self.read = 0
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = 0
        self.done: list[tuple[str, Kind, Code]] = []


def methods(probe: Probe) -> list[Method]:
    async def firehose(req: Any, ctx: CallContext) -> AsyncIterator[Any]:
        try:
            while True:  # never suspends by itself: only the transport's flow control stops it
                probe.produced += 1
                yield S(value="x" * 100)
        finally:
            probe.cancelled += 1

    async def burst(req: Any, ctx: CallContext) -> AsyncIterator[Any]:
        for i in range(int(req.value)):
            yield S(value=str(i))

    async def lazy_reader(requests: AsyncIterator[Any], ctx: CallContext) -> AsyncIterator[Any]:
        probe.started.set()
        await probe.release.wait()
        async for _ in requests:
            probe.read += 1
        yield S(value=str(probe.read))

    async def echo(req: Any, ctx: CallContext) -> Any:
        return S(value=req.value)

    async def hang(req: Any, ctx: CallContext) -> Any:
        probe.started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            probe.cancelled += 1
        return S()

    async def meta(req: Any, ctx: CallContext) -> Any:
        return S(value=repr(sorted(ctx.metadata.items())))

    return [
        Method("/t.S/Firehose", Kind.SERVER_STREAM, S, S, firehose),
        Method("/t.S/Burst", Kind.SERVER_STREAM, S, S, burst),
        Method("/t.S/LazyReader", Kind.BIDI_STREAM, S, S, lazy_reader),
        Method("/t.S/Echo", Kind.UNARY, S, S, echo),
        Method("/t.S/Hang", Kind.UNARY, S, S, hang),
        Method("/t.S/Meta", Kind.UNARY, S, S, meta),
    ]


@contextlib.asynccontextmanager
async def running(**kwargs: Any) -> AsyncIterator[tuple[ClientListener, int, Probe]]:
    probe = Probe()
    async with listening(methods(probe), on_rpc_done=lambda *a: probe.done.append(a), **kwargs) as (listener, port):
        yield listener, port, probe


async def health_ok(port: int) -> bool:
    async with aio_channel(f"127.0.0.1:{port}") as ch:
        check = ch.unary_unary(HEALTH_CHECK_PATH, request_serializer=lambda b: b,
                               response_deserializer=HealthCheckResponse.FromString)
        return bool((await check(b"", timeout=5)).status == 1)


# -- flow control and backpressure -------------------------------------------------------------------


async def test_slow_reader_stops_the_response_iterator() -> None:
    with anyio.fail_after(15):
        async with running() as (_, port, probe):
            client = await RawClient.connect(port, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2000})
            sid = client.call("/t.S/Firehose", grpc_frame(b""))
            # Never acknowledge: the stream window (2,000 bytes = 18 messages of 107) runs out.
            await client.read_for(0.5, ack=False)
            stalled = probe.produced
            received = sum(len(e.data) for e in client.of(h2.events.DataReceived, sid))
            assert received <= 2000
            assert stalled <= received // 107 + 2  # at most one message beyond the window is pulled
            await client.read_for(0.3, ack=False)
            assert probe.produced == stalled  # paused, not spinning
            # Open the window: the handler resumes.
            client.conn.increment_flow_control_window(20_000, stream_id=sid)
            client.conn.increment_flow_control_window(20_000)
            await client.read_for(0.3, ack=False)
            assert probe.produced > stalled + 100
            client.conn.reset_stream(sid)
            await client.flush()
            await client.close()
            for _ in range(100):
                if probe.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert probe.cancelled == 1


async def test_bidi_reader_that_does_not_read_stops_the_client() -> None:
    with anyio.fail_after(15):
        async with running() as (_, port, probe):
            client = await RawClient.connect(port)
            sid = client.call("/t.S/LazyReader", None, end=False)
            await client.flush()
            await probe.started.wait()
            message = grpc_frame(S(value="m" * 50_000).SerializeToString())
            sent = 0
            for _ in range(200):  # stop when the server stops granting window
                window = client.conn.local_flow_control_window(sid)
                if window < len(message):
                    await client.read_for(0.2)
                    if client.conn.local_flow_control_window(sid) < len(message):
                        break
                client.send(sid, message)
                sent += 1
                await client.flush()
            # 1 MiB stream window + 16 read-ahead messages credited, then nothing.
            assert 16 <= sent < 60
            probe.release.set()  # the handler reads: the window re-opens
            for _ in range(20):
                while client.conn.local_flow_control_window(sid) >= len(message):
                    client.send(sid, message)
                    sent += 1
                await client.read_for(0.05)
            client.conn.end_stream(sid)
            await client.until(lambda: client.ended(sid))
            assert client.trailers(sid)[b"grpc-status"] == b"0"
            body = b"".join(e.data for e in client.of(h2.events.DataReceived, sid))
            assert S.FromString(body[5:]).value == str(sent) and sent > 80
            await client.close()


async def test_large_messages_both_ways_over_grpc_core() -> None:
    with anyio.fail_after(15):
        async with running() as (_, port, _probe):
            async with aio_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1),
                                                                 ("grpc.max_receive_message_length", -1)]) as ch:
                echo = ch.unary_unary("/t.S/Echo", request_serializer=S.SerializeToString,
                                      response_deserializer=S.FromString)
                big = "b" * 2_000_000  # more than the stream windows both ways: many WINDOW_UPDATEs
                for _ in range(3):
                    assert (await echo(S(value=big))).value == big


async def test_many_streams_fan_out() -> None:
    with anyio.fail_after(30):
        async with running() as (_, port, probe):
            async with aio_channel(f"127.0.0.1:{port}") as ch:
                burst = ch.unary_stream("/t.S/Burst", request_serializer=S.SerializeToString,
                                        response_deserializer=S.FromString)

                async def one() -> list[str]:
                    return [r.value async for r in burst(S(value="500"))]

                results = await asyncio.gather(*(one() for _ in range(40)))
            assert all(r == [str(i) for i in range(500)] for r in results)
            assert probe.done.count(("/t.S/Burst", Kind.SERVER_STREAM, Code.OK)) == 40


# -- limits, headers, metadata -------------------------------------------------------------------------


async def test_max_concurrent_streams_is_advertised_and_enforced() -> None:
    with anyio.fail_after(10):
        async with running(max_concurrent_streams=2) as (_, port, probe):
            client = await RawClient.connect(port)
            await client.until(lambda: bool(client.of(h2.events.RemoteSettingsChanged)))
            # h2 itself would hold back the third stream: announce a larger limit to our own client.
            client.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 10
            client.conn.remote_settings.acknowledge()
            sids = [client.call("/t.S/Hang", grpc_frame(b"")) for _ in range(3)]
            await client.until(lambda: bool(client.of(h2.events.StreamReset)))
            (reset,) = client.of(h2.events.StreamReset)
            assert (reset.stream_id, reset.error_code) == (sids[2], ErrorCode.REFUSED_STREAM)
            await client.close()
            for _ in range(100):
                if probe.cancelled == 2:
                    break
                await asyncio.sleep(0.01)
            assert probe.cancelled == 2


async def test_non_grpc_requests_and_metadata() -> None:
    with anyio.fail_after(10):
        async with running() as (_, port, _probe):
            client = await RawClient.connect(port)
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":path", "/t.S/Echo"),
                                           (":authority", "x"), ("content-type", "application/grpc")],
                                     end_stream=True)
            await client.until(lambda: client.ended(sid))
            assert client.trailers(sid)[b":status"] == b"405"
            sid = client.call("/t.S/Echo", grpc_frame(b""), extra=[("content-type", "application/json")])
            await client.until(lambda: client.ended(sid))
            assert client.trailers(sid)[b":status"] == b"415"
            sid = client.call("/t.S/Meta", grpc_frame(b""), extra=[
                ("x-a", "1"), ("x-a", "2"), ("x-bin", "AAEC"), ("user-agent", "raw/1")])
            await client.until(lambda: client.ended(sid))
            body = b"".join(e.data for e in client.of(h2.events.DataReceived, sid))
            assert S.FromString(body[5:]).value == repr([("user-agent", "raw/1"), ("x-a", "1")])
            sid = client.call("/t.S/Echo", grpc_frame(b""), extra=[("grpc-timeout", "forever")])
            await client.until(lambda: client.ended(sid))
            trailers = client.trailers(sid)
            assert trailers[b"grpc-status"] == str(int(Code.INTERNAL)).encode()
            assert trailers[b"grpc-message"].startswith(b"transport: malformed time-out")
            await client.close()


def test_eager_binding_is_chosen_from_the_code() -> None:
    probe = Probe()
    kinds = {m.path: _Binding(m).eager for m in methods(probe)}
    assert kinds == {"/t.S/Firehose": False, "/t.S/Burst": False, "/t.S/LazyReader": False,
                     "/t.S/Echo": True, "/t.S/Hang": False, "/t.S/Meta": True}


# -- hostile input -----------------------------------------------------------------------------------

_VALID_SETTINGS = frame(4, 0, 0, b"")


async def _send_junk(port: int, junk: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HTTP2_PREFACE + _VALID_SETTINGS + junk)
        reply = b""
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(0.5):
                while chunk := await reader.read(65536):
                    reply += chunk
        return reply
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _goaway_codes(data: bytes) -> list[int]:
    codes, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        if data[pos + 3] == 7 and pos + 17 <= len(data):
            codes.append(struct.unpack(">L", data[pos + 13 : pos + 17])[0])
        pos += 9 + length
    return codes


async def test_fuzzed_frames_get_goaway_and_the_server_stays_up() -> None:
    rnd = random.Random(20261128)
    types = [0, 1, 2, 3, 4, 6, 7, 8, 9, 5, 0x42]

    def random_frame() -> bytes:
        ftype = rnd.choice(types)
        payload = rnd.randbytes(rnd.choice([0, 1, 4, 5, 6, 8, 13, 40]))
        return frame(ftype, rnd.randrange(256), rnd.choice([0, 1, 2, 3, rnd.randrange(2**31)]), payload)

    with anyio.fail_after(60):
        async with running() as (_, port, _probe):
            goaways = closed_silently = 0
            for case in range(120):
                if case % 3 == 0:
                    junk = rnd.randbytes(rnd.randrange(1, 200))
                else:
                    junk = b"".join(random_frame() for _ in range(rnd.randrange(1, 8)))
                reply = await _send_junk(port, junk)
                if _goaway_codes(reply):
                    goaways += 1
                else:
                    closed_silently += 1  # junk that happened to be valid: the connection idles
            assert goaways > 60
            # A frame too large for us, and a protocol error, give the documented codes.
            assert _goaway_codes(await _send_junk(port, b"\x01\x00\x00\x00\x00\x00\x00\x00\x01"))[-1] == \
                ErrorCode.FRAME_SIZE_ERROR
            assert _goaway_codes(await _send_junk(port, frame(0, 0, 0, b"x")))[-1] == ErrorCode.PROTOCOL_ERROR
            assert await health_ok(port)
            async with aio_channel(f"127.0.0.1:{port}") as ch:
                echo = ch.unary_unary("/t.S/Echo", request_serializer=S.SerializeToString,
                                      response_deserializer=S.FromString)
                assert (await echo(S(value="alive"), timeout=5)).value == "alive"


async def test_client_goaway_and_disconnect_cancel_running_calls() -> None:
    with anyio.fail_after(10):
        async with running() as (_, port, probe):
            client = await RawClient.connect(port)
            client.call("/t.S/Hang", grpc_frame(b""))
            await client.flush()
            await probe.started.wait()
            client.conn.close_connection()
            await client.flush()
            await client.close()
            for _ in range(200):
                if probe.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert probe.cancelled == 1
            assert ("/t.S/Hang", Kind.UNARY, Code.CANCELLED) in probe.done
            assert await health_ok(port)
