"""The client port: gRPC (HTTP/2) and HTTP/1.1 on one asyncio listener, like etcd 3.4's client URL.

Every accepted connection starts with :class:`_Sniffer`. If the first bytes are the HTTP/2
client preface, the connection becomes a :class:`_GrpcConnection`: the sans-io
:class:`~coord_server.h2conn.H2Connection` does HTTP/2 (framing, HPACK, flow control, limits,
errors), this module runs the calls. Anything else is HTTP/1.1, served with h11 by the
``http_app`` (see :mod:`coord_server.http`).

Services are bound from transport-neutral :class:`~coord_server.rpc.Method` descriptions. How a
call runs:

- the request headers give the method (unknown: UNIMPLEMENTED with grpc-go's text), the
  ``grpc-timeout`` deadline (a timer cancels the handler: DEADLINE_EXCEEDED) and the metadata
  for the :class:`~coord_server.rpc.CallContext`;
- request messages are cut from the DATA frames as they arrive (:class:`~coord_server.h2grpc.
  MessageReader`: an oversized or compressed message is refused from its 5-byte prefix);
- a unary handler whose body never awaits (``async def`` without ``await``, ``async for`` or
  ``async with``) runs *eagerly*, inside ``data_received``, not in a task: it must not need
  ``asyncio.current_task()``. Every other handler runs in a task of its own;
- replies of one loop iteration leave in one socket write; a unary reply is headers, data and
  trailers in one go;
- a stream handler's response iterator is not pulled while the stream's (or connection's)
  flow-control window is exhausted, or while the socket's write buffer is full, so a slow
  reader slows the handler instead of growing buffers; a handler that never suspends is made to
  yield every few messages so one busy stream cannot starve the others;
- a bidi handler's request iterator is fed by the connection; past a few unread messages the
  stream's receive window is no longer re-opened, so a client cannot outrun the handler;
- RST_STREAM from the client, a lost connection or :meth:`ClientListener.close` cancel the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dis
import email.utils
import inspect
import json
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from http import HTTPStatus
from typing import Any, Final, cast

import h11
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from .errors import Code, EtcdError
from .h2conn import (
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    H2Connection,
    RequestReceived,
    SendReady,
    StreamClosedError,
    StreamReset,
    encode_headers,
)
from .h2grpc import RESPONSE_HEADERS, TRAILERS_OK, UNEXPECTED_EOF, MessageReader, parse_timeout, status_block
from .http import BodyTooLarge, DefaultHttpApp, HttpApp, HttpHandler, HttpRequest, HttpResponse, text_response
from .rpc import CallContext, Kind, Method

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

_BIDI_READ_AHEAD: Final = 16  # unread requests of a bidi call before its receive window stops re-opening
_YIELD_EVERY: Final = 8  # messages a stream sends without the loop running before it must yield
_GREETING: Final = len(HTTP2_PREFACE) + 9  # the preface and the header of the SETTINGS frame after it
_HTTP_MAX_BUFFER: Final = 256 * 1024  # unparsed HTTP/1.1 input kept before reading pauses
_HTTP_DISCARD: Final = 256 * 1024  # unread request body drained to keep a connection alive (Go: 256 KiB)
_SHUTTING_DOWN: Final = "server is shutting down"
# Request headers that are HTTP/2 or gRPC protocol, not call metadata.
_NOT_METADATA: Final = frozenset(
    (b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding", b"grpc-message-type")
)
# Instructions only a coroutine that can suspend contains.
_SUSPENDING_OPS: Final = frozenset(
    ("GET_AWAITABLE", "YIELD_VALUE", "SEND", "BEFORE_ASYNC_WITH", "GET_AITER", "GET_ANEXT", "END_ASYNC_FOR")
)


# --------------------------------------------------------------------------------------------------
# gRPC health (grpc.health.v1): two tiny messages built at runtime in a private descriptor pool, so
# they never clash with a grpc_health module registering the same names.


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
# binding methods


def _never_suspends(func: Callable[..., Any]) -> bool:
    """Whether ``func`` is a coroutine function whose body has no await point at all.

    Such a coroutine finishes on its first ``send(None)``, so it can run without a task.
    """
    target = getattr(func, "__func__", func)
    code = getattr(target, "__code__", None)
    if code is None or not code.co_flags & inspect.CO_COROUTINE:
        return False
    return not any(ins.opname in _SUSPENDING_OPS for ins in dis.get_instructions(code))


class _Binding:
    """A :class:`Method` as the connection uses it."""

    __slots__ = ("eager", "func", "kind", "path", "request_type", "response_type")

    def __init__(self, method: Method) -> None:
        self.path = method.path
        self.kind = method.kind
        self.request_type = method.request_type
        self.response_type = method.response_type
        self.func: Any = method.func
        self.eager = method.kind is Kind.UNARY and _never_suspends(method.func)

    def serialize(self, message: Any) -> bytes:
        """The reply's bytes (a service may return already-serialized ``bytes``). Raises TypeError."""
        if type(message) is bytes:
            return message
        if not isinstance(message, self.response_type):
            raise TypeError(f"reply must be {self.response_type.__name__} or bytes, not {type(message).__name__}")
        return cast(bytes, message.SerializeToString())


