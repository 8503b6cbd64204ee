"""A sans-io HTTP/2 server connection, shaped for gRPC (RFC 9113; HPACK, RFC 7541, via ``hpack``).

:class:`H2Connection` is a state machine in the h11 mould: bytes in (:meth:`receive_data`) give
events; calls (:meth:`send_headers`, :meth:`send_data`, :meth:`send_trailers`,
:meth:`send_response`, :meth:`reset_stream`, :meth:`acknowledge_received_data`, :meth:`goaway`)
queue frames; :meth:`data_to_send` hands the bytes out. No I/O, no clock, no event loop.

Scope: the server side of what gRPC clients (grpc-go, grpc-core, h2load, nghttp2) do. Streams are
only opened by the client; there is no server push. What it does:

- preface and SETTINGS exchange (values validated, ACKed), PING ACK, PRIORITY parsed and ignored,
  padding, CONTINUATION, unknown frame types ignored;
- flow control both ways: every DATA frame sent respects the peer's connection and stream windows
  (initial window from its SETTINGS, changes applied to open streams, WINDOW_UPDATEs); data that
  does not fit is queued per stream and sent as windows open (:class:`SendReady` when a stream's
  queue has drained, so the caller can pause a producer meanwhile). Received DATA is checked
  against our windows; the connection window is re-opened as data arrives, a stream's as the
  caller acknowledges what it consumed;
- limits: max concurrent streams (REFUSED_STREAM), frame size, header list size (431 reply),
  a bound on the compressed header block (ENHANCE_YOUR_CALM);
- errors: a connection error queues GOAWAY with the right code and ends the connection
  (:class:`ConnectionTerminated`); a stream error resets that stream (RST_STREAM, and
  :class:`StreamReset` with ``remote=False`` if the caller knew the stream); malformed requests
  (RFC 9113 §8.1.1) are reset with PROTOCOL_ERROR before the caller sees them;
- graceful close: :meth:`goaway` with NO_ERROR lets open streams finish and refuses newer ones.

Header blocks we send are built without the dynamic table (literal fields "without indexing"),
so encoding is stateless and reply blocks can be precomputed: see :func:`encode_headers`.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from enum import IntEnum
from typing import Final, NamedTuple

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError

__all__ = [
    "PREFACE",
    "ConnectionTerminated",
    "DataReceived",
    "ErrorCode",
    "Event",
    "H2Connection",
    "RequestReceived",
    "SendReady",
    "SettingCode",
    "StreamClosedError",
    "StreamReset",
    "encode_headers",
    "encode_integer",
]

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

# flags
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

MAX_WINDOW: Final = 2**31 - 1
DEFAULT_WINDOW: Final = 65_535
MIN_FRAME_SIZE: Final = 16_384
MAX_FRAME_SIZE: Final = 2**24 - 1

_HDR = struct.Struct(">HBBBL")  # 24-bit length as (high 16, low 8), type, flags, stream id
_U32 = struct.Struct(">L")
_RECENT_RESETS = 4096  # streams we reset whose late frames are ignored, not treated as errors


class ErrorCode(IntEnum):
    """HTTP/2 error codes (RFC 9113 §7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class SettingCode(IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


# -- events ------------------------------------------------------------------------------------------


class RequestReceived(NamedTuple):
    """A new stream: its (validated) request header list; ``end_stream`` if no body follows."""

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    end_stream: bool


class DataReceived(NamedTuple):
    """Body bytes of a stream (padding removed; may be empty when only ``end_stream`` is news).

    The stream's receive window re-opens only when the caller passes ``len(data)`` to
    :meth:`H2Connection.acknowledge_received_data`. Trailers from the client also end the
    stream: they arrive as ``DataReceived(stream_id, b"", True)``.
    """

    stream_id: int
    data: bytes
    end_stream: bool


class StreamReset(NamedTuple):
    """A stream the caller knew is gone: reset by the client (``remote``) or by us for a stream error."""

    stream_id: int
    error_code: int
    remote: bool


class SendReady(NamedTuple):
    """Everything queued on this stream has been sent (its flow-control window had been exhausted)."""

    stream_id: int


class ConnectionTerminated(NamedTuple):
    """GOAWAY: received from the client (``remote``), or sent by us after a connection error.

    After a local one the connection is dead: send what :meth:`H2Connection.data_to_send` has and
    close. A remote NO_ERROR GOAWAY only says the client opens no more streams.
    """

    error_code: int
    last_stream_id: int
    message: str
    remote: bool


Event = RequestReceived | DataReceived | StreamReset | SendReady | ConnectionTerminated


class StreamClosedError(Exception):
    """Raised by the send calls for a stream that is not open (reset, ended or never opened)."""


class _ConnectionError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _StreamError(Exception):
    def __init__(self, code: ErrorCode) -> None:
        super().__init__(code.name)
        self.code = code


# -- header encoding (stateless) ---------------------------------------------------------------------


def encode_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) with ``first``'s high bits set in its first byte."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A header block of literal fields without indexing: valid for any decoder state, so cacheable.

    Names must be lower-case (HTTP/2); pseudo-header fields must come first.
    """
    out = bytearray()
    for name, value in headers:
        out += b"\x00"
        out += encode_integer(len(name), 7)
        out += name
        out += encode_integer(len(value), 7)
        out += value
    return bytes(out)


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One serialized frame (also handy for tests)."""
    n = len(payload)
    return _HDR.pack(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


# -- request header validation (RFC 9113 §8.2, §8.3) -----------------------------------------------

_PSEUDO_BITS: Final = {b":method": 1, b":scheme": 2, b":path": 4, b":authority": 8}
_REQUIRED_PSEUDO: Final = 1 | 2 | 4
_CONNECTION_SPECIFIC: Final = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)
_NAME_OK = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_VALUE_BAD = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")


def _bad_field(name: bytes, value: bytes) -> bool:
    if name[:1] == b":":
        if name not in _PSEUDO_BITS or (name == b":path" and not value):
            return True
    elif not _NAME_OK.match(name) or name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
        return True
    return bool(value) and _VALUE_BAD.search(value) is not None


def _malformed_request(headers: list[tuple[bytes, bytes]], known: set[tuple[bytes, bytes]]) -> bool:
    """Whether a request header list breaks RFC 9113's rules (``known``: fields that passed before)."""
    seen = 0
    regular = False
    for field in headers:
        if field not in known:
            if _bad_field(field[0], field[1]):
                return True
            if len(known) < 4096:
                known.add(field)
        bit = _PSEUDO_BITS.get(field[0])
        if bit is None:
            regular = True
        elif regular or seen & bit:
            return True
        else:
            seen |= bit
    return seen & _REQUIRED_PSEUDO != _REQUIRED_PSEUDO


def _malformed_trailers(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name[:1] == b":" or not _NAME_OK.match(name) or name in _CONNECTION_SPECIFIC:
            return True
        if value and _VALUE_BAD.search(value):
            return True
    return False


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The declared content-length, -1 if none, -2 if invalid."""
    found = -1
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit() or (found >= 0 and int(value) != found):
                return -2
            found = int(value)
    return found


# -- the connection ----------------------------------------------------------------------------------


_Decoded = tuple[list[tuple[bytes, bytes]], int, bool, int]  # headers, list size, malformed, content-length


def _skip_integer(block: bytes, pos: int, prefix_mask: int) -> int:
    """Position after an HPACK integer starting at ``pos``."""
    if block[pos] & prefix_mask != prefix_mask:
        return pos + 1
    pos += 1
    while block[pos] & 0x80:
        pos += 1
    return pos + 1


def _skip_string(block: bytes, pos: int) -> int:
    """Position after an HPACK string literal starting at ``pos``."""
    end = _skip_integer(block, pos, 0x7F)
    if block[pos] & 0x7F != 0x7F:
        return end + (block[pos] & 0x7F)
    length, shift, i = 0, 0, pos + 1  # multi-byte length (RFC 7541 §5.1)
    while True:
        b = block[i]
        length += (b & 0x7F) << shift
        shift += 7
        i += 1
        if not b & 0x80:
            break
    return end + 0x7F + length


def _table_neutral(block: bytes) -> bool:
    """Whether an (already decoded, valid) header block leaves the HPACK dynamic table unchanged.

    True when it holds only indexed fields and literals without indexing / never indexed; a
    literal with incremental indexing or a table size update changes the table.
    """
    pos, n = 0, len(block)
    try:
        while pos < n:
            b = block[pos]
            if b & 0x80:  # indexed field
                pos = _skip_integer(block, pos, 0x7F)
            elif b & 0xC0 == 0x40 or b & 0xE0 == 0x20:  # literal with indexing, size update
                return False
            else:  # literal without indexing (0000) or never indexed (0001)
                indexed_name = b & 0x0F
                pos = _skip_integer(block, pos, 0x0F)
                if not indexed_name:
                    pos = _skip_string(block, pos)
                pos = _skip_string(block, pos)
    except IndexError:
        return False
    return pos == n


class _Stream:
    __slots__ = (
        "expect_len",
        "got_len",
        "out",
        "out_len",
        "out_off",
        "recv_window",
        "remote_open",
        "send_window",
        "sid",
        "trailers",
        "unacked",
    )

    def __init__(self, sid: int, send_window: int, recv_window: int, remote_open: bool) -> None:
        self.sid = sid
        self.send_window = send_window
        self.recv_window = recv_window
        self.remote_open = remote_open
        self.out: deque[bytes] = deque()
        self.out_off = 0  # bytes of out[0] already sent
        self.out_len = 0
        self.trailers: bytes | None = None  # to send once ``out`` has drained
        self.unacked = 0  # consumed bytes not yet given back with a WINDOW_UPDATE
        self.expect_len = -1  # content-length, if the client declared one
        self.got_len = 0


class H2Connection:
    """The server side of one HTTP/2 connection.

    ``max_concurrent_streams``: streams the client may have open at once (advertised; more are
    refused). ``initial_window_size``: our receive window per stream. ``connection_window``: our
    receive window for the connection (raised from 65,535 at start). ``max_header_list_size``:
    advertised; a larger request gets a 431 reply. ``max_frame_size``: the largest frame we accept.

    The SETTINGS frame and window update we open with are queued at construction. Methods raise
    :class:`StreamClosedError` when asked to send on a stream that is not open, and
    ``ValueError`` for a block or frame we could never send; nothing else.
    """

    def __init__(
        self,
        *,
        max_concurrent_streams: int = 2**32 - 1,
        initial_window_size: int = 1 << 20,
        connection_window: int = 16 << 20,
        max_header_list_size: int = 64 << 10,
        max_frame_size: int = MIN_FRAME_SIZE,
    ) -> None:
        if not MIN_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError("max_frame_size out of range")
        if not 0 < initial_window_size <= MAX_WINDOW or not DEFAULT_WINDOW <= connection_window <= MAX_WINDOW:
            raise ValueError("window size out of range")
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size
        self.max_header_list_size = max_header_list_size
        self.max_frame_size = max_frame_size
        # A block this large is refused before decoding (hpack's decoder copies its input per field).
        self._max_block = max(2 * max_header_list_size, 16 << 10)
        self._decoder = Decoder(max_header_list_size=2 * max_header_list_size)
        self._known_fields: set[tuple[bytes, bytes]] = set()
        self._decoded: dict[bytes, _Decoded] = {}

        self._in = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._state = 0  # 0: want preface, 1: want SETTINGS, 2: open, 3: terminated
        self._streams: dict[int, _Stream] = {}
        self._highest = 0  # the highest stream id the client opened
        self._recent_resets: dict[int, None] = {}
        self._blocked: dict[int, None] = {}  # streams with data waiting for the connection window
        self._goaway_last: int | None = None  # after our graceful GOAWAY: streams above are refused
        self._first_block = True

        # Peer's settings (what we must respect when sending).
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = MIN_FRAME_SIZE
        self.peer_max_header_list_size: int | None = None
        self._send_window = DEFAULT_WINDOW

        # Our receive side.
        self._recv_window = connection_window
        self._conn_unacked = 0
        self._conn_threshold = connection_window // 4
        self._stream_threshold = max(1, initial_window_size // 4)

        settings = [
            (SettingCode.MAX_CONCURRENT_STREAMS, min(max_concurrent_streams, 2**32 - 1)),
            (SettingCode.INITIAL_WINDOW_SIZE, initial_window_size),
            (SettingCode.MAX_HEADER_LIST_SIZE, max_header_list_size),
        ]
        if max_frame_size != MIN_FRAME_SIZE:
            settings.append((SettingCode.MAX_FRAME_SIZE, max_frame_size))
        self._out.append(frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in settings)))
        if connection_window > DEFAULT_WINDOW:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(connection_window - DEFAULT_WINDOW)))

    # -- inspection ------------------------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        """Streams open now (request not yet fully answered)."""
        return len(self._streams)

    @property
    def terminated(self) -> bool:
        """True once a GOAWAY for a connection error was queued: nothing more is sent or received."""
        return self._state == 3

    @property
    def highest_stream_id(self) -> int:
        return self._highest

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def buffered(self, stream_id: int) -> int:
        """Bytes queued on a stream, waiting for flow-control window (0 for an unknown stream)."""
        st = self._streams.get(stream_id)
        return 0 if st is None else st.out_len

    def send_window(self, stream_id: int) -> int:
        """How many DATA bytes could go out on the stream right now."""
        st = self._streams.get(stream_id)
        return 0 if st is None else max(0, min(st.send_window, self._send_window))

    def data_to_send(self) -> bytes:
        """Everything queued for the socket since the last call (may be empty)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    # -- receiving -------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the socket; returns the events they complete.

        Protocol violations never raise: a connection error queues GOAWAY and ends in a
        :class:`ConnectionTerminated` event; after that, input is ignored.
        """
        if self._state == 3:
            return []
        events = self._events = []
        buf = self._in
        buf += data
        pos = 0
        try:
            if self._state == 0:
                if len(buf) < 24:
                    if buf != PREFACE[: len(buf)]:
                        raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
                    return events
                if buf[:24] != PREFACE:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
                pos = 24
                self._state = 1
            n = len(buf)
            max_frame = self.max_frame_size
            while n - pos >= 9:
                hi, lo, ftype, flags, sid = _HDR.unpack_from(buf, pos)
                length = (hi << 8) | lo
                if length > max_frame:
                    raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes is too large")
                end = pos + 9 + length
                if end > n:
                    break
                payload = bytes(buf[pos + 9 : end])
                pos = end
                sid &= 0x7FFFFFFF
                if self._state == 1:
                    if ftype != SETTINGS or flags & ACK:
                        raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "preface not followed by SETTINGS")
                    self._state = 2
                if self._header_sid and ftype != CONTINUATION:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "header block interrupted")
                try:
                    if ftype == DATA:
                        self._on_data(sid, flags, payload)
                    elif ftype == HEADERS:
                        self._on_headers(sid, flags, payload)
                    elif ftype == WINDOW_UPDATE:
                        self._on_window_update(sid, payload)
                    elif ftype == SETTINGS:
                        self._on_settings(sid, flags, payload)
                    elif ftype == PING:
                        self._on_ping(sid, flags, payload)
                    elif ftype == RST_STREAM:
                        self._on_rst_stream(sid, payload)
                    elif ftype == CONTINUATION:
                        self._on_continuation(sid, flags, payload)
                    elif ftype == PRIORITY:
                        self._on_priority(sid, payload)
                    elif ftype == GOAWAY:
                        self._on_goaway(sid, payload)
                    elif ftype == PUSH_PROMISE:
                        raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
                    # other types: ignored (RFC 9113 §4.1)
                except _StreamError as exc:
                    self._stream_error(sid, exc.code)
            if self._conn_unacked >= self._conn_threshold:
                self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._conn_unacked)))
                self._recv_window += self._conn_unacked
                self._conn_unacked = 0
        except _ConnectionError as exc:
            self._terminate(exc.code, exc.message)
            return events
        del buf[:pos]
        return events

    _header_sid = 0  # stream of a header block awaiting CONTINUATION (0: none)
    _header_flags = 0
    _header_block: bytearray | None = None
    _header_priority_self = False

    def _on_data(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        if length > self._recv_window:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        self._recv_window -= length
        self._conn_unacked += length  # the connection window re-opens as data arrives
        if flags & PADDED:
            if not length or payload[0] >= length:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid padding")
            data = payload[1 : length - payload[0]]
        else:
            data = payload
        st = self._streams.get(sid)
        if st is None:
            self._frame_on_closed(sid)
            return
        if not st.remote_open:
            raise _StreamError(ErrorCode.STREAM_CLOSED)
        if length > st.recv_window:
            raise _StreamError(ErrorCode.FLOW_CONTROL_ERROR)
        st.recv_window -= length
        if length != len(data):
            st.unacked += length - len(data)  # padding is ours to give back
        end = bool(flags & END_STREAM)
        if st.expect_len >= 0:
            st.got_len += len(data)
            if st.got_len > st.expect_len or (end and st.got_len != st.expect_len):
                raise _StreamError(ErrorCode.PROTOCOL_ERROR)
        if end:
            st.remote_open = False
        self._events.append(DataReceived(sid, data, end))

    def _frame_on_closed(self, sid: int) -> None:
        """DATA or HEADERS for a stream that is not open."""
        if sid > self._highest:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"frame on idle stream {sid}")
        if sid in self._recent_resets:
            return  # in flight when we reset it: ignored (RFC 9113 §5.1, closed)
        raise _ConnectionError(ErrorCode.STREAM_CLOSED, f"frame on closed stream {sid}")

    def _on_headers(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, stop = 0, len(payload)
        if flags & PADDED:
            if not stop:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid padding")
            stop -= payload[0]
            start = 1
        self_dependent = False
        if flags & PRIORITY_FLAG:
            if start + 5 > stop:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            self_dependent = (_U32.unpack_from(payload, start)[0] & 0x7FFFFFFF) == sid
            start += 5
        if start > stop:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid padding")
        block = payload[start:stop]
        if flags & END_HEADERS:
            self._on_header_block(sid, flags, block, self_dependent)
            return
        if len(block) > self._max_block:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        self._header_sid = sid
        self._header_flags = flags
        self._header_block = bytearray(block)
        self._header_priority_self = self_dependent

    def _on_continuation(self, sid: int, flags: int, payload: bytes) -> None:
        block = self._header_block
        if block is None or sid != self._header_sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        block += payload
        if len(block) > self._max_block:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._header_sid = 0
            self._header_block = None
            self._on_header_block(sid, self._header_flags, bytes(block), self._header_priority_self)

    def _decode(self, block: bytes) -> _Decoded:
        """Decode a header block (always: the HPACK state is the connection's), with its checks.

        Clients repeat the same request headers, which after the first call are a block of
        indexed fields and literals without indexing. Such a block does not change the dynamic
        table, so while no block that does arrives, its decoding (and verdict) stays the same:
        it is cached.
        """
        cache = self._decoded
        entry = cache.get(block)
        if entry is not None:
            return entry
        try:
            headers: list[tuple[bytes, bytes]] = self._decoder.decode(block, raw=True)  # type: ignore[assignment]
        except OversizedHeaderListError:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header list too large") from None
        except (HPACKError, ValueError, IndexError) as exc:
            raise _ConnectionError(ErrorCode.COMPRESSION_ERROR, f"HPACK: {exc}") from None
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32
        entry = (headers, size, _malformed_request(headers, self._known_fields), _content_length(headers))
        if _table_neutral(block):
            if len(cache) >= 64:
                cache.clear()
            cache[block] = entry
        elif cache:
            cache.clear()  # the dynamic table has changed
        return entry

    def _on_header_block(self, sid: int, flags: int, block: bytes, self_dependent: bool) -> None:
        headers, size, malformed, expect = self._decode(block)
        end = bool(flags & END_STREAM)
        st = self._streams.get(sid)
        if st is not None:  # trailers
            if not st.remote_open:
                raise _StreamError(ErrorCode.STREAM_CLOSED)
            if not end or _malformed_trailers(headers):
                raise _StreamError(ErrorCode.PROTOCOL_ERROR)
            if st.expect_len >= 0 and st.got_len != st.expect_len:
                raise _StreamError(ErrorCode.PROTOCOL_ERROR)
            st.remote_open = False
            self._events.append(DataReceived(sid, b"", True))
            return
        if sid <= self._highest:
            if sid in self._recent_resets:
                return  # trailers in flight when we reset the stream
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"stream id {sid} not above {self._highest}")
        if not sid & 1:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"client opened even stream {sid}")
        self._highest = sid
        if self._goaway_last is not None and sid > self._goaway_last:
            self._refuse(sid, ErrorCode.REFUSED_STREAM)  # after our GOAWAY: never processed, retry elsewhere
            return
        if self_dependent:
            self._refuse(sid, ErrorCode.PROTOCOL_ERROR)
            return
        if len(self._streams) >= self.max_concurrent_streams:
            self._refuse(sid, ErrorCode.REFUSED_STREAM)
            return
        if size > self.max_header_list_size:
            # RFC 9113 §10.5.1: a server may answer 431; the request is not processed.
            self._out.append(self._header_frames(sid, _REPLY_431, True))
            if not end:
                self._refuse(sid, ErrorCode.NO_ERROR)
            return
        if malformed or expect == -2 or (end and expect > 0):
            self._refuse(sid, ErrorCode.PROTOCOL_ERROR)
            return
        st = _Stream(sid, self._peer_initial_window, self.initial_window_size, not end)
        st.expect_len = expect
        self._streams[sid] = st
        self._events.append(RequestReceived(sid, headers, end))

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if not inc:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += inc
            if self._send_window > MAX_WINDOW:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            if self._blocked:
                blocked = list(self._blocked)
                self._blocked.clear()
                for bsid in blocked:
                    bst = self._streams.get(bsid)
                    if bst is not None:
                        self._pump(bst)
            return
        st = self._streams.get(sid)
        if st is None:
            if sid > self._highest:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # closed: may cross with our end of the stream
        if not inc:
            raise _StreamError(ErrorCode.PROTOCOL_ERROR)
        st.send_window += inc
        if st.send_window > MAX_WINDOW:
            raise _StreamError(ErrorCode.FLOW_CONTROL_ERROR)
        if st.out:
            self._pump(st)

    def _on_settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        grown = False
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, i)
            if key == SettingCode.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "initial window size too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                if delta:
                    for st in self._streams.values():
                        st.send_window += delta
                        if st.send_window > MAX_WINDOW:
                            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow")
                    grown = grown or delta > 0
            elif key == SettingCode.MAX_FRAME_SIZE:
                if not MIN_FRAME_SIZE <= value <= MAX_FRAME_SIZE:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid max frame size")
                self._peer_max_frame = value
            elif key == SettingCode.ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid enable push")
            elif key == SettingCode.MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list_size = value
            # HEADER_TABLE_SIZE: our encoder never uses the dynamic table (and says so, see
            # _header_frames); MAX_CONCURRENT_STREAMS: we open none. Unknown settings: ignored.
        self._out.append(_SETTINGS_ACK)
        if grown:
            # Data the larger window lets out goes after the ACK: the peer counts received data against the
            # settings we acknowledged (grpc's C core resets a stream with PROTOCOL_ERROR otherwise).
            for st in list(self._streams.values()):
                if st.out:
                    self._pump(st)

    def _on_ping(self, sid: int, flags: int, payload: bytes) -> None:
        if len(payload) != 8:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PING must be 8 bytes")
        if sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if not flags & ACK:
            self._out.append(_PING_ACK_HEADER + payload)

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes")
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        st = self._streams.pop(sid, None)
        if st is None:
            if sid > self._highest:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            return
        self._blocked.pop(sid, None)
        self._events.append(StreamReset(sid, _U32.unpack(payload)[0], True))

    def _on_priority(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise _StreamError(ErrorCode.FRAME_SIZE_ERROR)
        if (_U32.unpack_from(payload)[0] & 0x7FFFFFFF) == sid:
            raise _StreamError(ErrorCode.PROTOCOL_ERROR)
        # otherwise ignored: RFC 9113 deprecates the priority scheme

    def _on_goaway(self, sid: int, payload: bytes) -> None:
        if sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY too short")
        last, code = struct.unpack_from(">LL", payload)
        text = payload[8:].decode("utf-8", "replace")
        self._events.append(ConnectionTerminated(code, last & 0x7FFFFFFF, text, True))

    # -- errors ----------------------------------------------------------------------------------

    def _remember_reset(self, sid: int) -> None:
        resets = self._recent_resets
        resets[sid] = None
        if len(resets) > _RECENT_RESETS:
            del resets[next(iter(resets))]

    def _refuse(self, sid: int, code: ErrorCode) -> None:
        """Reset a stream the caller never saw."""
        self._out.append(frame(RST_STREAM, 0, sid, _U32.pack(code)))
        self._remember_reset(sid)

    def _stream_error(self, sid: int, code: ErrorCode) -> None:
        st = self._streams.pop(sid, None)
        self._out.append(frame(RST_STREAM, 0, sid, _U32.pack(code)))
        self._remember_reset(sid)
        if st is not None:
            self._blocked.pop(sid, None)
            self._events.append(StreamReset(sid, code, False))

    def _terminate(self, code: ErrorCode, message: str) -> None:
        last = self._highest
        self._out.append(frame(GOAWAY, 0, 0, struct.pack(">LL", last, code) + message.encode()[:256]))
        self._state = 3
        self._streams.clear()
        self._blocked.clear()
        self._in = bytearray()
        self._events.append(ConnectionTerminated(code, last, message, False))

    # -- sending ---------------------------------------------------------------------------------

    def _header_frames(self, sid: int, block: bytes, end_stream: bool) -> bytes:
        if self._first_block:
            # Dynamic table size update to 0 (RFC 7541 §6.3): we never index, and a decoder
            # whose SETTINGS_HEADER_TABLE_SIZE later shrinks then needs no further update.
            self._first_block = False
            block = b"\x20" + block
        flags = END_STREAM if end_stream else 0
        maxf = self._peer_max_frame
        if len(block) <= maxf:
            return frame(HEADERS, flags | END_HEADERS, sid, block)
        parts = [frame(HEADERS, flags, sid, block[:maxf])]
        for i in range(maxf, len(block), maxf):
            last = i + maxf >= len(block)
            parts.append(frame(CONTINUATION, END_HEADERS if last else 0, sid, block[i : i + maxf]))
        return b"".join(parts)

    def _stream(self, sid: int) -> _Stream:
        st = self._streams.get(sid)
        if st is None or self._state == 3:
            raise StreamClosedError(f"stream {sid} is not open")
        return st

    def send_headers(self, stream_id: int, block: bytes) -> None:
        """Response headers (an HPACK block, e.g. from :func:`encode_headers`). Raises StreamClosedError."""
        self._stream(stream_id)
        self._out.append(self._header_frames(stream_id, block, False))

    def send_data(self, stream_id: int, data: bytes) -> None:
        """Body bytes: sent as far as the windows allow, the rest queued (see :meth:`buffered`).

        Raises StreamClosedError, also after :meth:`send_trailers`.
        """
        st = self._stream(stream_id)
        if st.trailers is not None:
            raise StreamClosedError(f"stream {stream_id} already ended")
        n = len(data)
        if not n:
            return
        if not st.out and n <= st.send_window and n <= self._send_window and n <= self._peer_max_frame:
            st.send_window -= n
            self._send_window -= n
            self._out.append(_HDR.pack(n >> 8, n & 0xFF, DATA, 0, stream_id) + data)
            return
        st.out.append(data)
        st.out_len += n
        self._pump(st, False)

    def send_trailers(self, stream_id: int, block: bytes) -> None:
        """End the stream with trailers (after any queued data). Raises StreamClosedError.

        If the client has not finished its side, the stream is then reset with NO_ERROR
        (RFC 9113 §8.1: the response is complete, the rest of the request is not wanted).
        """
        st = self._stream(stream_id)
        if st.trailers is not None:
            raise StreamClosedError(f"stream {stream_id} already ended")
        if st.out:
            st.trailers = block
            return
        self._out.append(self._header_frames(stream_id, block, True))
        self._end(st)

    def send_response(self, stream_id: int, headers: bytes, data: bytes, trailers: bytes) -> None:
        """Headers, one body chunk and trailers: a whole unary reply. Raises StreamClosedError."""
        st = self._stream(stream_id)
        n = len(data)
        if (
            not self._first_block
            and n <= st.send_window
            and n <= self._send_window
            and n <= self._peer_max_frame
            and len(headers) <= self._peer_max_frame
            and len(trailers) <= self._peer_max_frame
        ):
            st.send_window -= n
            self._send_window -= n
            pack = _HDR.pack
            h, t = len(headers), len(trailers)
            self._out.append(
                b"".join((
                    pack(h >> 8, h & 0xFF, HEADERS, END_HEADERS, stream_id), headers,
                    pack(n >> 8, n & 0xFF, DATA, 0, stream_id), data,
                    pack(t >> 8, t & 0xFF, HEADERS, END_HEADERS | END_STREAM, stream_id), trailers,
                ))
            )  # fmt: skip
            self._end(st)
            return
        self.send_headers(stream_id, headers)
        self.send_data(stream_id, data)
        self.send_trailers(stream_id, trailers)

    def reset_stream(self, stream_id: int, error_code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Abort a stream with RST_STREAM (no-op if it is not open)."""
        st = self._streams.pop(stream_id, None)
        if st is None or self._state == 3:
            return
        self._blocked.pop(stream_id, None)
        self._out.append(frame(RST_STREAM, 0, stream_id, _U32.pack(error_code)))
        self._remember_reset(stream_id)

    def acknowledge_received_data(self, stream_id: int, n: int) -> None:
        """The caller consumed ``n`` body bytes of a stream: re-open its receive window (batched)."""
        st = self._streams.get(stream_id)
        if st is None or not st.remote_open or n <= 0:
            return
        st.unacked += n
        if st.unacked >= self._stream_threshold:
            self._out.append(frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(st.unacked)))
            st.recv_window += st.unacked
            st.unacked = 0

    def goaway(self, error_code: ErrorCode = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Send GOAWAY naming the newest stream we accepted.

        NO_ERROR is a graceful close: open streams go on, newer ones are refused. Any other code
        terminates the connection at once (as a connection error does).
        """
        if self._state == 3:
            return
        if error_code != ErrorCode.NO_ERROR:
            self._events = []
            self._terminate(error_code, message)
            return
        if self._goaway_last is None:
            self._goaway_last = self._highest
            self._out.append(frame(GOAWAY, 0, 0, struct.pack(">LL", self._highest, 0) + message.encode()[:256]))

    def _end(self, st: _Stream) -> None:
        del self._streams[st.sid]
        if st.remote_open:
            self._out.append(frame(RST_STREAM, 0, st.sid, _NO_ERROR))
            self._remember_reset(st.sid)

    def _pump(self, st: _Stream, notify: bool = True) -> None:
        """Send queued data of ``st`` as far as the windows allow; then its trailers."""
        out = st.out
        maxf = self._peer_max_frame
        pack = _HDR.pack
        sid = st.sid
        while out:
            allowed = min(st.send_window, self._send_window, maxf)
            if allowed <= 0:
                break
            chunk = out[0]
            off = st.out_off
            take = min(allowed, len(chunk) - off)
            piece = chunk[off : off + take] if off or take < len(chunk) else chunk
            if off + take == len(chunk):
                out.popleft()
                st.out_off = 0
            else:
                st.out_off = off + take
            st.send_window -= take
            self._send_window -= take
            st.out_len -= take
            self._out.append(pack(take >> 8, take & 0xFF, DATA, 0, sid) + piece)
        if out:
            if self._send_window <= 0:
                self._blocked[sid] = None
            return
        self._blocked.pop(sid, None)
        if st.trailers is not None:
            self._out.append(self._header_frames(sid, st.trailers, True))
            self._end(st)
        elif notify:
            self._events.append(SendReady(sid))


_SETTINGS_ACK: Final = frame(SETTINGS, ACK, 0)
_PING_ACK_HEADER: Final = _HDR.pack(0, 8, PING, ACK, 0)
_NO_ERROR: Final = _U32.pack(ErrorCode.NO_ERROR)
_REPLY_431: Final = encode_headers([(b":status", b"431")])
