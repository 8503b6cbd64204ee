"""etcd 3.4's JSON gateway (grpc-gateway v1) over the transport-neutral :class:`~coord_server.rpc.Method` list.

The HTTP routing; the JSON codec (sans-io) is gateway_codec.py. :class:`Gateway` maps etcd's HTTP
paths (``/v3/kv/range``, the ``/v3/kv/lease/*`` aliases, ``/v3/watch`` ...) to Methods and calls the
very ``func`` the gRPC transport calls, so both encodings run one implementation.
:class:`ClientHttpApp` is everything etcd serves over HTTP/1.1 on a client URL: the gateway under
``/v3/`` and ``/v3beta/``, ``/health``, ``/metrics``, ``/version``, with etcd's CORS headers, Go
``ServeMux`` path cleaning and 404/405 answers.

Statuses and bodies follow grpc-gateway v1.9 as etcd 3.4.23 ships it: an error from a service is
``{"error": msg, "message": msg, "code": N}`` with the HTTP status of the gRPC code (and, like the
trailers-only gRPC reply behind it, a ``Grpc-Trailer-Content-Type`` trailer); a request that does not
decode is 400 (code 3), or 500 (code 2) on a bidi stream; streams answer ``{"result": ...}`` lines and
end with a ``{"error": {...}}`` object if the call fails.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, cast

from google.protobuf.message import Message

from .errors import Code, EtcdError, message_too_large
from .gateway_codec import JsonError, JsonStream, decode_message, encode_message, go_json_string
from .http import CORS_HEADERS, DefaultHttpApp, HttpRequest, HttpResponse, go_headers, text_response
from .rpc import CallContext, Kind, Method

if TYPE_CHECKING:
    from .node import Node

__all__ = [
    "GATEWAY_ROUTES",
    "ClientHttpApp",
    "Gateway",
    "go_clean_path",
    "http_status",
]

log = logging.getLogger(__name__)

RpcDone = Callable[[str, Kind, Code], None]

# --------------------------------------------------------------------------------------------------
# Routes: etcd 3.4's google.api.http annotations (every route is POST with body "*").

_KV = "/etcdserverpb.KV/"
_WATCH = "/etcdserverpb.Watch/"
_LEASE = "/etcdserverpb.Lease/"
_CLUSTER = "/etcdserverpb.Cluster/"
_MAINT = "/etcdserverpb.Maintenance/"
_AUTH = "/etcdserverpb.Auth/"
_LOCK = "/v3lockpb.Lock/"
_ELECTION = "/v3electionpb.Election/"

GATEWAY_ROUTES: Final[dict[str, str]] = {
    "kv/range": _KV + "Range",
    "kv/put": _KV + "Put",
    "kv/deleterange": _KV + "DeleteRange",
    "kv/txn": _KV + "Txn",
    "kv/compaction": _KV + "Compact",
    "watch": _WATCH + "Watch",
    "lease/grant": _LEASE + "LeaseGrant",
    "lease/revoke": _LEASE + "LeaseRevoke",
    "kv/lease/revoke": _LEASE + "LeaseRevoke",
    "lease/keepalive": _LEASE + "LeaseKeepAlive",
    "lease/timetolive": _LEASE + "LeaseTimeToLive",
    "kv/lease/timetolive": _LEASE + "LeaseTimeToLive",
    "lease/leases": _LEASE + "LeaseLeases",
    "kv/lease/leases": _LEASE + "LeaseLeases",
    "cluster/member/add": _CLUSTER + "MemberAdd",
    "cluster/member/remove": _CLUSTER + "MemberRemove",
    "cluster/member/update": _CLUSTER + "MemberUpdate",
    "cluster/member/list": _CLUSTER + "MemberList",
    "cluster/member/promote": _CLUSTER + "MemberPromote",
    "maintenance/alarm": _MAINT + "Alarm",
    "maintenance/status": _MAINT + "Status",
    "maintenance/defragment": _MAINT + "Defragment",
    # Hash and HashKV share this path in etcd's annotations; Hash is registered first and wins.
    "maintenance/hash": _MAINT + "Hash",
    "maintenance/snapshot": _MAINT + "Snapshot",
    "maintenance/transfer-leadership": _MAINT + "MoveLeader",
    "auth/enable": _AUTH + "AuthEnable",
    "auth/disable": _AUTH + "AuthDisable",
    "auth/authenticate": _AUTH + "Authenticate",
    "auth/user/add": _AUTH + "UserAdd",
    "auth/user/get": _AUTH + "UserGet",
    "auth/user/list": _AUTH + "UserList",
    "auth/user/delete": _AUTH + "UserDelete",
    "auth/user/changepw": _AUTH + "UserChangePassword",
    "auth/user/grant": _AUTH + "UserGrantRole",
    "auth/user/revoke": _AUTH + "UserRevokeRole",
    "auth/role/add": _AUTH + "RoleAdd",
    "auth/role/get": _AUTH + "RoleGet",
    "auth/role/list": _AUTH + "RoleList",
    "auth/role/delete": _AUTH + "RoleDelete",
    "auth/role/grant": _AUTH + "RoleGrantPermission",
    "auth/role/revoke": _AUTH + "RoleRevokePermission",
    "lock/lock": _LOCK + "Lock",
    "lock/unlock": _LOCK + "Unlock",
    "election/campaign": _ELECTION + "Campaign",
    "election/proclaim": _ELECTION + "Proclaim",
    "election/leader": _ELECTION + "Leader",
    "election/observe": _ELECTION + "Observe",
    "election/resign": _ELECTION + "Resign",
}
"""HTTP path below ``/v3/`` → gRPC method path."""

# The gateway's message types for paths whose service is not registered yet: the body is still
# decoded (a bad body answers 400 before the missing service answers 501), as etcd's gateway does.
_KINDS: Final[dict[str, Kind]] = {
    _WATCH + "Watch": Kind.BIDI_STREAM,
    _LEASE + "LeaseKeepAlive": Kind.BIDI_STREAM,
    _MAINT + "Snapshot": Kind.SERVER_STREAM,
    _ELECTION + "Observe": Kind.SERVER_STREAM,
}


def _request_types() -> dict[str, type[Message]]:
    from coord._pb import rpc_pb2, v3election_pb2, v3lock_pb2

    out: dict[str, type[Message]] = {}
    for module in (rpc_pb2, v3lock_pb2, v3election_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out[f"/{service.full_name}/{m.name}"] = getattr(module, m.input_type.name)
    return out


_REQUEST_TYPES: Final = _request_types()

# --------------------------------------------------------------------------------------------------
# HTTP status of a gRPC code (grpc-gateway v1 runtime.HTTPStatusFromCode)

_HTTP_STATUS: Final[dict[Code, int]] = {
    Code.OK: 200,
    Code.CANCELLED: 408,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.UNAUTHENTICATED: 401,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 412,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
}


def http_status(code: Code) -> int:
    """The HTTP status grpc-gateway v1 answers for a gRPC status code."""
    return _HTTP_STATUS.get(code, 500)


# ==================================================================================================
# HTTP


_JSON: Final = "application/json"
_GRPC_METADATA: Final = ("Grpc-Metadata-Content-Type", "application/grpc")
_TRAILER: Final = ("Trailer", "Grpc-Trailer-Content-Type")
_TRAILERS: Final = [("Grpc-Trailer-Content-Type", "application/grpc")]
_NOT_FOUND_TEXT: Final = "404 page not found\n"


def _json_headers(*extra: tuple[str, str]) -> list[tuple[str, str]]:
    return go_headers([*CORS_HEADERS, ("Content-Type", _JSON), *extra])


def _error_body(code: Code, message: str) -> bytes:
    m = go_json_string(message)
    return f'{{"error":{m},"message":{m},"code":{int(code)}}}'.encode()


def _stream_error_chunk(code: Code, message: str) -> bytes:
    status = http_status(code)
    return (f'{{"error":{{"grpc_code":{int(code)},"http_code":{status},"message":{go_json_string(message)},'
            f'"http_status":{go_json_string(HTTPStatus(status).phrase)}}}}}').encode()


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _error_response(request: HttpRequest, code: Code, message: str, *, from_call: bool) -> HttpResponse:
    """grpc-gateway's DefaultHTTPError. ``from_call``: the error came back from the gRPC call, whose
    trailers-only reply carried a content-type that grpc-gateway forwards as a trailer (chunked body)."""
    body = _error_body(code, message)
    if from_call and request.http_version == "1.1":
        return HttpResponse(http_status(code), _json_headers(_TRAILER), _one_chunk(body), trailers=list(_TRAILERS))
    return HttpResponse(http_status(code), _json_headers(), body)


def _metadata(request: HttpRequest) -> dict[str, str]:
    """gRPC metadata grpc-gateway derives from the request headers (authorization, Grpc-Metadata-*)."""
    md: dict[str, str] = {}
    for name, value in request.headers:
        if name == "authorization":
            md.setdefault("authorization", value)
        elif name.startswith("grpc-metadata-"):
            md.setdefault(name[len("grpc-metadata-") :], value)
    if request.peer:
        md.setdefault("x-forwarded-for", request.peer.rpartition(":")[0].strip("[]"))
    return md


class _Body:
    """The request body with a size limit (413 past it)."""

    def __init__(self, request: HttpRequest, limit: int) -> None:
        self._chunks = request.chunks()
        self._limit = limit
        self.size = 0

    async def read_all(self) -> bytes:
        """The whole body. Raises _TooLarge past the limit, ConnectionResetError if the body stalls."""
        parts = []
        try:
            async for chunk in self._chunks:
                self.size += len(chunk)
                if self.size > self._limit:
                    raise _TooLarge
                parts.append(chunk)
        except TimeoutError:
            # The listener's idle timeout expired mid-body (a slow or stuck client): drop the connection.
            raise ConnectionResetError("request body stalled") from None
        return b"".join(parts)

    async def next_chunk(self) -> bytes:
        """The next body chunk, b"" at the end."""
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return b""


class _TooLarge(Exception):
    pass


_TOO_LARGE: Final = "Request Entity Too Large\n"


class Gateway:
    """The JSON gateway over ``methods``: ``handle(request, path)`` for a path below ``/v3/``.

    ``on_rpc_done(path, kind, code)`` is called once per finished call (the same hook the gRPC
    transport calls, so ``grpc_server_handled_total`` counts gateway calls too, as etcd's loopback
    gateway does). ``max_recv_bytes``: the largest request message (grpc-go's receive limit, answered
    429 as etcd does). ``max_body_bytes``: the largest unary body read at all (413 past it); a
    stream's body may be endless, but each of its messages is bounded the same way.
    """

    def __init__(self, methods: Sequence[Method], *, max_recv_bytes: int, max_body_bytes: int | None = None,
                 on_rpc_done: RpcDone | None = None) -> None:
        self._methods = {m.path: m for m in methods}
        self._services = frozenset(m.service for m in methods)
        self.max_recv_bytes = max_recv_bytes
        self.max_body_bytes = max_body_bytes if max_body_bytes is not None else 3 * max_recv_bytes
        self._on_rpc_done = on_rpc_done
        self.in_flight = 0  # unary calls running now (the write path's concurrency hint counts them)

    def method(self, grpc_path: str) -> Method | None:
        return self._methods.get(grpc_path)

    async def handle(self, request: HttpRequest, route: str) -> HttpResponse:
        """Answer a request for ``/v3/<route>`` (the path already cleaned and de-prefixed)."""
        grpc_path = GATEWAY_ROUTES.get(route)
        if grpc_path is None:
            return text_response(HTTPStatus.NOT_FOUND, "Not Found\n", CORS_HEADERS)
        if request.method != "POST":
            return text_response(HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n", CORS_HEADERS)
        method = self._methods.get(grpc_path)
        kind = method.kind if method is not None else _KINDS.get(grpc_path, Kind.UNARY)
        request_type: type[Message] = method.request_type if method is not None else _REQUEST_TYPES[grpc_path]
        body = _Body(request, self.max_body_bytes)
        if kind is Kind.BIDI_STREAM:
            return await self._bidi(request, grpc_path, method, request_type, body)
        try:
            raw = await body.read_all()
        except _TooLarge:
            return text_response(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _TOO_LARGE, CORS_HEADERS)
        try:
            message = decode_message(raw, request_type)
        except JsonError as exc:
            return _error_response(request, Code.INVALID_ARGUMENT, exc.message, from_call=False)
        if kind is Kind.SERVER_STREAM:
            return await self._server_stream(request, grpc_path, method, message)
        return await self._unary(request, grpc_path, method, message)

    # -- calls ---------------------------------------------------------------------------------

    def _unimplemented(self, grpc_path: str) -> EtcdError:
        service, _, name = grpc_path[1:].partition("/")
        if service in self._services:
            return EtcdError(Code.UNIMPLEMENTED, f"unknown method {name} for service {service}")
        return EtcdError(Code.UNIMPLEMENTED, f"unknown service {service}")

    def _done(self, grpc_path: str, kind: Kind, code: Code) -> None:
        if self._on_rpc_done is not None:
            try:
                self._on_rpc_done(grpc_path, kind, code)
            except Exception:
                log.exception("on_rpc_done callback failed")

    def _check_size(self, message: Message) -> None:
        size = message.ByteSize()
        if size > self.max_recv_bytes:
            raise message_too_large(size, self.max_recv_bytes)

    async def _unary(self, request: HttpRequest, grpc_path: str, method: Method | None,
                     message: Message) -> HttpResponse:
        code = Code.OK
        try:
            if method is None:
                raise self._unimplemented(grpc_path)
            self._check_size(message)
            self.in_flight += 1
            try:
                reply = await cast(Any, method.func)(message, CallContext(_metadata(request), request.peer))
            finally:
                self.in_flight -= 1
            if type(reply) is bytes:
                reply = method.response_type.FromString(reply)
            text = encode_message(reply)
        except EtcdError as exc:
            code = exc.code
            return _error_response(request, exc.code, exc.message, from_call=True)
        except asyncio.CancelledError:
            code = Code.CANCELLED
            raise
        except Exception as exc:
            code = Code.UNKNOWN
            log.exception("%s (gateway) failed", grpc_path)
            return _error_response(request, Code.UNKNOWN, str(exc), from_call=True)
        finally:
            if method is not None or code is not Code.OK:
                self._done(grpc_path, method.kind if method is not None else Kind.UNARY, code)
        return HttpResponse(200, _json_headers(_GRPC_METADATA), text.encode())

    async def _server_stream(self, request: HttpRequest, grpc_path: str, method: Method | None,
                             message: Message) -> HttpResponse:
        def start() -> AsyncIterator[Any]:
            if method is None:
                raise self._unimplemented(grpc_path)
            self._check_size(message)
            func = cast(Callable[[Message, CallContext], AsyncIterator[Any]], method.func)
            return func(message, CallContext(_metadata(request), request.peer))

        return await self._stream_response(grpc_path, Kind.SERVER_STREAM, start)

    async def _bidi(self, request: HttpRequest, grpc_path: str, method: Method | None,
                    request_type: type[Message], body: _Body) -> HttpResponse:
        reader = JsonStream(request_type, self.max_body_bytes)

        async def next_message() -> Message | None:
            while True:
                msg = reader.next()
                if msg is not None:
                    return msg
                if reader.ended:
                    return None
                chunk = await body.next_chunk()
                if chunk:
                    reader.feed(chunk)
                else:
                    reader.close()

        # The first request decides the status: a body that does not decode fails the call before the
        # stream is used (grpc-gateway answers it as an Unknown error, 500).
        try:
            first = await next_message()
        except JsonError as exc:
            return _error_response(request, Code.UNKNOWN, exc.message, from_call=False)
        except TimeoutError:
            raise ConnectionResetError("request body stalled") from None

        async def requests() -> AsyncIterator[Any]:
            if first is None:
                return
            self._check_size(first)
            yield first
            while True:
                try:
                    msg = await next_message()
                except Exception as exc:
                    # grpc-gateway stops forwarding at a later bad message or a body read error (client
                    # gone, idle body, broken chunking) and half-closes the call; replies keep flowing.
                    log.debug("%s (gateway): request stream ended: %r", grpc_path, exc)
                    return
                if msg is None:
                    return
                self._check_size(msg)
                yield msg

        def start() -> AsyncIterator[Any]:
            if method is None:
                raise self._unimplemented(grpc_path)
            return cast(AsyncIterator[Any], method.func(requests(), CallContext(_metadata(request), request.peer)))

        # With no request at all, grpc-gateway never asks for the reply headers (no Grpc-Metadata-*);
        # Go still sends the status line only with the first reply (or at the end).
        return await self._stream_response(grpc_path, Kind.BIDI_STREAM, start, forward_metadata=first is not None)

    async def _stream_response(self, grpc_path: str, kind: Kind, start: Callable[[], AsyncIterator[Any]], *,
                               forward_metadata: bool = True) -> HttpResponse:
        method = self.method(grpc_path)
        response_type = method.response_type if method is not None else None
        """Start the call; answer once its first reply (or its end, or its error) is known: Go writes the
        status line with the first body bytes, and an error before any reply sets the status."""
        state = {"code": Code.OK}
        responses: AsyncIterator[Any] | None = None
        first: Any = None
        error: EtcdError | None = None
        ended = False
        try:
            responses = start()
            try:
                first = await responses.__anext__()
            except StopAsyncIteration:
                ended = True
        except EtcdError as exc:
            error = exc
        except asyncio.CancelledError:
            await _aclose(responses)
            self._done(grpc_path, kind, Code.CANCELLED)
            raise
        except Exception as exc:
            log.exception("%s (gateway) failed", grpc_path)
            error = EtcdError(Code.UNKNOWN, str(exc))

        if error is not None:
            await _aclose(responses)
            self._done(grpc_path, kind, error.code)
            return HttpResponse(http_status(error.code), _json_headers(),
                                _one_chunk(_stream_error_chunk(error.code, error.message)))

        headers = _json_headers(_GRPC_METADATA) if first is not None and forward_metadata else _json_headers()

        async def lines() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield _result_line(first, response_type)
                if responses is not None and not ended:
                    async for item in responses:
                        yield _result_line(item, response_type)
            except EtcdError as exc:
                state["code"] = exc.code
                yield _stream_error_chunk(exc.code, exc.message)
            except asyncio.CancelledError:
                state["code"] = Code.CANCELLED
                raise
            except GeneratorExit:
                state["code"] = Code.CANCELLED
                raise
            except Exception as exc:
                log.exception("%s (gateway) failed", grpc_path)
                state["code"] = Code.UNKNOWN
                yield _stream_error_chunk(Code.UNKNOWN, str(exc))
            finally:
                await _aclose(responses)
                self._done(grpc_path, kind, state["code"])

        return HttpResponse(200, headers, lines())


def _result_line(item: Any, response_type: type[Message] | None) -> bytes:
    if type(item) is bytes:  # a service may hand the gRPC side pre-serialized replies (watch fan-out)
        if response_type is None:
            raise EtcdError(Code.INTERNAL, "gateway: pre-serialized reply of an unknown type")
        item = response_type.FromString(item)
    return ('{"result":' + encode_message(item) + "}\n").encode()


async def _aclose(it: object) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.exception("closing a service stream failed")


# ==================================================================================================
# The whole HTTP side of a client URL


def go_clean_path(p: str) -> str:
    """Go's ``net/http`` cleanPath: ``path.Clean`` that keeps a trailing slash."""
    if p == "":
        return "/"
    if p[0] != "/":
        p = "/" + p
    out: list[str] = []
    for part in p.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
            continue
        out.append(part)
    np = "/" + "/".join(out)
    if p.endswith("/") and np != "/":
        np += "/"
    return np