def _unknown_method_text(path: str, services: frozenset[str]) -> str:
    """grpc-go's UNIMPLEMENTED text for a path no method serves."""
    name = path[1:] if path.startswith("/") else path
    pos = name.rfind("/")
    if pos == -1:
        return f"malformed method name: {json.dumps(path)}"
    if name[:pos] in services:
        return f"unknown method {name[pos + 1 :]} for service {name[:pos]}"
    return f"unknown service {name[:pos]}"


class _Requests:
    """The async iterator a bidi service reads, fed by its connection.

    Ends (StopAsyncIteration) when the client half-closes or the call is over, after every
    message that arrived before; raises the read error (e.g. an oversized message) if reading
    failed. Pulling a message lets the connection re-open the stream's receive window.
    """

    __slots__ = ("_call", "_end", "_items", "_waiter")

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._end: EtcdError | bool | None = False  # False: open; None: EOF; EtcdError: failed

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        """The next request. A checkpoint only while none is waiting."""
        while not self._items:
            if self._end is not False:
                if isinstance(self._end, EtcdError):
                    raise EtcdError(self._end.code, self._end.message)
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        self._call.pulled(len(self._items))
        return item

    def __len__(self) -> int:
        return len(self._items)

    def feed(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def finish(self, error: EtcdError | None = None) -> None:
        if self._end is False:
            self._end = error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Call:
    """One gRPC call on a connection: from its request headers until its status is sent."""

    __slots__ = (
        "abort",
        "binding",
        "closed",
        "conn",
        "ctx",
        "deferred_ack",
        "done",
        "got_request",
        "headers_sent",
        "reader",
        "requests",
        "sid",
        "started",
        "task",
        "timer",
        "waiter",
    )

    def __init__(self, conn: _GrpcConnection, sid: int, binding: _Binding, ctx: CallContext) -> None:
        self.conn = conn
        self.sid = sid
        self.binding = binding
        self.ctx = ctx
        self.reader: MessageReader | None = None  # made when a message does not come in one piece
        self.requests: _Requests | None = None
        self.task: asyncio.Task[None] | None = None
        self.started = False  # the task's coroutine has begun (else a cancel means it never runs)
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[None] | None = None
        # Why we cancelled the handler: (code, message to send; None: the stream is gone).
        self.abort: tuple[Code, str | None] | None = None
        self.headers_sent = False
        self.got_request = False
        self.closed = False  # the stream is gone (reset, connection lost): nothing more can be sent
        self.done = False  # status decided and on_rpc_done called
        self.deferred_ack = 0  # received bytes of a bidi call whose window credit waits for the handler

    def pulled(self, queued: int) -> None:
        """The bidi handler took a request; ``queued`` are still unread."""
        if self.deferred_ack and queued < _BIDI_READ_AHEAD and not self.closed:
            n, self.deferred_ack = self.deferred_ack, 0
            self.conn.h2.acknowledge_received_data(self.sid, n)
            self.conn.schedule_flush()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def cancel(self, code: Code, message: str | None) -> None:
        """Stop the handler; the call ends with ``code`` (``message`` None: send nothing)."""
        if self.done:
            return
        if self.task is not None and not self.task.done():
            if self.abort is None:
                self.abort = (code, message)
            self.task.cancel()
            if not self.started:
                # A task cancelled before its first step never runs its coroutine: end here.
                self.started = True
                self.conn.task_ended(self)
        else:
            self.conn.end_with_error(self, code, message)


# --------------------------------------------------------------------------------------------------
# gRPC connection


_Parsed = tuple[bytes | None, bytes | None, bytes | None, bytes | None, dict[str, str]]


class _GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection: the sans-io core fed by the transport, calls run as described above."""

    def __init__(self, listener: ClientListener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self.h2 = H2Connection(max_concurrent_streams=listener._max_streams)
        self.calls: dict[int, _Call] = {}
        self.streaming = 0  # calls in self.calls that stream (watch, keep-alive ...): long-lived
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.ticks = 0  # loop callbacks run for this connection: tells a stream whether it yielded
        self._flush_scheduled = False
        self._writable = True
        self._reading_paused = False
        self._running = 0  # handler tasks not finished
        self._lost = False
        self._parsed_for: list[tuple[bytes, bytes]] | None = None
        self._parsed: _Parsed = (None, None, None, None, {})

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _format_peer(transport.get_extra_info("peername"))
        self._listener._h2.add(self)
        self.flush()  # our SETTINGS

    def data_received(self, data: bytes) -> None:
        self.ticks += 1
        try:
            events = self.h2.receive_data(data)
            for ev in events:
                kind = type(ev)
                if kind is DataReceived:
                    self._on_data(cast(DataReceived, ev))
                elif kind is RequestReceived:
                    self._on_request(cast(RequestReceived, ev))
                elif kind is StreamReset:
                    self._on_reset(cast(StreamReset, ev))
                elif kind is SendReady:
                    call = self.calls.get(cast(SendReady, ev).stream_id)
                    if call is not None:
                        call.wake()
                elif kind is ConnectionTerminated:
                    self._on_terminated(cast(ConnectionTerminated, ev))
        except Exception:
            log.exception("HTTP/2 connection from %s failed", self.peer)
            self.h2.goaway(ErrorCode.INTERNAL_ERROR, "internal error")
            self.close()
            return
        self.flush()

    def eof_received(self) -> bool | None:
        return None  # close: HTTP/2 clients never half-close a connection they still use

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._listener._h2.discard(self)
        for call in list(self.calls.values()):
            call.closed = True
            call.cancel(Code.CANCELLED, None)
            call.wake()

    def pause_writing(self) -> None:
        # The peer reads slower than we answer: stop reading requests too, so that eager replies
        # and stream messages cannot pile up in the transport's buffer.
        self._writable = False
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable = True
        if self.transport is not None and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        for call in list(self.calls.values()):
            call.wake()

    # output

    def flush(self) -> None:
        """Write what the core has queued, now."""
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def schedule_flush(self) -> None:
        """Write what the core has queued at the end of this loop iteration (one write for many replies)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_scheduled = False
        self.ticks += 1
        self.flush()

    def _sent_from_task(self) -> None:
        # The last running handler writes at once (saves a loop iteration for a lone call);
        # with others still running, their replies of this iteration are gathered first.
        if self._running <= 1:
            self.flush()
        else:
            self.schedule_flush()

    def close(self) -> None:
        """Send what is queued and close the connection."""
        self.flush()
        if self.transport is not None:
            self.transport.close()

    # events

    def _parse_headers(self, headers: list[tuple[bytes, bytes]]) -> _Parsed:
        """(path, method, content-type, grpc-timeout, metadata) of a request header list.

        The core hands out the same list object for a repeated header block: the last result is
        kept for it (the metadata dict is copied per call).
        """
        if headers is self._parsed_for:
            parsed = self._parsed
            return parsed[0], parsed[1], parsed[2], parsed[3], dict(parsed[4]) if parsed[4] else {}
        path = method = ctype = timeout = None
        metadata: dict[str, str] = {}
        for name, value in headers:
            if name[0] == 58:  # b":"
                if name == b":path":
                    path = value
                elif name == b":method":
                    method = value
            elif name == b"content-type":
                ctype = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name in _NOT_METADATA or name.endswith(b"-bin"):
                continue
            else:
                key = name.decode("latin-1")
                if key not in metadata:
                    metadata[key] = value.decode("latin-1")
        self._parsed_for = headers
        self._parsed = (path, method, ctype, timeout, metadata)
        return path, method, ctype, timeout, dict(metadata) if metadata else {}

    def _on_request(self, ev: RequestReceived) -> None:
        listener = self._listener
        sid = ev.stream_id
        path, method, ctype, timeout, metadata = self._parse_headers(ev.headers)
        if method != b"POST":
            self._early_reply(sid, b"405", Code.INTERNAL, f"invalid gRPC request method {_q(method)}")
            return
        if ctype is None or not (ctype == b"application/grpc" or ctype[:17] in (b"application/grpc+",
                                                                                  b"application/grpc;")):
            self._early_reply(sid, b"415", Code.INTERNAL, f"invalid gRPC request content-type {_q(ctype)}")
            return
        binding = listener._bindings.get(path)  # type: ignore[arg-type]
        if binding is None:
            text = _unknown_method_text(path.decode("latin-1") if path else "", listener._services)
            self.h2.send_trailers(sid, status_block(Code.UNIMPLEMENTED, text, trailers_only=True))
            return
        deadline = None
        seconds = 0.0
        if timeout is not None:
            try:
                seconds = parse_timeout(timeout)
            except ValueError as exc:
                self.h2.send_trailers(sid, status_block(
                    Code.INTERNAL, f"transport: {exc}", trailers_only=True))
                listener._done(binding, Code.INTERNAL)
                return
            deadline = time.monotonic() + seconds
        ctx = CallContext(metadata=metadata, peer=self.peer, deadline=deadline)
        call = _Call(self, sid, binding, ctx)
        self.calls[sid] = call
        if binding.kind is not Kind.UNARY:
            self.streaming += 1
        if listener._closing:
            # Arrived after our GOAWAY was decided: not executed, so the client may safely retry it.
            self.end_with_error(call, Code.UNAVAILABLE, _SHUTTING_DOWN)
            return
        if deadline is not None:
            call.timer = self._loop.call_later(seconds, self._expire, call)
        if binding.kind is Kind.BIDI_STREAM:
            call.requests = _Requests(call)
            self._start_task(call, self._run_streaming(call, call.requests))
        elif ev.end_stream:
            self.end_with_error(call, Code.INTERNAL, "grpc: client sent no request message")

    def _early_reply(self, sid: int, status: bytes, code: Code, message: str) -> None:
        block = encode_headers([(b":status", status), (b"content-type", b"text/plain; charset=utf-8")])
        self.h2.send_trailers(sid, block + status_block(code, message, trailers_only=False))

    def _on_data(self, ev: DataReceived) -> None:
        call = self.calls.get(ev.stream_id)
        if call is None:
            return  # a stream we already answered (the core acknowledges nothing for it)
        data = ev.data
        if data:
            bidi = call.requests is not None
            if not bidi:
                # One request message: its bytes are consumed into the reader (bounded by the
                # message size limit), so the window re-opens as they arrive.
                self.h2.acknowledge_received_data(call.sid, len(data))
                if call.got_request:
                    data = b""  # more than one request message on a unary call: ignored, as grpc-go does
            elif call.requests is not None and len(call.requests) >= _BIDI_READ_AHEAD:
                call.deferred_ack += len(data)
            else:
                self.h2.acknowledge_received_data(call.sid, len(data))
            if data and not call.done:
                reader = call.reader
                if (reader is None and data[0] == 0 and len(data) >= 5
                        and int.from_bytes(data[1:5], "big") == len(data) - 5
                        and len(data) - 5 <= self._listener.max_recv_bytes):
                    messages = [data[5:]]  # the common case: one whole message in one DATA frame
                else:
                    if reader is None:
                        reader = call.reader = MessageReader(self._listener.max_recv_bytes)
                    try:
                        messages = reader.feed(data)
                    except EtcdError as exc:
                        self._read_failed(call, exc)
                        return
                for body in messages:
                    try:
                        request = call.binding.request_type.FromString(body)
                    except DecodeError as exc:
                        self._read_failed(call, EtcdError(Code.INTERNAL, f"grpc: error unmarshalling request: {exc}"))
                        return
                    if call.requests is not None:
                        call.requests.feed(request)
                    else:
                        call.got_request = True
                        self._start(call, request)
                        break
        if ev.end_stream and not call.done:
            if call.reader is not None and call.reader.partial:
                self._read_failed(call, UNEXPECTED_EOF)
            elif call.requests is not None:
                call.requests.finish(None)
            elif not call.got_request:
                self.end_with_error(call, Code.INTERNAL, "grpc: client sent no request message")

    def _read_failed(self, call: _Call, exc: EtcdError) -> None:
        if call.requests is not None:
            call.requests.finish(exc)
        call.cancel(exc.code, exc.message)

    def _on_reset(self, ev: StreamReset) -> None:
        call = self.calls.get(ev.stream_id)
        if call is None:
            return
        call.closed = True
        deadline = call.ctx.deadline
        # The client resets at its deadline, usually before our timer fires.
        code = Code.DEADLINE_EXCEEDED if deadline is not None and time.monotonic() >= deadline else Code.CANCELLED
        call.cancel(code, None)
        call.wake()

    def _on_terminated(self, ev: ConnectionTerminated) -> None:
        if ev.remote:
            if ev.error_code:
                log.debug("GOAWAY from %s: %s %r", self.peer, ev.error_code, ev.message)
            return  # the client opens no new streams; open ones go on
        log.debug("HTTP/2 connection error with %s: %s", self.peer, ev.message)
        for call in list(self.calls.values()):
            call.closed = True
            call.cancel(Code.CANCELLED, None)
        self.close()

    def _expire(self, call: _Call) -> None:
        call.timer = None
        call.cancel(Code.DEADLINE_EXCEEDED, "context deadline exceeded")

    # running handlers

    def _start(self, call: _Call, request: Any) -> None:
        binding = call.binding
        if binding.kind is Kind.SERVER_STREAM:
            self._start_task(call, self._run_streaming(call, request))
        elif binding.eager:
            try:
                coro = binding.func(request, call.ctx)
                try:
                    coro.send(None)
                except StopIteration as stop:
                    self._reply(call, stop.value)
                    return
                coro.close()
                raise RuntimeError(f"{binding.path}: a handler without await points suspended")
            except BaseException as exc:
                if not isinstance(exc, Exception | asyncio.CancelledError):
                    raise
                self._handler_failed(call, exc)
        else:
            self._start_task(call, self._run_unary(call, request))

    def _start_task(self, call: _Call, coro: Any) -> None:
        self._running += 1
        call.task = self._loop.create_task(coro)

    def task_ended(self, call: _Call) -> None:
        """A call's task is over (its coroutine's ``finally``, or a cancel before it started)."""
        self._running -= 1
        if call.requests is not None:
            call.requests.finish(None)
        if not call.done:
            code, message = call.abort if call.abort is not None else (Code.CANCELLED, None)
            self.end_with_error(call, code, message)

    async def _run_unary(self, call: _Call, request: Any) -> None:
        call.started = True
        try:
            reply = await call.binding.func(request, call.ctx)
        except (Exception, asyncio.CancelledError) as exc:
            self._handler_failed(call, exc)
        else:
            self._reply(call, reply)
        finally:
            self.task_ended(call)

    async def _run_streaming(self, call: _Call, arg: Any) -> None:
        """The task of a server-streaming call (``arg``: its request) or a bidi call (``arg``: its request
        stream): every response sent, then the OK trailers."""
        call.started = True
        try:
            await self._send_all(call, call.binding.func(arg, call.ctx))
        except (Exception, asyncio.CancelledError) as exc:
            self._handler_failed(call, exc)
        else:
            self._end_ok(call)
        finally:
            self.task_ended(call)

    async def _send_all(self, call: _Call, responses: AsyncIterator[Any]) -> None:
        """Send every response, pausing while the stream cannot take more. A checkpoint."""
        h2 = self.h2
        sid = call.sid
        serialize = call.binding.serialize
        streak = 0
        try:
            mark = self.ticks
            async for response in responses:
                if call.closed:
                    raise asyncio.CancelledError  # the stream is gone; our cancel is on its way
                if not call.headers_sent:
                    call.headers_sent = True
                    h2.send_headers(sid, RESPONSE_HEADERS)
                payload = serialize(response)
                h2.send_data(sid, b"\x00" + len(payload).to_bytes(4, "big") + payload)
                self.schedule_flush()
                if h2.buffered(sid) or not self._writable:
                    streak = 0
                    while (h2.buffered(sid) or not self._writable) and not call.closed:
                        call.waiter = self._loop.create_future()
                        try:
                            await call.waiter
                        finally:
                            call.waiter = None
                elif self.ticks == mark:
                    streak += 1
                    if streak >= _YIELD_EVERY:  # the iterator never suspends: let other calls run
                        streak = 0
                        await asyncio.sleep(0)
                else:
                    streak = 0
                mark = self.ticks
        finally:
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()

    def _handler_failed(self, call: _Call, exc: BaseException) -> None:
        binding = call.binding
        message: str | None
        if isinstance(exc, EtcdError):
            code, message = exc.code, exc.message
        elif isinstance(exc, asyncio.CancelledError):
            if call.abort is not None:
                code, message = call.abort
            else:
                # Not cancelled by us: the service let a stray CancelledError escape (e.g. it
                # awaited a future someone else cancelled). Answer instead of hanging the client.
                log.warning("%s raised CancelledError without being cancelled", binding.path, exc_info=True)
                code, message = Code.CANCELLED, "context canceled"
        elif isinstance(exc, StreamClosedError):
            code, message = Code.CANCELLED, None
        else:
            log.error("%s failed", binding.path, exc_info=exc)
            code, message = Code.UNKNOWN, str(exc)
        self.end_with_error(call, code, message)

    def _reply(self, call: _Call, reply: Any) -> None:
        if call.done:
            return
        if call.closed:
            self._finish(call, Code.CANCELLED)
            return
        try:
            payload = call.binding.serialize(reply)
        except Exception as exc:
            self._handler_failed(call, exc)
            return
        data = b"\x00" + len(payload).to_bytes(4, "big") + payload
        if call.headers_sent:
            self.h2.send_data(call.sid, data)
            self.h2.send_trailers(call.sid, TRAILERS_OK)
        else:
            self.h2.send_response(call.sid, RESPONSE_HEADERS, data, TRAILERS_OK)
        if call.task is not None:
            self._sent_from_task()
        self._finish(call, Code.OK)

    def _end_ok(self, call: _Call) -> None:
        if call.done:
            return
        if call.closed:
            self._finish(call, Code.CANCELLED)
            return
        self.h2.send_trailers(call.sid, TRAILERS_OK if call.headers_sent else RESPONSE_HEADERS + TRAILERS_OK)
        self._sent_from_task()
        self._finish(call, Code.OK)

    def end_with_error(self, call: _Call, code: Code, message: str | None) -> None:
        """End the call with a status (``message`` None: the stream is gone, send nothing)."""
        if call.done:
            return
        if message is not None and not call.closed and self.h2.is_open(call.sid):
            self.h2.send_trailers(call.sid, status_block(code, message, trailers_only=not call.headers_sent))
            if call.task is not None:
                self._sent_from_task()
        elif not call.closed:
            self.h2.reset_stream(call.sid, ErrorCode.CANCEL)
            self.schedule_flush()
        self._finish(call, code)

    def _finish(self, call: _Call, code: Code) -> None:
        call.done = True
        if self.calls.get(call.sid) is call:
            del self.calls[call.sid]
            if call.binding.kind is not Kind.UNARY:
                self.streaming -= 1
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        self._listener._done(call.binding, code)


def _q(value: bytes | None) -> str:
    return json.dumps("" if value is None else value.decode("latin-1"))


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
    stalled request) is closed after that long. ``max_concurrent_streams``: advertised to and
    enforced on every HTTP/2 connection (etcd's default: 2^32-1). ``http_max_body_bytes``: the
    largest HTTP/1.1 request body (default: ``max_recv_bytes``; None: no limit, the app bounds it).
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
        http_max_body_bytes: int | None = -1,
    ) -> None:
        app = DefaultHttpApp() if http_app is None else http_app
        # HTTP/1.1 request bodies: -1 = the gRPC limit; None = unlimited here (the app bounds them:
        # the JSON gateway's stream bodies are endless, only each message in them is bounded).
        self.http_max_body_bytes = max_recv_bytes if http_max_body_bytes == -1 else http_max_body_bytes
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
        bindings: dict[bytes, _Binding] = {}
        for method in methods:
            key = method.path.encode()
            if key in bindings:
                raise ValueError(f"duplicate method {method.path}")
            bindings[key] = _Binding(method)
        self._bindings = bindings
        self._services = frozenset(m.path.split("/")[1] for m in methods)

        self._server: asyncio.AbstractServer | None = None
        self._port = 0
        self._sniffers: set[_Sniffer] = set()
        self._h2: set[_GrpcConnection] = set()
        self._http: set[_HttpConnection] = set()
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
        self._server = await loop.create_server(lambda: _Sniffer(self), host, port, reuse_address=True)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting and close every connection.

        gRPC clients get a GOAWAY (so they reconnect elsewhere for new calls); stream calls are
        ended at once (UNAVAILABLE), unary calls in flight get up to ``grace`` seconds to finish,
        then everything left is cancelled and every connection closed. Returns when all is done.
        """
        if self._server is None or self._closed is None:
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
            conns = list(self._h2)
            for conn in conns:
                conn.h2.goaway()
                for call in list(conn.calls.values()):
                    if call.binding.kind is not Kind.UNARY or call.task is None:
                        call.cancel(Code.UNAVAILABLE, _SHUTTING_DOWN)
                conn.flush()
            unary = [c.task for conn in conns for c in conn.calls.values() if c.task is not None]
            if unary and grace > 0:
                await asyncio.wait(unary, timeout=grace)
            tasks = []
            for conn in conns:
                for call in list(conn.calls.values()):
                    call.cancel(Code.UNAVAILABLE, _SHUTTING_DOWN)
                    if call.task is not None:
                        tasks.append(call.task)
            waiters: list[asyncio.Future[Any]] = [t for t in tasks if not t.done()]
            waiters += [c.task for c in self._http if c.task is not None]
            if waiters:
                _, pending = await asyncio.wait(waiters, timeout=max(grace, 1.0))
                if pending:
                    log.warning("%d RPC handler(s) ignored cancellation at close", len(pending))
            for conn in conns:
                conn.close()
            for http_conn in list(self._http):
                http_conn.abort()
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
        """HTTP/2 streams clients have open on this listener now, answered or not, except the
        long-lived streaming calls (watches, keep-alives), which do not make a write concurrent.

        Counted from the HTTP/2 state, so requests read in the same socket read as the current
        one are included even before their handlers ran (the write path uses this to tell a
        lone write from a burst).
        """
        return sum(max(0, conn.h2.open_streams - conn.streaming) for conn in self._h2)

    def _grpc_protocol(self, transport: asyncio.Transport) -> asyncio.Protocol:
        proto = _GrpcConnection(self)
        proto.connection_made(transport)
        return proto

    def _http_protocol(self, transport: asyncio.Transport) -> asyncio.Protocol:
        proto = _HttpConnection(self)
        proto.connection_made(transport)
        return proto

    def _done(self, binding: _Binding, code: Code) -> None:
        if self._on_rpc_done is not None:
            try:
                self._on_rpc_done(binding.path, binding.kind, code)
            except Exception:
                log.exception("on_rpc_done callback failed")

    async def _health_check(self, request: Any, ctx: CallContext) -> Any:
        status = self._health.get(request.service)
        if status is None:
            raise EtcdError(Code.NOT_FOUND, "unknown service")
        return HealthCheckResponse(status=status)


# --------------------------------------------------------------------------------------------------
# protocol sniffing


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
        self._streaming = False  # a streamed (chunked) reply is being sent
        self._eof = False
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
        # (gateway) A client that goes away during a streamed reply (e.g. a watch over HTTP) cancels it,
        # as Go's net/http cancels the request context on EOF; otherwise it would live until a write fails.
        self._eof = True
        if self._streaming and self.task is not None and not self.task.done():
            self.task.cancel()
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
                limit = self._listener.http_max_body_bytes
                if limit is not None and self._body_size > limit:
                    raise BodyTooLarge(f"request body larger than {limit} bytes")
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
            # (gateway) One socket write per reply, not three: ~25 us each on the gateway's hot path.
            events: list[Any] = [self._response_event(response.status, headers)]
            if body and with_body:
                events.append(h11.Data(data=bytes(body)))
            events.append(h11.EndOfMessage())
            data = b"".join(self._h11.send(event) or b"" for event in events)
            if self._transport is not None and not self._lost:
                self._transport.write(data)
            return True
        self._write(self._response_event(response.status, headers))
        try:
            if with_body:
                if self._eof:
                    raise ConnectionResetError("client went away")
                self._streaming = True
                await self._stream_body(body)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("HTTP %s %s: response stream failed", request.method, request.target)
            return False  # the reply is cut short: closing the connection tells the client
        finally:
            self._streaming = False
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
        self._write(h11.EndOfMessage(headers=response.trailers))
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
