"""gRPC over HTTP/2, sans-io: message framing, ``grpc-timeout``, status header blocks.

Pure functions and one small state machine (:class:`MessageReader`) used by the transport on top
of :class:`~coord_server.h2conn.H2Connection`. Error texts are grpc-go's, which is what etcd's
clients see from etcd.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from .errors import Code, EtcdError, message_too_large
from .h2conn import encode_headers

__all__ = [
    "RESPONSE_HEADERS",
    "TRAILERS_OK",
    "MessageReader",
    "frame_message",
    "parse_timeout",
    "percent_encode",
    "status_block",
]

# ":status: 200" is static-table entry 8 (indexed); content-type (static 31) as a literal without
# indexing. Neither touches the dynamic table, so these bytes are valid on any connection.
RESPONSE_HEADERS: Final = b"\x88" + b"\x0f\x10" + b"\x10application/grpc"
TRAILERS_OK: Final = encode_headers([(b"grpc-status", b"0")])

_PREFIX = struct.Struct(">BL")
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])\Z")
_UNIT: Final = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_SAFE: Final = frozenset(range(0x20, 0x7F)) - {ord("%")}

COMPRESSED: Final = EtcdError(Code.UNIMPLEMENTED, "grpc: compressed messages are not supported (compressed flag set)")
UNEXPECTED_EOF: Final = EtcdError(Code.INTERNAL, "grpc: failed to receive message: unexpected EOF")


def frame_message(payload: bytes) -> bytes:
    """A length-prefixed gRPC message (uncompressed)."""
    return _PREFIX.pack(0, len(payload)) + payload


def parse_timeout(value: bytes) -> float:
    """Seconds of a ``grpc-timeout`` value (1-8 digits and a unit). Raises ValueError if malformed."""
    m = _TIMEOUT.match(value)
    if m is None:
        raise ValueError(f"malformed time-out: {value.decode('latin-1')!r}")
    return int(m.group(1)) * _UNIT[m.group(2)]


def percent_encode(message: str) -> bytes:
    """``grpc-message`` encoding: UTF-8, every byte outside printable ASCII (and '%') as %XX."""
    raw = message.encode("utf-8", "replace")
    if all(b in _SAFE for b in raw):
        return raw
    return b"".join(bytes((b,)) if b in _SAFE else b"%%%02X" % b for b in raw)


def status_block(code: int, message: str, *, trailers_only: bool) -> bytes:
    """The header block ending a call with ``code``; ``trailers_only`` also carries the response headers."""
    fields = [(b"grpc-status", str(int(code)).encode())]
    if message:
        fields.append((b"grpc-message", percent_encode(message)))
    block = encode_headers(fields)
    return RESPONSE_HEADERS + block if trailers_only else block


class MessageReader:
    """Splits a stream's body into gRPC messages (1-byte flag, 4-byte length, payload).

    A message larger than ``max_size`` is refused from its prefix, before its body is buffered.
    :meth:`feed` raises :class:`~coord_server.errors.EtcdError` (grpc-go's texts) for a
    compressed or unknown flag and for an oversized message; after an error the reader is
    useless. ``partial`` says whether a message was cut off (for the end of the stream).
    """

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    @property
    def partial(self) -> bool:
        return bool(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        if not buf and len(data) >= 5 and data[0] == 0:
            size = int.from_bytes(data[1:5], "big")
            if len(data) == 5 + size and size <= self.max_size:
                return [data[5:]]  # the common case: one whole message in one DATA frame
        buf += data
        out: list[bytes] = []
        pos = 0
        while len(buf) - pos >= 5:
            flag, size = _PREFIX.unpack_from(buf, pos)
            if flag:
                raise COMPRESSED if flag == 1 else EtcdError(
                    Code.INTERNAL, f"grpc: received unexpected payload format {flag}")
            if size > self.max_size:
                raise message_too_large(size, self.max_size)
            end = pos + 5 + size
            if end > len(buf):
                break
            out.append(bytes(buf[pos + 5 : end]))
            pos = end
        if pos:
            del buf[:pos]
        return out
