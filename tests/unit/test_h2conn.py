"""The sans-io HTTP/2 server core (RFC 9113): driven with h2's client state machine and raw frames."""

from __future__ import annotations

import struct
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hpack import Encoder
from hypothesis import given
from hypothesis import strategies as st

from coord_server.h2conn import (
    PREFACE,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    H2Connection,
    RequestReceived,
    SendReady,
    StreamClosedError,
    StreamReset,
    encode_headers,
    encode_integer,
    frame,
)

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG, ACK = 0x1, 0x4, 0x8, 0x20, 0x1

REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/test.Svc/Echo"),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]
REPLY_HEADERS = encode_headers([(b":status", b"200"), (b"content-type", b"application/grpc")])
TRAILERS = encode_headers([(b"grpc-status", b"0")])


def parse(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Frames in ``data`` as (type, flags, stream id, payload); the data must end on a frame boundary."""
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        ftype, flags = data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        out.append((ftype, flags, sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    assert pos == len(data)
    return out


def goaway_code(data: bytes) -> int | None:
    codes = [struct.unpack(">LL", p[:8])[1] for t, _, _, p in parse(data) if t == GOAWAY]
    return codes[-1] if codes else None


def resets(data: bytes) -> dict[int, int]:
    return {sid: int.from_bytes(p, "big") for t, _, sid, p in parse(data) if t == RST_STREAM}


def settings_frame(**values: int) -> bytes:
    ids = {"header_table_size": 1, "enable_push": 2, "max_concurrent_streams": 3, "initial_window_size": 4,
           "max_frame_size": 5, "max_header_list_size": 6}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", ids[k], v) for k, v in values.items()))


class Pair:
    """Our server core and h2's client core, wired back to back."""

    def __init__(self, client_settings: dict[Any, int] | None = None, **server_kw: Any) -> None:
        self.server = H2Connection(**server_kw)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.local_settings = h2.settings.Settings(client=True, initial_values=client_settings or {})
        self.client.initiate_connection()
        self.server_events: list[Any] = []
        self.client_events: list[Any] = []
        self.pump()

    def pump(self) -> None:
        """Exchange bytes until both sides are quiet."""
        for _ in range(50):
            to_server = self.client.data_to_send()
            if to_server:
                self.server_events += self.server.receive_data(to_server)
            to_client = self.server.data_to_send()
            if to_client:
                self.client_events += self.client.receive_data(to_client)
            if not to_server and not to_client:
                return
        raise AssertionError("no quiescence")

    def request(self, body: bytes = b"", end: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, REQUEST, end_stream=end and not body)
        if body:
            self.client.send_data(sid, body, end_stream=end)
        self.pump()
        return sid

    def take(self, kind: type) -> list[Any]:
        got = [e for e in self.server_events if isinstance(e, kind)]
        self.server_events = [e for e in self.server_events if not isinstance(e, kind)]
        return got

    def client_take(self, kind: type) -> list[Any]:
        got = [e for e in self.client_events if isinstance(e, kind)]
        self.client_events = [e for e in self.client_events if not isinstance(e, kind)]
        return got


def opened(**kw: Any) -> H2Connection:
    """A server core past the preface and the client's SETTINGS (its own output drained)."""
    conn = H2Connection(**kw)
    assert conn.receive_data(PREFACE + settings_frame()) == []
    conn.data_to_send()
    return conn


def request_block(path: bytes = b"/test.Svc/Echo", extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path), (b"content-type", b"application/grpc")]
    return encode_headers(fields + (extra or []))


# -- the handshake and a call ----------------------------------------------------------------------


