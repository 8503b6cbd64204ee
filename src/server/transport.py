"""The client port: gRPC (HTTP/2) and HTTP/1.1 on one asyncio listener, like etcd 3.4's client URL.

Every accepted connection starts with :class:`_Sniffer`. If the first bytes are the HTTP/2
client preface, the connection is handed to grpclib's ``H2Protocol`` (built by a grpclib
``Server`` exactly as ``Server._protocol_factory()`` does, so grpclib's per-connection handler
bookkeeping and its close work unchanged) and the buffered bytes are replayed into it. Anything
else is HTTP/1.1, served with h11 by the ``http_app`` (see :mod:`coord_server.http`).

Services are bound from transport-neutral :class:`~coord_server.rpc.Method` descriptions, not
from generated grpclib stubs. grpclib is pinned (0.4.9) because this module uses its internals:

- ``Server._protocol_factory``, ``Server._mapping``, ``Server._handlers``, ``Server._server``
  and ``Server._server_closed_fut`` (to run grpclib's close on our listening socket);
- ``grpclib.server.Stream._stream`` (the h2 stream: messages are read with ``recv_data`` so that
  an oversized message is refused from its 5-byte prefix, before the body is buffered);
- ``H2Protocol.connection`` / ``Connection._connection`` (the ``H2Connection``: stream limit,
  graceful GOAWAY at close).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import socket
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any, Final, cast

import h2.exceptions
import h11
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from .errors import Code, EtcdError, message_too_large
from .http import BodyTooLarge, DefaultHttpApp, HttpApp, HttpHandler, HttpRequest, HttpResponse, text_response
from .rpc import CallContext, Kind, Method, Unary

__all__ = [
    "DEFAULT_MAX_RECV_BYTES",
    "HEALTH_CHECK_PATH",
    "HTTP2_PREFACE",
    "ClientListener",
    "RpcDoneCallback",
    "ServingStatus",
]

log = logging.getLogger(__name__)

HTTP2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_MAX_RECV_BYTES: Final = 2_097_152  # etcd: --max-request-bytes (1.5 MiB) + 512 KiB
HEALTH_SERVICE: Final = "grpc.health.v1.Health"
HEALTH_CHECK_PATH: Final = f"/{HEALTH_SERVICE}/Check"

RpcDoneCallback = Callable[[str, Kind, Code], None]
"""``on_rpc_done(method_path, kind, code)``: called once per finished call to a known method."""

_CARDINALITY: Final = {
    Kind.UNARY: Cardinality.UNARY_UNARY,
    Kind.SERVER_STREAM: Cardinality.UNARY_STREAM,
    Kind.BIDI_STREAM: Cardinality.STREAM_STREAM,
}
_BIDI_QUEUE: Final = 16  # decoded requests read ahead of a bidi service (HTTP/2 flow control does the rest)
_GREETING: Final = len(HTTP2_PREFACE) + 9  # the preface and the header of the SETTINGS frame after it
_HTTP_MAX_BUFFER: Final = 256 * 1024  # unparsed HTTP/1.1 input kept before reading pauses
_HTTP_DISCARD: Final = 256 * 1024  # unread request body drained to keep a connection alive (Go: 256 KiB)


# --------------------------------------------------------------------------------------------------
# gRPC health (grpc.health.v1): two tiny messages built at runtime in a private descriptor pool, so
# they never clash with a grpc_health / grpclib.health module registering the same names.


class ServingStatus:
    UNKNOWN: Final = 0
    SERVING: Final = 1
    NOT_SERVING: Final = 2
    SERVICE_UNKNOWN: Final = 3


def _health_types() -> tuple[type[Any], type[Any]]:
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="coord_server/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    req = fdp.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    resp = fdp.message_type.add(name="HealthCheckResponse")
    enum = resp.enum_type.add(name="ServingStatus")
    for name in ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"):
        enum.value.add(name=name, number=getattr(ServingStatus, name))
    resp.field.add(
        name="status",
        number=1,
        type=f.TYPE_ENUM,
        label=f.LABEL_OPTIONAL,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


HealthCheckRequest, HealthCheckResponse = _health_types()


# --------------------------------------------------------------------------------------------------
# grpclib glue


class _Codec(ProtoCodec):
    """grpclib's proto codec, plus: a service may return already-serialized ``bytes``."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if type(message) is bytes:
            return message
        if not isinstance(message, message_type):
            raise TypeError(f"reply must be {message_type.__name__} or bytes, not {type(message).__name__}")
        return cast(bytes, message.SerializeToString())


