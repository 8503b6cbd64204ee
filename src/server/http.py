"""The HTTP/1.1 side of the client port: the interface the listener calls, and a default app.

The listener (:mod:`coord_server.transport`) owns the socket and the h11 state machine; an app
only sees :class:`HttpRequest` and answers with :class:`HttpResponse`. A response body is either
``bytes`` (sent with Content-Length) or an async iterable of chunks (sent with chunked transfer
encoding, each chunk flushed as soon as it is yielded: the shape of the gateway's streaming
replies, e.g. watch as newline-delimited JSON). The request body is read on demand, so a
handler can start answering while the client is still sending (gateway bidi streams).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol, runtime_checkable

from ._version import CLUSTER_VERSION, SERVER_VERSION

__all__ = [
    "CORS_HEADERS",
    "BodyTooLarge",
    "DefaultHttpApp",
    "HttpApp",
    "HttpHandler",
    "HttpRequest",
    "HttpResponse",
    "go_headers",
    "text_response",
]


class BodyTooLarge(Exception):
    """The request body is larger than the listener's limit (answered 413 if it escapes the app)."""


@dataclass(slots=True, eq=False)
class HttpRequest:
    """One HTTP/1.1 request. ``headers`` names are lower-cased; values are latin-1 decoded."""

    method: str
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    peer: str = ""
    http_version: str = "1.1"
    _receive: Callable[[], Awaitable[bytes]] | None = field(default=None, repr=False)
    _consumed: bool = field(default=False, repr=False)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    async def chunks(self) -> AsyncIterator[bytes]:
        """The request body as it arrives (each chunk non-empty). Can be consumed once."""
        if self._consumed:
            raise RuntimeError("request body already consumed")
        self._consumed = True
        if self._receive is None:
            return
        while True:
            chunk = await self._receive()
            if not chunk:
                return
            yield chunk

    async def body(self) -> bytes:
        """The whole request body (raises :class:`BodyTooLarge` over the listener's limit)."""
        return b"".join([chunk async for chunk in self.chunks()])


@dataclass(slots=True, eq=False)
class HttpResponse:
    """``body``: bytes (Content-Length) or an async iterable of chunks (chunked, flushed per chunk).

    The listener adds ``Date``, and ``Content-Length`` for a bytes body; it never overrides a
    header the app set. ``trailers`` are sent after a chunked body (HTTP/1.1 only; announce them
    in a ``Trailer`` header), e.g. the gateway's ``Grpc-Trailer-Content-Type``.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterable[bytes] = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)


@runtime_checkable
class HttpApp(Protocol):
    """What the listener calls for every HTTP/1.1 request (and for nothing that is gRPC)."""

    async def handle(self, request: HttpRequest) -> HttpResponse: ...


HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]
"""A bare async function is accepted wherever an :class:`HttpApp` is."""


CORS_HEADERS: list[tuple[str, str]] = [
    ("Access-Control-Allow-Headers", "accept, content-type, authorization"),
    ("Access-Control-Allow-Methods", "POST, GET, OPTIONS, PUT, DELETE"),
    ("Access-Control-Allow-Origin", "*"),
]
"""etcd 3.4 puts these on every HTTP response of the client port (gateway, /version, 404s)."""


def go_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers in the order Go's net/http writes them (sorted by name; Date/Content-Length come after)."""
    return sorted(headers, key=lambda item: item[0])


def text_response(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    """A text/plain reply shaped like Go's ``http.Error`` (etcd's 404/405 bodies); ``headers`` are added."""
    return HttpResponse(
        status,
        go_headers(
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("X-Content-Type-Options", "nosniff"),
                *(headers or []),
            ]
        ),
        text.encode(),
    )


NOT_FOUND_TEXT = "404 page not found\n"


class DefaultHttpApp:
    """etcd's ``/version``; ``404 page not found`` for everything else (CORS headers on all, as etcd).

    The gateway replaces it (and can delegate the paths it does not own to it).
    """

    def __init__(self) -> None:
        self._version = json.dumps(
            {"etcdserver": SERVER_VERSION, "etcdcluster": CLUSTER_VERSION}, separators=(",", ":")
        ).encode()

    async def handle(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/version":
            if request.method != "GET":
                # etcd's allowMethod(): http.Error(w, "Method Not Allowed", 405) with Allow.
                return text_response(
                    HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n", [*CORS_HEADERS, ("Allow", "GET")]
                )
            return HttpResponse(200, go_headers([*CORS_HEADERS, ("Content-Type", "application/json")]), self._version)
        return text_response(HTTPStatus.NOT_FOUND, NOT_FOUND_TEXT, CORS_HEADERS)