def test_handshake_advertises_settings_and_acks_the_clients() -> None:
    pair = Pair(max_concurrent_streams=77, initial_window_size=100_000, max_header_list_size=9_000)
    changed = pair.client_take(h2.events.RemoteSettingsChanged)[0].changed_settings
    assert changed[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 77
    assert changed[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE].new_value == 100_000
    assert changed[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE].new_value == 9_000
    assert pair.client_take(h2.events.SettingsAcknowledged)  # the client's SETTINGS were ACKed
    assert pair.client.outbound_flow_control_window == 16 << 20  # connection window raised at once


def test_unary_round_trip() -> None:
    pair = Pair()
    sid = pair.request(b"\x00\x00\x00\x00\x02hi")
    (req,) = pair.take(RequestReceived)
    assert req.stream_id == sid and not req.end_stream
    assert (b":path", b"/test.Svc/Echo") in req.headers and (b"te", b"trailers") in req.headers
    (data,) = pair.take(DataReceived)
    assert data == DataReceived(sid, b"\x00\x00\x00\x00\x02hi", True)
    assert pair.server.open_streams == 1
    pair.server.send_response(sid, REPLY_HEADERS, b"\x00\x00\x00\x00\x01x", TRAILERS)
    assert pair.server.open_streams == 0
    pair.pump()
    (resp,) = pair.client_take(h2.events.ResponseReceived)
    assert resp.headers == [(b":status", b"200"), (b"content-type", b"application/grpc")]
    assert pair.client_take(h2.events.DataReceived)[0].data == b"\x00\x00\x00\x00\x01x"
    assert pair.client_take(h2.events.TrailersReceived)[0].headers == [(b"grpc-status", b"0")]
    assert pair.client_take(h2.events.StreamEnded)
    assert not pair.client_take(h2.events.StreamReset)  # the client had finished: no RST
    with pytest.raises(StreamClosedError):
        pair.server.send_data(sid, b"late")


def test_ending_a_stream_the_client_still_sends_on_resets_it_with_no_error() -> None:
    pair = Pair()
    sid = pair.request(b"\x00\x00\x00\x00\x00", end=False)
    pair.server.send_trailers(sid, REPLY_HEADERS + TRAILERS)
    out = pair.server.data_to_send()
    assert resets(out) == {sid: ErrorCode.NO_ERROR}
    # DATA already in flight when we reset is ignored (but still counts for the connection window).
    assert pair.server.receive_data(frame(DATA, END_STREAM, sid, b"x" * 10)) == []
    assert goaway_code(pair.server.data_to_send()) is None


def test_ping_is_acked_with_its_payload() -> None:
    conn = opened()
    assert conn.receive_data(frame(PING, 0, 0, b"12345678")) == []
    assert parse(conn.data_to_send()) == [(PING, ACK, 0, b"12345678")]
    conn.receive_data(frame(PING, ACK, 0, b"12345678"))  # an ACK is not answered
    assert conn.data_to_send() == b""


def test_preface_in_pieces_and_first_header_block_resets_the_table_size() -> None:
    conn = H2Connection()
    wire = PREFACE + settings_frame(header_table_size=0) + frame(HEADERS, END_HEADERS | END_STREAM, 1,
                                                                  request_block())
    events: list[Any] = []
    for i in range(0, len(wire), 7):
        events += conn.receive_data(wire[i : i + 7])
    assert [type(e) for e in events] == [RequestReceived]
    conn.data_to_send()
    conn.send_trailers(1, REPLY_HEADERS + TRAILERS)
    ((ftype, flags, sid, block),) = parse(conn.data_to_send())
    assert (ftype, flags, sid) == (HEADERS, END_HEADERS | END_STREAM, 1)
    assert block[:1] == b"\x20"  # dynamic table size update to 0, then literals


def test_encode_integer_matches_rfc7541_examples() -> None:
    assert encode_integer(10, 5) == b"\x0a"
    assert encode_integer(1337, 5) == b"\x1f\x9a\x0a"
    assert encode_integer(42, 8) == b"\x2a"


# -- flow control --------------------------------------------------------------------------------------


def test_send_respects_the_stream_window_and_resumes_on_window_update() -> None:
    pair = Pair(client_settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    sid = pair.request(b"\x00\x00\x00\x00\x00")
    pair.server.send_headers(sid, REPLY_HEADERS)
    pair.server.send_data(sid, b"a" * 250)
    assert pair.server.buffered(sid) == 150
    pair.server.send_trailers(sid, TRAILERS)  # queued behind the data
    pair.pump()
    got = pair.client_take(h2.events.DataReceived)
    assert sum(len(e.data) for e in got) == 100
    assert not pair.client_take(h2.events.TrailersReceived)
    pair.client.increment_flow_control_window(100, stream_id=sid)
    pair.pump()
    assert sum(len(e.data) for e in pair.client_take(h2.events.DataReceived)) == 100
    assert pair.server.buffered(sid) == 50
    pair.client.increment_flow_control_window(1000, stream_id=sid)
    pair.pump()
    assert sum(len(e.data) for e in pair.client_take(h2.events.DataReceived)) == 50
    assert pair.client_take(h2.events.TrailersReceived)  # trailers right after the last data
    assert pair.server.open_streams == 0


def test_send_ready_when_a_queue_drains_and_the_connection_window_is_shared() -> None:
    pair = Pair(client_settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**20})
    s1 = pair.request(b"\x00\x00\x00\x00\x00")
    s2 = pair.request(b"\x00\x00\x00\x00\x00")
    pair.server.send_headers(s1, REPLY_HEADERS)
    pair.server.send_headers(s2, REPLY_HEADERS)
    pair.server.send_data(s1, b"a" * 60_000)
    pair.server.send_data(s2, b"b" * 10_000)  # the connection window (65,535) is spent after 5,535
    assert pair.server.buffered(s1) == 0 and pair.server.buffered(s2) == 10_000 - 5_535
    assert pair.server.send_window(s2) == 0
    pair.pump()
    assert sum(len(e.data) for e in pair.client_take(h2.events.DataReceived)) == 65_535
    pair.client.increment_flow_control_window(4_465)  # the connection window
    pair.pump()
    assert sum(len(e.data) for e in pair.client_take(h2.events.DataReceived)) == 4_465
    assert pair.take(SendReady) == [SendReady(s2)]
    assert pair.server.buffered(s2) == 0


def test_initial_window_change_applies_to_open_streams_even_below_zero() -> None:
    conn = opened()
    conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block()))
    conn.send_headers(1, REPLY_HEADERS)
    conn.send_data(1, b"x" * 1000)
    conn.receive_data(settings_frame(initial_window_size=500))  # 65,535 - 1,000 + (500 - 65,535) < 0
    assert conn.send_window(1) == 0
    conn.send_data(1, b"y" * 10)
    assert conn.buffered(1) == 10
    conn.data_to_send()
    conn.receive_data(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 500)))  # back to 0: still nothing
    assert conn.buffered(1) == 10
    events = conn.receive_data(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 10)))
    assert events == [SendReady(1)]
    assert [(t, p) for t, _, _, p in parse(conn.data_to_send())] == [(DATA, b"y" * 10)]