class _Mapping(dict[str, Handler]):
    """grpclib's path → handler mapping; an unknown path gets grpc-go's UNIMPLEMENTED answer.

    grpclib's ``request_handler`` only calls ``mapping.get(path)``: answering every path here
    is the one hook it has for "method not found".
    """

    def __init__(self, handlers: dict[str, Handler]) -> None:
        super().__init__(handlers)
        self._services = frozenset(path.split("/")[1] for path in handlers)

    def get(self, key: str, default: Any = None) -> Any:
        handler = dict.get(self, key)
        if handler is None:
            return Handler(self._unknown(key), Cardinality.STREAM_STREAM, None, None)
        return handler

    def _unknown(self, path: str) -> Callable[[Stream[Any, Any]], Any]:
        name = path[1:] if path.startswith("/") else path
        pos = name.rfind("/")
        if pos == -1:
            text = f"malformed method name: {json.dumps(path)}"
        elif name[:pos] in self._services:
            text = f"unknown method {name[pos + 1 :]} for service {name[:pos]}"
        else:
            text = f"unknown service {name[:pos]}"

        async def unimplemented(stream: Stream[Any, Any]) -> None:
            await stream.send_trailing_metadata(status=Status.UNIMPLEMENTED, status_message=text)

        return unimplemented


class _Servable:
    """What grpclib's ``Server`` wants from a handler: ``__mapping__()``."""

    def __init__(self, mapping: dict[str, Handler]) -> None:
        self._mapping = mapping

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping


class _Requests:
    """The async iterator a bidi service reads: fed by the transport's reader task.

    Ends (StopAsyncIteration) when the client half-closes or the call is over; raises the
    read error (e.g. an oversized message) if reading failed.
    """

    __slots__ = ("_end", "_queue")

    _END: Final = object()

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(_BIDI_QUEUE)
        self._end: EtcdError | bool | None = False  # False: open; None: EOF; EtcdError: failed

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        if self._queue.empty() and self._end is not False:
            self._raise_end()
        item = await self._queue.get()
        if item is _Requests._END:
            self._raise_end()
        return item

    def _raise_end(self) -> None:
        if isinstance(self._end, EtcdError):
            raise EtcdError(self._end.code, self._end.message)
        raise StopAsyncIteration

    async def put(self, item: Any) -> None:
        await self._queue.put(item)

    def finish(self, error: EtcdError | None = None) -> None:
        if self._end is False:
            self._end = error
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(_Requests._END)


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _format_peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "" if addr is None else str(addr)


