"""gRPC-over-HTTP/2 helpers: message framing, grpc-timeout, status blocks (grpc-go's texts)."""

from __future__ import annotations

import pytest
from hpack import Decoder
from hypothesis import given
from hypothesis import strategies as st

from coord_server.errors import Code, EtcdError
from coord_server.h2grpc import (
    RESPONSE_HEADERS,
    TRAILERS_OK,
    MessageReader,
    frame_message,
    parse_timeout,
    percent_encode,
    status_block,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1S", 1.0), (b"300m", 0.3), (b"2M", 120.0), (b"1H", 3600.0), (b"99999999u", 99.999999), (b"5n", 5e-9)],
)
def test_parse_timeout(value: bytes, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"1", b"S", b"123456789S", b"1x", b"-1S", b"1 S", b"1S "])
def test_malformed_timeout(value: bytes) -> None:
    with pytest.raises(ValueError, match="malformed time-out"):
        parse_timeout(value)


def test_percent_encoding_is_grpcs() -> None:
    assert percent_encode("plain text: ok") == b"plain text: ok"
    assert percent_encode("100% sure") == b"100%25 sure"
    assert percent_encode("ü\tx\n") == b"%C3%BC%09x%0A"


def test_status_blocks_decode_to_grpc_headers() -> None:
    dec = Decoder()
    assert dec.decode(RESPONSE_HEADERS + TRAILERS_OK, raw=True) == [
        (b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"0")]
    block = status_block(Code.NOT_FOUND, "unknown service", trailers_only=True)
    assert dec.decode(block, raw=True)[2:] == [(b"grpc-status", b"5"), (b"grpc-message", b"unknown service")]
    assert dec.decode(status_block(Code.UNKNOWN, "x" * 300, trailers_only=False), raw=True) == [
        (b"grpc-status", b"2"), (b"grpc-message", b"x" * 300)]


def test_reader_splits_and_joins_messages() -> None:
    reader = MessageReader(100)
    wire = frame_message(b"a") + frame_message(b"") + frame_message(b"bcd" * 10)
    assert reader.feed(wire) == [b"a", b"", b"bcd" * 10]
    out: list[bytes] = []
    for i in range(len(wire)):  # one byte at a time
        out += reader.feed(wire[i : i + 1])
        if i == 3:
            assert reader.partial  # inside the first prefix
    assert out == [b"a", b"", b"bcd" * 10] and not reader.partial


def test_reader_refuses_from_the_prefix() -> None:
    reader = MessageReader(100)
    with pytest.raises(EtcdError) as info:
        reader.feed(b"\x00\x00\x00\x00\x65")  # 101 bytes announced: refused before any body
    assert info.value == EtcdError(Code.RESOURCE_EXHAUSTED, "grpc: received message larger than max (101 vs. 100)")
    with pytest.raises(EtcdError) as info:
        MessageReader(100).feed(b"\x01\x00\x00\x00\x01x")
    assert info.value.code == Code.UNIMPLEMENTED and "compressed" in info.value.message
    with pytest.raises(EtcdError) as info:
        MessageReader(100).feed(b"\x07\x00\x00\x00\x01x")
    assert info.value == EtcdError(Code.INTERNAL, "grpc: received unexpected payload format 7")
    assert MessageReader(100).feed(frame_message(b"y" * 100)) == [b"y" * 100]  # the limit is inclusive


@given(st.lists(st.binary(max_size=50), max_size=8), st.integers(1, 30))
def test_reader_any_chunking(messages: list[bytes], chunk: int) -> None:
    wire = b"".join(frame_message(m) for m in messages)
    reader = MessageReader(1000)
    out: list[bytes] = []
    for i in range(0, len(wire), chunk):
        out += reader.feed(wire[i : i + chunk])
    assert out == messages and not reader.partial