def test_data_let_out_by_a_larger_initial_window_follows_the_settings_ack() -> None:
    # The peer counts data against the settings we acknowledged: anything beyond the old window must come after
    # our ACK (grpc's C core resets the stream with PROTOCOL_ERROR otherwise; seen with its BDP window growth).
    conn = opened()
    conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block()))
    conn.send_headers(1, REPLY_HEADERS)
    conn.send_data(1, b"x" * 70_000)  # 65,535 go out, the rest waits for window
    conn.data_to_send()
    assert conn.buffered(1) == 70_000 - 65_535
    conn.receive_data(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1_000_000)))  # the connection window is not it
    conn.receive_data(settings_frame(initial_window_size=131_070))
    frames = [(t, f) for t, f, _, _ in parse(conn.data_to_send())]
    assert frames[0] == (SETTINGS, ACK)
    assert (DATA, 0) in frames[1:]
    assert conn.buffered(1) == 0


def test_receive_windows_are_enforced_and_reopened_as_data_is_consumed() -> None:
    conn = opened(initial_window_size=1000)
    conn.receive_data(frame(HEADERS, END_HEADERS, 1, request_block()))
    events = conn.receive_data(frame(DATA, 0, 1, b"x" * 600))
    assert events == [DataReceived(1, b"x" * 600, False)]
    conn.acknowledge_received_data(1, 600)  # threshold: a quarter of the window
    assert [(t, sid, p) for t, _, sid, p in parse(conn.data_to_send())] == [
        (WINDOW_UPDATE, 1, struct.pack(">L", 600))]
    conn.receive_data(frame(DATA, 0, 1, b"x" * 1000))  # exactly the window
    events = conn.receive_data(frame(DATA, 0, 1, b"x"))  # one byte too many
    assert events == [StreamReset(1, ErrorCode.FLOW_CONTROL_ERROR, False)]
    assert resets(conn.data_to_send()) == {1: ErrorCode.FLOW_CONTROL_ERROR}