async def _reap(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they are done, even if the caller is cancelled meanwhile."""
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    interrupted = False
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            interrupted = True
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: never "exception was never retrieved"
    if interrupted:
        raise asyncio.CancelledError


# --------------------------------------------------------------------------------------------------
# the listener


class ClientListener:
    """gRPC and HTTP/1.1 on one port.

    ``methods``: the RPCs to serve (``grpc.health.v1.Health/Check`` is added unless given).
    ``http_app``: an :class:`~coord_server.http.HttpApp` or a bare async function for every
    non-gRPC request (default: ``/version`` and 404). ``max_recv_bytes``: the largest gRPC
    message (and HTTP/1.1 body) accepted. ``on_rpc_done(path, kind, code)``: metrics hook, once
    per finished call. ``idle_timeout``: a new connection that has not shown which protocol it
    speaks by then is closed. ``http_keepalive_timeout``: an idle HTTP/1.1 connection (or a
    stalled request) is closed after that long.
    """

    def __init__(
        self,
        methods: Sequence[Method],
        http_app: HttpApp | HttpHandler | None = None,
        max_recv_bytes: int = DEFAULT_MAX_RECV_BYTES,
        on_rpc_done: RpcDoneCallback | None = None,
        *,
        idle_timeout: float = 30.0,
        http_keepalive_timeout: float = 120.0,
        max_concurrent_streams: int = 2**32 - 1,
    ) -> None:
        app = DefaultHttpApp() if http_app is None else http_app
        self._http_handler: HttpHandler = app.handle if isinstance(app, HttpApp) else app
        self.max_recv_bytes = max_recv_bytes
        self._on_rpc_done = on_rpc_done
        self.idle_timeout = idle_timeout
        self.http_keepalive_timeout = http_keepalive_timeout
        self._max_streams = max_concurrent_streams
        self._health: dict[str, int] = {"": ServingStatus.SERVING}

        methods = list(methods)
        if not any(m.path == HEALTH_CHECK_PATH for m in methods):
            types = (HealthCheckRequest, HealthCheckResponse)
            methods.append(Method(HEALTH_CHECK_PATH, Kind.UNARY, *types, self._health_check))
        handlers: dict[str, Handler] = {}
        for method in methods:
            if method.path in handlers:
                raise ValueError(f"duplicate method {method.path}")
            handlers[method.path] = self._bind(method)
        self._handlers = handlers

        self._grpc: Server | None = None
        self._server: asyncio.AbstractServer | None = None
        self._port = 0
        self._sniffers: set[_Sniffer] = set()
        self._h2: dict[asyncio.Transport, H2Protocol] = {}
        self._writers: weakref.WeakKeyDictionary[asyncio.Transport, _CoalescingTransport] = (
            weakref.WeakKeyDictionary())
        self._h2_gc = 0
        self._http: set[_HttpConnection] = set()
        self._calls: dict[asyncio.Task[Any], Kind] = {}
        self._closing = False
        self._closed: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    async def start(self, host: str, port: int) -> int:
        """Bind and start accepting; returns the bound port (``port`` may be 0)."""
        if self._server is not None:
            raise RuntimeError("listener already started")
        loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._grpc = Server([_Servable({})], codec=_Codec())
        self._grpc._mapping = _Mapping(self._handlers)
        self._server = await loop.create_server(lambda: _Sniffer(self), host, port, reuse_address=True)
        # grpclib's close()/wait_closed() act on these: let them act on our socket.
        self._grpc._server = self._server
        self._grpc._server_closed_fut = loop.create_future()
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting and close every connection.

        gRPC clients get a GOAWAY (so they reconnect elsewhere for new calls); stream calls are
        cancelled at once, unary calls in flight get up to ``grace`` seconds to finish, then
        everything left is cancelled and every connection closed. Returns when all is done.
        """
        if self._server is None or self._grpc is None or self._closed is None:
            return
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            self._server.close()
            for sniffer in list(self._sniffers):
                sniffer.abort()
            for http_conn in list(self._http):
                http_conn.shutdown()
            for transport, proto in self._live_h2():
                with contextlib.suppress(Exception):
                    last = proto.connection._connection.highest_inbound_stream_id
                    self._writer_for(transport).write(
                        GoAwayFrame(0, last_stream_id=last, error_code=0).serialize())
            for task, kind in list(self._calls.items()):
                if kind is not Kind.UNARY:
                    task.cancel()
            unary = [task for task, kind in self._calls.items() if kind is Kind.UNARY]
            if unary and grace > 0:
                await asyncio.wait(unary, timeout=grace)
            self._grpc.close()  # cancels whatever still runs, on every connection
            waiters = [asyncio.ensure_future(h.wait_closed()) for h in self._grpc._handlers]
            waiters += [c.task for c in self._http if c.task is not None]
            if waiters:
                _, pending = await asyncio.wait(waiters, timeout=max(grace, 1.0))
                if pending:
                    log.warning("%d RPC handler(s) ignored cancellation at close", len(pending))
                    for fut in pending:
                        fut.cancel()
            for transport, _ in self._live_h2():
                self._writer_for(transport).close()  # sends what is still gathered first
            for http_conn in list(self._http):
                http_conn.abort()
            self._h2.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
        finally:
            self._closed.set()

    def set_serving_status(self, service: str, status: int) -> None:
        """Health status answered for ``service`` (``""`` = the server; SERVING at start)."""
        self._health[service] = status

    # -- connections -----------------------------------------------------------------------------

    def open_streams(self) -> int:
        """HTTP/2 streams clients have open on this listener now, answered or not.

        Counted from h2's state, so requests read in the same socket read as the current
        one are included even before their handler tasks ran (the write path uses this to
        tell a lone write from a burst).
        """
        total = 0
        for transport, proto in self._h2.items():
            if not transport.is_closing():
                total += proto.connection._connection.open_inbound_streams
        return total

    def _live_h2(self) -> list[tuple[asyncio.Transport, H2Protocol]]:
        self._h2 = {t: p for t, p in self._h2.items() if not t.is_closing()}
        return list(self._h2.items())

    def _writer_for(self, transport: asyncio.Transport) -> asyncio.Transport:
        writer = self._writers.get(transport)
        return transport if writer is None else cast(asyncio.Transport, writer)

    def _grpc_protocol(self, transport: asyncio.Transport) -> asyncio.Protocol:
        assert self._grpc is not None
        self._h2_gc += 1
        if self._h2_gc % 32 == 0:
            self._live_h2()
        proto = self._grpc._protocol_factory()
        writer = _CoalescingTransport(transport)
        self._writers[transport] = writer
        proto.connection_made(cast(asyncio.Transport, writer))
        if self._max_streams != 100:  # h2 announces 100; etcd (grpc-go) allows 2^32-1
            h2conn = proto.connection._connection
            h2conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self._max_streams})
            proto.connection.flush()
        self._h2[transport] = proto
        return proto

    def _http_protocol(self, transport: asyncio.Transport) -> asyncio.Protocol:
        proto = _HttpConnection(self)
        proto.connection_made(transport)
        return proto

    # -- gRPC calls ------------------------------------------------------------------------------

    def _bind(self, method: Method) -> Handler:
        async def handle(stream: Stream[Any, Any]) -> None:
            await self._serve(method, stream)

        return Handler(handle, _CARDINALITY[method.kind], method.request_type, method.response_type)

    async def _serve(self, method: Method, stream: Stream[Any, Any]) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._calls[task] = method.kind
        code = Code.OK
        try:
            if self._closing:
                # Arrived after our GOAWAY: not executed, so the client may safely retry it.
                raise GRPCError(Status.UNAVAILABLE, "server is shutting down")
            ctx = self._context(stream)
            if method.kind is Kind.UNARY:
                request = await self._recv_one(stream, method.request_type)
                await stream.send_message(await cast(Unary, method.func)(request, ctx))
            elif method.kind is Kind.SERVER_STREAM:
                request = await self._recv_one(stream, method.request_type)
                await self._send_all(stream, cast(AsyncIterator[Any], method.func(request, ctx)))
            else:
                await self._bidi(method, stream, ctx)
        except EtcdError as exc:
            code = exc.code
            raise GRPCError(Status(int(exc.code)), exc.message) from None
        except asyncio.CancelledError:
            if not task.cancelling():
                # Not this call being cancelled: the service let a stray CancelledError escape
                # (e.g. it awaited a future someone else cancelled). Answer instead of hanging the client.
                code = Code.CANCELLED
                log.warning("%s raised CancelledError without being cancelled", method.path, exc_info=True)
                raise GRPCError(Status.CANCELLED, "context canceled") from None
            dl = stream.deadline
            code = Code.DEADLINE_EXCEEDED if dl is not None and dl.time_remaining() <= 0 else Code.CANCELLED
            raise
        except h2.exceptions.StreamClosedError:
            # The client reset the stream or the connection went away while we were sending.
            code = Code.CANCELLED
            raise GRPCError(Status.CANCELLED, "stream closed") from None
        except GRPCError as exc:
            code = Code(exc.status.value)
            raise
        except Exception as exc:
            code = Code.UNKNOWN
            log.exception("%s failed", method.path)
            raise GRPCError(Status.UNKNOWN, str(exc)) from None
        finally:
            del self._calls[task]
            if self._on_rpc_done is not None:
                try:
                    self._on_rpc_done(method.path, method.kind, code)
                except Exception:
                    log.exception("on_rpc_done callback failed")

    def _context(self, stream: Stream[Any, Any]) -> CallContext:
        metadata: dict[str, str] = {}
        if stream.metadata:
            for key, value in stream.metadata.items():
                if isinstance(value, str):
                    metadata.setdefault(key.lower(), value)
        if stream.user_agent is not None:
            metadata.setdefault("user-agent", stream.user_agent)
        deadline = None if stream.deadline is None else time.monotonic() + stream.deadline.time_remaining()
        return CallContext(metadata=metadata, peer=_format_peer(stream.peer.addr()), deadline=deadline)

    async def _recv(self, stream: Stream[Any, Any], request_type: type[Any]) -> Any | None:
        """One request message, or None at the end of the client's stream.

        The 5-byte prefix is read first: an oversized message is refused before its body is
        buffered (grpc-go's check and text).
        """
        h2_stream = stream._stream
        try:
            prefix = await h2_stream.recv_data(5)
            if not prefix:
                return None
            flag = prefix[0]
            size = int.from_bytes(prefix[1:5], "big")
            if flag == 1:
                raise EtcdError(Code.UNIMPLEMENTED, "grpc: compressed messages are not supported (compressed flag set)")
            if flag != 0:
                raise EtcdError(Code.INTERNAL, f"grpc: received unexpected payload format {flag}")
            if size > self.max_recv_bytes:
                raise message_too_large(size, self.max_recv_bytes)
            body = await h2_stream.recv_data(size) if size else b""
        except AssertionError:  # grpclib's Buffer: the stream ended inside a message
            raise EtcdError(Code.INTERNAL, "grpc: failed to receive message: unexpected EOF") from None
        try:
            message = request_type.FromString(body)
        except DecodeError as exc:
            raise EtcdError(Code.INTERNAL, f"grpc: error unmarshalling request: {exc}") from None
        stream._messages_received += 1
        conn = h2_stream.connection
        conn.messages_received += 1
        conn.last_message_received = time.monotonic()
        return message

    async def _recv_one(self, stream: Stream[Any, Any], request_type: type[Any]) -> Any:
        request = await self._recv(stream, request_type)
        if request is None:
            raise EtcdError(Code.INTERNAL, "grpc: client sent no request message")
        return request

    @staticmethod
    async def _send_all(stream: Stream[Any, Any], responses: AsyncIterator[Any]) -> None:
        try:
            async for response in responses:
                await stream.send_message(response)
                # grpclib's send does not yield while the window allows: let other streams run.
                await asyncio.sleep(0)
        finally:
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _bidi(self, method: Method, stream: Stream[Any, Any], ctx: CallContext) -> None:
        requests = _Requests()

        async def pump() -> None:
            try:
                while True:
                    request = await self._recv(stream, method.request_type)
                    if request is None:
                        break
                    await requests.put(request)
            except EtcdError as exc:
                requests.finish(exc)
                raise
            requests.finish(None)

        loop = asyncio.get_running_loop()
        reader = loop.create_task(pump())
        responses = cast(AsyncIterator[Any], method.func(requests, ctx))
        sender = loop.create_task(self._send_all(stream, responses))
        try:
            waiting: set[asyncio.Task[None]] = {reader, sender}
            while True:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if sender in done:
                    sender.result()
                    return
                reader.result()  # raises a read error (the finally cancels the service)
                waiting = {sender}  # client half-closed: the service may still answer
        finally:
            requests.finish(None)
            await _reap((sender, reader))

    async def _health_check(self, request: Any, ctx: CallContext) -> Any:
        status = self._health.get(request.service)
        if status is None:
            raise EtcdError(Code.NOT_FOUND, "unknown service")
        return HealthCheckResponse(status=status)