_Handler = Callable[[HttpRequest], Any]


class ClientHttpApp:
    """Everything etcd 3.4 answers over HTTP/1.1 on a client URL (see the module docstring).

    ``node``: for ``/health`` and ``/metrics``; ``methods``: what the gateway serves (the gRPC
    list); ``on_rpc_done``: the transport's metrics hook.
    """

    def __init__(self, node: Node, methods: Sequence[Method], *, on_rpc_done: RpcDone | None = None,
                 max_body_bytes: int | None = None) -> None:
        from .metrics import HealthEndpoint, MetricsEndpoint

        self.gateway = Gateway(methods, max_recv_bytes=node.config.max_recv_bytes(), max_body_bytes=max_body_bytes,
                               on_rpc_done=on_rpc_done)
        self._version = DefaultHttpApp()
        self._exact: dict[str, _Handler] = {
            "/health": HealthEndpoint(node).handle,
            "/metrics": MetricsEndpoint(node, methods).handle,
            "/version": self._version.handle,
        }

    async def handle(self, request: HttpRequest) -> HttpResponse:
        response = await self._route(request)
        if request.method == "HEAD" and isinstance(response.body, bytes):
            # Go announces the length of the body it does not send.
            if not any(k.lower() == "content-length" for k, _ in response.headers):
                response.headers.append(("Content-Length", str(len(response.body))))
        return response

    async def _route(self, request: HttpRequest) -> HttpResponse:
        if request.method == "OPTIONS":
            # etcd's CORS wrapper answers every preflight itself, whatever the path.
            return HttpResponse(200, go_headers([*CORS_HEADERS, ("Content-Length", "0")]), b"")
        raw_path = request.path
        path = urllib.parse.unquote(raw_path) if "%" in raw_path else raw_path
        clean = go_clean_path(path)
        if clean != path:
            return _redirect(request, clean)
        handler = self._exact.get(path)
        if handler is not None:
            return cast(HttpResponse, await handler(request))
        for prefix in ("/v3/", "/v3beta/"):
            if path.startswith(prefix):
                return await self.gateway.handle(request, path[len(prefix) :])
            if path == prefix[:-1]:
                return _redirect(request, prefix)
        return text_response(HTTPStatus.NOT_FOUND, _NOT_FOUND_TEXT, CORS_HEADERS)


def _redirect(request: HttpRequest, path: str) -> HttpResponse:
    """Go ServeMux's 301 to the cleaned path (an HTML note for GET/HEAD, nothing for other methods)."""
    location = urllib.parse.quote(path, safe="/:@!$&'()*+,;=-._~") + (f"?{request.query}" if request.query else "")
    headers = [*CORS_HEADERS, ("Location", location)]
    if request.method in ("GET", "HEAD"):
        body = f'<a href="{_html_escape(location)}">Moved Permanently</a>.\n\n'.encode()
        return HttpResponse(301, go_headers([*headers, ("Content-Type", "text/html; charset=utf-8")]), body)
    return HttpResponse(301, go_headers(headers), b"")


def _html_escape(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&#34;")
            .replace("'", "&#39;"))


def iter_routes() -> Iterable[tuple[str, str]]:
    """Every gateway route as (``/v3/...`` path, gRPC path)."""
    return (("/v3/" + route, grpc) for route, grpc in GATEWAY_ROUTES.items())