def test_connection_receive_window_is_enforced() -> None:
    conn = opened(connection_window=65_535, initial_window_size=2**20)
    for sid in (1, 3, 5, 7, 9):
        conn.receive_data(frame(HEADERS, END_HEADERS, sid, request_block()))
    for sid in (1, 3, 5, 7):
        conn.receive_data(frame(DATA, 0, sid, b"x" * 16_000))
    assert parse(conn.data_to_send())[0][0] == WINDOW_UPDATE  # a quarter used: the window re-opens
    conn = opened(connection_window=65_535)
    conn.receive_data(frame(HEADERS, END_HEADERS, 1, request_block()))
    conn.receive_data(frame(DATA, 0, 1, b"x" * 10_000))  # under a quarter: no update yet
    assert conn.data_to_send() == b""


# -- frames: continuation, padding, priority, reset --------------------------------------------------


def test_padding_priority_and_continuation() -> None:
    conn = opened()
    block = request_block()
    first = b"\x03" + struct.pack(">LB", 0, 15) + block[:10] + b"\x00" * 3  # pad 3, priority on stream 0
    events = conn.receive_data(frame(HEADERS, PADDED | PRIORITY_FLAG, 1, first))
    assert events == []
    events = conn.receive_data(frame(CONTINUATION, 0, 1, block[10:20]) + frame(CONTINUATION, END_HEADERS, 1,
                                                                                block[20:]))
    assert [type(e) for e in events] == [RequestReceived]
    assert (b":path", b"/test.Svc/Echo") in events[0].headers
    events = conn.receive_data(frame(DATA, PADDED | END_STREAM, 1, b"\x02abc\x00\x00"))
    assert events == [DataReceived(1, b"abc", True)]
    assert conn.receive_data(frame(PRIORITY, 0, 3, struct.pack(">LB", 1, 200))) == []
    assert conn.data_to_send() == b""


def test_client_reset_and_unknown_frames() -> None:
    conn = opened()
    conn.receive_data(frame(HEADERS, END_HEADERS, 1, request_block()))
    assert conn.receive_data(frame(0xEE, 0xFF, 1, b"whatever")) == []  # unknown type: ignored
    events = conn.receive_data(frame(RST_STREAM, 0, 1, struct.pack(">L", ErrorCode.CANCEL)))
    assert events == [StreamReset(1, ErrorCode.CANCEL, True)]
    assert conn.open_streams == 0
    assert conn.receive_data(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 5))) == []  # closed: ignored
    with pytest.raises(StreamClosedError):
        conn.send_headers(1, REPLY_HEADERS)
    assert conn.data_to_send() == b""


def test_trailers_from_the_client_end_the_stream() -> None:
    conn = opened()
    conn.receive_data(frame(HEADERS, END_HEADERS, 1, request_block()))
    events = conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, encode_headers([(b"x-t", b"1")])))
    assert events == [DataReceived(1, b"", True)]