# --------------------------------------------------------------------------------------------------
# protocol sniffing


class _CoalescingTransport:
    """The transport grpclib writes to: frames gathered and sent in one write per loop iteration.

    grpclib writes headers, data and trailers of every reply separately (three syscalls
    per unary call); gathering them until the loop has run its ready callbacks cut the
    write calls ~30-fold and raised c=64 throughput by about a third (docs/performance.md).
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._buf: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._buf.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def writelines(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self.write(line)

    def _flush(self) -> None:
        self._scheduled = False
        if self._buf:
            data = b"".join(self._buf)
            self._buf.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._buf.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Sniffer(asyncio.Protocol):
    """Owns a new connection until its first bytes say HTTP/2 (gRPC) or something else."""

    def __init__(self, listener: ClientListener) -> None:
        self._listener = listener
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self._listener._closing:
            self._transport.abort()
            return
        _set_nodelay(transport)
        self._listener._sniffers.add(self)
        self._timer = asyncio.get_running_loop().call_later(self._listener.idle_timeout, self.abort)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        buffer = self._buffer + data
        n = min(len(buffer), len(HTTP2_PREFACE))
        is_h2 = buffer[:n] == HTTP2_PREFACE[:n]
        if is_h2:
            if len(buffer) < _GREETING:
                self._buffer = buffer  # a partial preface: wait for the rest
                return
            # The preface must be followed by a SETTINGS frame (grpc-go: "bogus greeting"). h2
            # itself would buffer up to 16 MiB of a junk "frame" before noticing.
            length = int.from_bytes(buffer[24:27], "big")
            if buffer[27] != 0x4 or length % 6 or length > 16384 or buffer[29:33] != b"\0\0\0\0":
                log.debug("bad HTTP/2 greeting from %s", self._transport.get_extra_info("peername"))
                self.abort()
                return
        self._buffer = b""
        self._detach()
        transport = self._transport
        if is_h2:
            proto = self._listener._grpc_protocol(transport)
        else:
            proto = self._listener._http_protocol(transport)
        transport.set_protocol(proto)
        proto.data_received(buffer)

    def eof_received(self) -> bool | None:
        self._detach()
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self._detach()

    def abort(self) -> None:
        self._detach()
        if self._transport is not None:
            self._transport.abort()

    def _detach(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._listener._sniffers.discard(self)


# --------------------------------------------------------------------------------------------------
# HTTP/1.1


class _HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: h11 state machine fed by the transport, served by one task.

    Keep-alive and pipelining come from h11 (requests are answered in order); a streaming
    response body is written chunk by chunk with write flow control; a malformed request gets
    400 and the connection closes.
    """

    def __init__(self, listener: ClientListener) -> None:
        self._listener = listener
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self._transport: asyncio.Transport | None = None
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = False
        self._reading_paused = False
        self._body_size = 0
        self._peer = ""
        self.task: asyncio.Task[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._peer = _format_peer(transport.get_extra_info("peername"))
        self._listener._http.add(self)
        self.task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self._h11.receive_data(data)
        self._wake.set()
        if not self._reading_paused and len(self._h11.trailing_data[0]) > _HTTP_MAX_BUFFER:
            assert self._transport is not None
            self._transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool:
        self._h11.receive_data(b"")
        self._wake.set()
        return True  # keep the write side: answers to pipelined requests are still owed

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake.set()
        self._writable.set()
        self._listener._http.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # listener

    def shutdown(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        elif self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # serving

    async def _run(self) -> None:
        assert self._transport is not None
        try:
            while True:
                try:
                    event = await self._next_event(self._listener.http_keepalive_timeout)
                except TimeoutError:
                    return
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed (or nothing sensible)
                if not await self._serve(event):
                    return
        except h11.RemoteProtocolError as exc:
            if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                with contextlib.suppress(Exception):
                    self._send_simple(status, f"{status} {HTTPStatus(status).phrase}")
        except ConnectionError as exc:
            log.debug("HTTP connection from %s: %r", self._peer, exc)
        except h11.LocalProtocolError:
            log.warning("HTTP connection from %s: invalid response", self._peer, exc_info=True)
        except Exception:
            log.exception("HTTP connection from %s failed", self._peer)
        finally:
            self._transport.close()

    async def _next_event(self, idle: float) -> Any:
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self._lost:
                raise ConnectionResetError("connection lost")
            if self._reading_paused:
                assert self._transport is not None
                self._transport.resume_reading()
                self._reading_paused = False
            self._wake.clear()
            async with asyncio.timeout(idle):
                await self._wake.wait()

    async def _receive(self) -> bytes:
        """The next body chunk of the current request; b"" at its end."""
        if self._h11.their_state is not h11.SEND_BODY:
            return b""
        if self._h11.they_are_waiting_for_100_continue:
            self._write(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            event = await self._next_event(self._listener.http_keepalive_timeout)
            if isinstance(event, h11.Data):
                if not event.data:
                    continue
                self._body_size += len(event.data)
                if self._body_size > self._listener.max_recv_bytes:
                    raise BodyTooLarge(f"request body larger than {self._listener.max_recv_bytes} bytes")
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                return b""
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in request body")

    async def _serve(self, event: h11.Request) -> bool:
        """Answer one request; whether the connection can serve another."""
        request = HttpRequest(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
            peer=self._peer,
            http_version=event.http_version.decode("ascii", "replace"),
            _receive=self._receive,
        )
        self._body_size = 0
        keep = True
        try:
            response = await self._listener._http_handler(request)
        except BodyTooLarge:
            response, keep = text_response(413, "Request Entity Too Large\n"), False
        except h11.RemoteProtocolError:
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.target)
            response = text_response(500, "Internal Server Error\n")
        if not await self._respond(request, response):
            return False
        if self._h11.they_are_waiting_for_100_continue:
            return False  # the client holds its body back: it cannot be drained, close instead
        # Drain what the app did not read of the request body, then reuse the connection.
        drained = 0
        while keep and self._h11.their_state is h11.SEND_BODY:
            try:
                chunk = await self._receive()
            except BodyTooLarge:
                return False
            drained += len(chunk)
            if not chunk:
                break
            if drained > _HTTP_DISCARD:
                return False
        if not keep or self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
            return False
        self._h11.start_next_cycle()
        return True

    async def _respond(self, request: HttpRequest, response: HttpResponse) -> bool:
        headers = list(response.headers)
        names = {name.lower() for name, _ in headers}
        if "date" not in names:
            headers.append(("Date", email.utils.formatdate(usegmt=True)))
        body = response.body
        with_body = request.method != "HEAD" and response.status not in (204, 304)
        if isinstance(body, bytes | bytearray | memoryview):
            if "content-length" not in names and with_body:
                headers.append(("Content-Length", str(len(body))))
            self._write(self._response_event(response.status, headers))
            if body and with_body:
                self._write(h11.Data(data=bytes(body)))
            self._write(h11.EndOfMessage())
            return True
        self._write(self._response_event(response.status, headers))
        try:
            if with_body:
                await self._stream_body(body)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("HTTP %s %s: response stream failed", request.method, request.target)
            return False  # the reply is cut short: closing the connection tells the client
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
        self._write(h11.EndOfMessage())
        return True

    async def _stream_body(self, body: AsyncIterable[bytes]) -> None:
        async for chunk in body:
            if chunk:
                self._write(h11.Data(data=bytes(chunk)))
                if not self._writable.is_set():
                    await self._writable.wait()
                if self._lost:
                    raise ConnectionResetError("connection lost")

    @staticmethod
    def _response_event(status: int, headers: list[tuple[str, str]]) -> h11.Response:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        return h11.Response(status_code=status, headers=headers, reason=reason)

    def _send_simple(self, status: int, text: str) -> None:
        """A Go-style error reply on a connection that is about to close."""
        self._write(
            h11.Response(
                status_code=status,
                headers=[
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Connection", "close"),
                    ("Content-Length", str(len(text))),
                ],
                reason=HTTPStatus(status).phrase,
            )
        )
        self._write(h11.Data(data=text.encode()))
        self._write(h11.EndOfMessage())

    def _write(self, event: Any) -> None:
        data = self._h11.send(event)
        if data and self._transport is not None and not self._lost:
            self._transport.write(data)
