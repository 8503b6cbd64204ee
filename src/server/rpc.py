"""Transport-neutral description of the RPC surface.

Services are plain async functions; a :class:`Method` names one of them with its
gRPC path, cardinality and message types. The gRPC adapter and the JSON gateway
both bind the same list, so one implementation serves both encodings.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Kind(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    BIDI_STREAM = "bidi_stream"


@dataclass(slots=True)
class CallContext:
    """What a service may know about the call: metadata and the peer, nothing of the transport.

    ``deadline`` is an absolute ``time.monotonic()`` value or ``None``.
    """

    metadata: Mapping[str, str] = field(default_factory=dict)
    peer: str = ""
    deadline: float | None = None


Unary = Callable[[Any, CallContext], Awaitable[Any]]
ServerStream = Callable[[Any, CallContext], AsyncIterator[Any]]
BidiStream = Callable[[AsyncIterator[Any], CallContext], AsyncIterator[Any]]


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC: ``path`` is the gRPC path, e.g. ``/etcdserverpb.KV/Range``."""

    path: str
    kind: Kind
    request_type: type[Any]
    response_type: type[Any]
    func: Unary | ServerStream | BidiStream

    @property
    def service(self) -> str:
        return self.path.split("/")[1]

    @property
    def name(self) -> str:
        return self.path.split("/")[2]