def test_stream_state_errors_reset_the_stream() -> None:
    conn = opened()
    conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block()))
    events = conn.receive_data(frame(DATA, 0, 1, b"after end"))  # half-closed (remote)
    assert events == [StreamReset(1, ErrorCode.STREAM_CLOSED, False)]
    conn.receive_data(frame(HEADERS, END_HEADERS, 3, request_block()))
    events = conn.receive_data(frame(HEADERS, END_HEADERS, 3, encode_headers([(b"x", b"1")])))  # no END_STREAM
    assert events == [StreamReset(3, ErrorCode.PROTOCOL_ERROR, False)]
    conn.receive_data(frame(HEADERS, END_HEADERS, 5, request_block()))
    events = conn.receive_data(frame(WINDOW_UPDATE, 0, 5, struct.pack(">L", 0)))
    assert events == [StreamReset(5, ErrorCode.PROTOCOL_ERROR, False)]
    conn.receive_data(frame(HEADERS, END_HEADERS, 7, request_block()))
    events = conn.receive_data(frame(PRIORITY, 0, 7, struct.pack(">LB", 7, 1)))  # depends on itself
    assert events == [StreamReset(7, ErrorCode.PROTOCOL_ERROR, False)]
    assert resets(conn.data_to_send()) == {1: ErrorCode.STREAM_CLOSED, 3: ErrorCode.PROTOCOL_ERROR,
                                            5: ErrorCode.PROTOCOL_ERROR, 7: ErrorCode.PROTOCOL_ERROR}
    assert not conn.terminated


def test_data_on_a_stream_closed_normally_is_a_connection_error() -> None:
    conn = opened()
    conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block()))
    conn.send_response(1, REPLY_HEADERS, b"", TRAILERS)
    events = conn.receive_data(frame(DATA, 0, 1, b"x"))
    assert [type(e) for e in events] == [ConnectionTerminated]
    assert goaway_code(conn.data_to_send()) == ErrorCode.STREAM_CLOSED


# -- limits --------------------------------------------------------------------------------------------


def test_max_concurrent_streams_refuses_the_excess() -> None:
    conn = opened(max_concurrent_streams=2)
    for sid in (1, 3, 5):
        conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, sid, request_block()))
    assert conn.open_streams == 2
    assert resets(conn.data_to_send()) == {5: ErrorCode.REFUSED_STREAM}
    conn.send_response(1, REPLY_HEADERS, b"", TRAILERS)
    events = conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 7, request_block()))
    assert [e.stream_id for e in events] == [7]


def test_oversized_header_list_gets_431() -> None:
    conn = opened(max_header_list_size=1000)
    big = request_block(extra=[(b"x-big", b"v" * 1200)])
    assert conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, big)) == []
    ((ftype, flags, sid, block),) = parse(conn.data_to_send())
    assert (ftype, flags & END_STREAM, sid) == (HEADERS, END_STREAM, 1)
    assert b"431" in block
    # the connection goes on
    events = conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 3, request_block()))
    assert [type(e) for e in events] == [RequestReceived]


def test_header_block_beyond_the_hard_bound_ends_the_connection() -> None:
    conn = opened(max_header_list_size=1000)  # bound: max(2 x 1000, 16 KiB) compressed bytes
    conn.receive_data(frame(HEADERS, 0, 1, b"\x00" * 10_000))
    events = conn.receive_data(frame(CONTINUATION, 0, 1, b"\x00" * 10_000))
    assert [type(e) for e in events] == [ConnectionTerminated]
    assert goaway_code(conn.data_to_send()) == ErrorCode.ENHANCE_YOUR_CALM


def test_outgoing_header_block_is_split_into_continuations() -> None:
    pair = Pair()
    sid = pair.request(b"\x00\x00\x00\x00\x00")
    message = b"m" * 40_000
    pair.server.send_trailers(sid, REPLY_HEADERS + encode_headers([(b"grpc-status", b"2"), (b"grpc-message", message)]))
    out = pair.server.data_to_send()
    assert [t for t, _, _, _ in parse(out)] == [HEADERS, CONTINUATION, CONTINUATION]
    events = pair.client.receive_data(out)
    (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert (b"grpc-message", message) in resp.headers


@pytest.mark.parametrize(
    "extra",
    [
        [(b"X-Upper", b"1")],
        [(b"connection", b"keep-alive")],
        [(b"te", b"gzip")],
        [(b":protocol", b"x")],
        [(b"x-bad", b"line\r\nbreak")],
        [(b"x-space", b" leading")],
        [(b"content-length", b"abc")],
    ],
)
def test_malformed_requests_are_reset_unseen(extra: list[tuple[bytes, bytes]]) -> None:
    conn = opened()
    assert conn.receive_data(frame(HEADERS, END_HEADERS, 1, request_block(extra=extra))) == []
    assert resets(conn.data_to_send()) == {1: ErrorCode.PROTOCOL_ERROR}


def test_missing_or_misplaced_pseudo_headers_are_malformed() -> None:
    conn = opened()
    no_path = encode_headers([(b":method", b"POST"), (b":scheme", b"http")])
    late = encode_headers([(b":method", b"POST"), (b"x", b"1"), (b":scheme", b"http"), (b":path", b"/a")])
    twice = encode_headers([(b":method", b"POST"), (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a")])
    for sid, block in ((1, no_path), (3, late), (5, twice)):
        assert conn.receive_data(frame(HEADERS, END_HEADERS, sid, block)) == []
    assert resets(conn.data_to_send()) == {1: ErrorCode.PROTOCOL_ERROR, 3: ErrorCode.PROTOCOL_ERROR,
                                            5: ErrorCode.PROTOCOL_ERROR}


def test_content_length_must_match_the_body() -> None:
    conn = opened()
    conn.receive_data(frame(HEADERS, END_HEADERS, 1, request_block(extra=[(b"content-length", b"5")])))
    events = conn.receive_data(frame(DATA, END_STREAM, 1, b"abc"))
    assert events == [StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)]


# -- connection errors ---------------------------------------------------------------------------------

_IDLE_OK = frame(HEADERS, END_HEADERS, 1, request_block())


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (frame(SETTINGS, 0, 0, struct.pack(">HL", 2, 2)), ErrorCode.PROTOCOL_ERROR),  # enable_push 2
        (settings_frame(initial_window_size=2**31), ErrorCode.FLOW_CONTROL_ERROR),
        (settings_frame(max_frame_size=100), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, 0, 0, b"\x00" * 5), ErrorCode.FRAME_SIZE_ERROR),
        (frame(SETTINGS, 0, 1, b""), ErrorCode.PROTOCOL_ERROR),
        (frame(SETTINGS, ACK, 0, b"\x00" * 6), ErrorCode.FRAME_SIZE_ERROR),
        (frame(PING, 0, 0, b"1234567"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(PING, 0, 1, b"12345678"), ErrorCode.PROTOCOL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 0)), ErrorCode.PROTOCOL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**31 - 1)), ErrorCode.FLOW_CONTROL_ERROR),
        (frame(WINDOW_UPDATE, 0, 0, b"\x00"), ErrorCode.FRAME_SIZE_ERROR),
        (frame(WINDOW_UPDATE, 0, 9, struct.pack(">L", 1)), ErrorCode.PROTOCOL_ERROR),  # idle stream
        (frame(DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
        (frame(DATA, 0, 9, b"x"), ErrorCode.PROTOCOL_ERROR),  # idle stream
        (_IDLE_OK + frame(DATA, PADDED, 1, b"\x05ab"), ErrorCode.PROTOCOL_ERROR),  # padding > payload
        (frame(HEADERS, END_HEADERS, 0, request_block()), ErrorCode.PROTOCOL_ERROR),
        (frame(HEADERS, END_HEADERS, 2, request_block()), ErrorCode.PROTOCOL_ERROR),  # even stream id
        (frame(HEADERS, END_HEADERS, 5, request_block()) + frame(HEADERS, END_HEADERS, 3, request_block()),
         ErrorCode.PROTOCOL_ERROR),  # stream id going backwards
        (frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), ErrorCode.COMPRESSION_ERROR),
        (frame(HEADERS, 0, 1, b"\x82") + frame(PING, 0, 0, b"12345678"), ErrorCode.PROTOCOL_ERROR),
        (frame(CONTINUATION, END_HEADERS, 1, b"\x82"), ErrorCode.PROTOCOL_ERROR),
        (frame(RST_STREAM, 0, 0, b"\x00" * 4), ErrorCode.PROTOCOL_ERROR),
        (frame(RST_STREAM, 0, 7, b"\x00" * 4), ErrorCode.PROTOCOL_ERROR),  # idle stream
        (frame(RST_STREAM, 0, 1, b"\x00" * 3), ErrorCode.FRAME_SIZE_ERROR),
        (frame(PRIORITY, 0, 0, b"\x00" * 5), ErrorCode.PROTOCOL_ERROR),
        (frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02"), ErrorCode.PROTOCOL_ERROR),
        (frame(GOAWAY, 0, 0, b"\x00" * 4), ErrorCode.FRAME_SIZE_ERROR),
        (b"\x00\x40\x01" + b"\x00" * 6, ErrorCode.FRAME_SIZE_ERROR),  # a 16,385-byte frame header
    ],
)
def test_connection_errors_send_goaway(wire: bytes, code: ErrorCode) -> None:
    conn = opened()
    events = conn.receive_data(wire)
    assert next(e for e in events if isinstance(e, ConnectionTerminated)).error_code == code
    assert conn.terminated
    assert goaway_code(conn.data_to_send()) == code
    assert conn.receive_data(frame(PING, 0, 0, b"12345678")) == []  # dead: input ignored
    assert conn.data_to_send() == b""
    assert conn.open_streams == 0


def test_bad_preface_and_missing_settings() -> None:
    conn = H2Connection()
    conn.data_to_send()
    events = conn.receive_data(b"GET / HTTP/1.1\r\n")
    assert [type(e) for e in events] == [ConnectionTerminated]
    assert goaway_code(conn.data_to_send()) == ErrorCode.PROTOCOL_ERROR
    conn = H2Connection()
    conn.data_to_send()
    events = conn.receive_data(PREFACE + frame(PING, 0, 0, b"12345678"))
    assert [e.error_code for e in events] == [ErrorCode.PROTOCOL_ERROR]


def test_goaway_from_the_client_is_reported() -> None:
    conn = opened()
    events = conn.receive_data(frame(GOAWAY, 0, 0, struct.pack(">LL", 0, 0) + b"bye"))
    assert events == [ConnectionTerminated(0, 0, "bye", True)]
    assert not conn.terminated


def test_graceful_goaway_refuses_newer_streams_and_lets_open_ones_finish() -> None:
    conn = opened()
    conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block()))
    conn.goaway()
    out = parse(conn.data_to_send())
    assert out == [(GOAWAY, 0, 0, struct.pack(">LL", 1, 0))]
    assert conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 3, request_block())) == []
    assert resets(conn.data_to_send()) == {3: ErrorCode.REFUSED_STREAM}
    conn.send_response(1, REPLY_HEADERS, b"\x00\x00\x00\x00\x00", TRAILERS)
    assert [t for t, _, _, _ in parse(conn.data_to_send())] == [HEADERS, DATA, HEADERS]
    conn.goaway(ErrorCode.INTERNAL_ERROR, "bug")
    assert conn.terminated and goaway_code(conn.data_to_send()) == ErrorCode.INTERNAL_ERROR


def test_hpack_dynamic_table_is_shared_across_streams() -> None:
    enc = Encoder()
    conn = opened()
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a/B"), (b"x-token", b"secret")]
    first = enc.encode(fields)
    second = enc.encode(fields)  # now all indexed
    assert len(second) < len(first)
    (ev1,) = conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, first))
    (ev2,) = conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 3, second))
    assert ev1.headers == ev2.headers == fields


# -- fuzzing ---------------------------------------------------------------------------------------------

_frames = st.builds(
    lambda ftype, flags, sid, payload: frame(ftype, flags, sid, payload),
    st.sampled_from([DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION,
                     PUSH_PROMISE, 0xA, 0xFF]),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]),
    st.one_of(st.binary(max_size=40), st.sampled_from([request_block(), b"\x00" * 8, b"\x00\x00\x00\x01"])),
)


def _check_alive_or_dead(conn: H2Connection, events: list[Any]) -> None:
    out = conn.data_to_send()
    parse(out)  # what we send is always well-formed frames
    if conn.terminated:
        assert not events or isinstance(events[-1], ConnectionTerminated)
        assert conn.receive_data(b"\x00" * 20) == []


@given(st.lists(_frames, max_size=12), st.integers(1, 50))
def test_fuzz_frames_never_raise(frames: list[bytes], chunk: int) -> None:
    conn = opened()
    wire = b"".join(frames)
    for i in range(0, len(wire), chunk):
        events = conn.receive_data(wire[i : i + chunk])
        _check_alive_or_dead(conn, events)
        for ev in events:  # what a shell would do: answer whatever request arrives
            if isinstance(ev, RequestReceived) and conn.is_open(ev.stream_id):
                conn.send_response(ev.stream_id, REPLY_HEADERS, b"\x00\x00\x00\x00\x00", TRAILERS)
            if isinstance(ev, DataReceived):
                conn.acknowledge_received_data(ev.stream_id, len(ev.data))
        _check_alive_or_dead(conn, events)


@given(st.binary(max_size=300))
def test_fuzz_random_bytes_after_the_preface(junk: bytes) -> None:
    conn = H2Connection()
    events = conn.receive_data(PREFACE + settings_frame() + junk)
    _check_alive_or_dead(conn, events)


def test_indexed_only_blocks_are_cached_until_the_table_changes() -> None:
    enc = Encoder()
    conn = opened()
    base = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/")]  # all in the static table
    enc.encode([*base, (b"x-token", b"one")])  # warm the encoder's table like the decoder's
    conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 1, Encoder().encode([*base, (b"x-token", b"one")])))
    indexed = enc.encode([*base, (b"x-token", b"one")])
    assert min(indexed) > 0x80  # all indexed: cacheable
    for sid in (3, 5):
        (ev,) = conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, sid, indexed))
        assert ev.headers == [*base, (b"x-token", b"one")]
    # A new literal with indexing shifts the dynamic table: the same bytes now mean something else.
    enc2 = Encoder()
    enc2.encode([*base, (b"x-token", b"one")])
    changed = enc2.encode([*base, (b"x-token", b"two")])
    conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 7, changed))
    (ev,) = conn.receive_data(frame(HEADERS, END_HEADERS | END_STREAM, 9, indexed))
    assert ev.headers == [*base, (b"x-token", b"two")]  # index 62 is now the newest entry


_field = st.tuples(
    st.sampled_from([b"x-a", b"content-length", b":path", b"user-agent", b"x-" + b"n" * 130]),
    st.one_of(st.binary(max_size=5), st.just(b"v" * 200)),
    st.booleans(),  # sensitive: never indexed
)


@given(st.lists(st.lists(_field, min_size=1, max_size=6), min_size=1, max_size=6), st.booleans())
def test_table_neutral_agrees_with_hpack(blocks: list[list[tuple[bytes, bytes, bool]]], huffman: bool) -> None:
    from hpack import Decoder

    from coord_server.h2conn import _table_neutral

    enc, dec = Encoder(), Decoder()
    for fields in blocks:
        block = enc.encode([(n, v, s) for n, v, s in fields], huffman=huffman)  # type: ignore[misc]
        before = list(dec.header_table.dynamic_entries)
        dec.decode(block, raw=True)
        assert _table_neutral(block) == (list(dec.header_table.dynamic_entries) == before)
