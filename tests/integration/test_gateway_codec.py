"""The gateway's sans-io JSON codec (no server): jsonpb output, input rules, Go's base64 and scanner.

The texts asserted here are Go's; tests/interop/test_http_gateway.py checks the same behaviour against
real etcd 3.4.23 over HTTP.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coord._pb import kv_pb2, rpc_pb2
from coord_server.gateway import GATEWAY_ROUTES, go_clean_path
from coord_server.gateway_codec import (
    JsonError,
    JsonStream,
    decode_message,
    encode_message,
    go_base64_decode,
    go_json_string,
    scan_value,
)


def test_encode_uses_proto_names_strings_for_64_bit_and_omits_defaults() -> None:
    resp = rpc_pb2.RangeResponse(
        header=rpc_pb2.ResponseHeader(cluster_id=2**64 - 1, member_id=1, revision=4, raft_term=2),
        kvs=[kv_pb2.KeyValue(key=b"foo", create_revision=2, mod_revision=4, version=3, value=b"baz")],
        count=1,
    )
    assert encode_message(resp) == (
        '{"header":{"cluster_id":"18446744073709551615","member_id":"1","revision":"4","raft_term":"2"},'
        '"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"4","version":"3","value":"YmF6"}],"count":"1"}')
    assert encode_message(rpc_pb2.TxnResponse(succeeded=False)) == "{}"
    ev = rpc_pb2.WatchResponse(watch_id=-1, events=[kv_pb2.Event(type=kv_pb2.Event.DELETE, kv=kv_pb2.KeyValue())])
    assert encode_message(ev) == '{"watch_id":"-1","events":[{"type":"DELETE","kv":{}}]}'
    # A oneof member is written even when zero; uint32 stays a number; unknown enum values as numbers.
    assert encode_message(rpc_pb2.Compare(version=0)) == '{"version":"0"}'
    assert encode_message(rpc_pb2.HashResponse(hash=7)) == '{"hash":7}'
    assert encode_message(rpc_pb2.AlarmMember(alarm=9)) == '{"alarm":9}'  # type: ignore[arg-type]


def test_go_string_escapes() -> None:
    assert go_json_string('a"b\\c') == '"a\\"b\\\\c"'
    assert go_json_string("<&>\u2028\b\f\n\x01") == '"\\u003c\\u0026\\u003e\\u2028\\u0008\\u000c\\n\\u0001"'
    assert go_json_string("ключ") == '"ключ"'


@given(st.binary(max_size=64), st.binary(max_size=64), st.integers(-(2**63), 2**63 - 1),
       st.sampled_from([0, 1, 2]), st.booleans())
def test_decode_reads_what_encode_writes(key: bytes, end: bytes, rev: int, order: int, keys_only: bool) -> None:
    req = rpc_pb2.RangeRequest(key=key, range_end=end, revision=rev, sort_order=order,  # type: ignore[arg-type]
                               keys_only=keys_only)
    assert decode_message(encode_message(req).encode(), rpc_pb2.RangeRequest) == req


def test_decode_accepts_both_spellings_numbers_as_strings_and_enum_numbers() -> None:
    msg = decode_message(b'{"rangeEnd":"YQ==","range_end":"Yg==","limit":"5","sortOrder":2,"sort_target":"MOD"}',
                         rpc_pb2.RangeRequest)
    assert (msg.range_end, msg.limit, msg.sort_order, msg.sort_target) == (b"a", 5, 2, 3)
    txn = decode_message(json.dumps({"success": [{"requestPut": {"key": "YQ=="}}, {"request_range": None}],
                                     "compare": [{"version": None}]}).encode(), rpc_pb2.TxnRequest)
    assert txn.success[0].WhichOneof("request") == "request_put"
    assert txn.success[1].WhichOneof("request") is None  # a null message member selects nothing
    assert txn.compare[0].WhichOneof("target_union") == "version"  # a null scalar member selects it
    assert decode_message(b"  ", rpc_pb2.RangeRequest) == rpc_pb2.RangeRequest()
    assert decode_message(b'{"key":[1,2,null]}', rpc_pb2.RangeRequest).key == b"\x01\x02\x00"


@pytest.mark.parametrize(("body", "error"), [
    (b'{"key":', "unexpected EOF"),
    (b"[1,2", "unexpected EOF"),
    (b'{"a" 1}', "invalid character '1' after object key"),
    (b'{"a":1 2}', "invalid character '2' after object key:value pair"),
    (b"[1 2]", "invalid character '2' after array element"),
    (b"{1}", "invalid character '1' looking for beginning of object key string"),
    (b'{"a":-x}', "invalid character 'x' in numeric literal"),
    (b'{"a":1.x}', "invalid character 'x' after decimal point in numeric literal"),
    (b'{"a":1ex}', "invalid character 'x' in exponent of numeric literal"),
    (b'{"a":nil}', "invalid character 'i' in literal null (expecting 'u')"),
    (b'{"a":"\\q"}', "invalid character 'q' in string escape code"),
    (b'{"a":"\\u12x4"}', "invalid character 'x' in \\u hexadecimal character escape"),
    (b'{"a":"\x01"}', "invalid character '\\x01' in string literal"),
    (b"\xff", "invalid character '\u00ff' looking for beginning of value"),
    (b'{"key":"Zm9v","limit":"x1"}', "invalid character 'x' looking for beginning of value"),
    (b'{"key":"Zm9v","limit":""}', "unexpected end of JSON input"),
    (b'{"key":"Zm9v","limit":"1 2"}', "invalid character '2' after top-level value"),
    (b'{"key":"Zm9v","limit":-9223372036854775809}',
     "json: cannot unmarshal number -9223372036854775809 into Go value of type int64"),
    (b'{"key":"Zm9v","sort_order":"1"}', 'unknown value "1" for enum etcdserverpb.RangeRequest_SortOrder'),
    (b'{"key":"Zm9v","serializable":0}', "json: cannot unmarshal number into Go value of type bool"),
    (b'{"key":{}}', "json: cannot unmarshal object into Go value of type []uint8"),
])
def test_decode_errors_are_go_texts(body: bytes, error: str) -> None:
    with pytest.raises(JsonError) as exc:
        decode_message(body, rpc_pb2.RangeRequest)
    assert exc.value.message == error


@pytest.mark.parametrize(("data", "result"), [
    (b"", b""), (b"Zm9v", b"foo"), (b"Zm8=", b"fo"), (b"Zg==", b"f"), (b"Zm9v\r\nYmFy", b"foobar"),
    (b"Zh==", b"f"),  # non-canonical trailing bits are accepted (not strict)
    (b"Zg=\n=", b"f"),
])
def test_go_base64_accepts(data: bytes, result: bytes) -> None:
    assert go_base64_decode(data) == result


@pytest.mark.parametrize(("data", "offset"), [
    (b"Zm9", 0), (b"Zm9v_", 4), (b"Zg", 0), (b"Zg=", 3), (b"Z===", 1), (b"Zm9v====", 4), (b"Zg==Zg==", 4),
    (b"Zm-v", 2), (b"=", 0),
])
def test_go_base64_refuses_with_go_offsets(data: bytes, offset: int) -> None:
    with pytest.raises(JsonError) as exc:
        go_base64_decode(data)
    assert exc.value.message == f"illegal base64 data at input byte {offset}"


@given(st.binary(max_size=100))
def test_go_base64_agrees_with_python_on_canonical_input(data: bytes) -> None:
    assert go_base64_decode(base64.b64encode(data)) == data


def test_scan_value_frames_values_incrementally() -> None:
    assert scan_value('{"a":[1,{"b":"}"}]}x', 0, final=False) == 19
    assert scan_value("123", 0, final=False) is None  # a number may go on
    assert scan_value("123", 0, final=True) == 3
    assert scan_value('{"a":', 0, final=False) is None


def test_json_stream_splits_concatenated_requests() -> None:
    s = JsonStream(rpc_pb2.LeaseKeepAliveRequest, max_message=100)
    s.feed(b'{"ID":1}{"ID"')
    assert s.next() == rpc_pb2.LeaseKeepAliveRequest(ID=1)
    assert s.next() is None and not s.ended
    s.feed(b':"2"}\n  {"ID":3} ')
    assert [s.next(), s.next(), s.next()] == [rpc_pb2.LeaseKeepAliveRequest(ID=2),
                                             rpc_pb2.LeaseKeepAliveRequest(ID=3), None]
    s.close()
    assert s.ended
    bad = JsonStream(rpc_pb2.LeaseKeepAliveRequest, max_message=100)
    bad.feed(b'{"ID":')
    bad.close()
    with pytest.raises(JsonError, match="unexpected EOF"):
        bad.next()
    endless = JsonStream(rpc_pb2.LeaseKeepAliveRequest, max_message=100)
    endless.feed(b'{"ID":"' + b"1" * 200)
    with pytest.raises(JsonError):
        endless.next()


def test_routes_and_path_cleaning() -> None:
    assert GATEWAY_ROUTES["kv/lease/revoke"] == GATEWAY_ROUTES["lease/revoke"] == "/etcdserverpb.Lease/LeaseRevoke"
    assert GATEWAY_ROUTES["maintenance/hash"] == "/etcdserverpb.Maintenance/Hash"
    # Every etcd 3.4 method but HashKV (its route is Hash's), plus the three /v3/kv/lease/* aliases.
    assert (len(set(GATEWAY_ROUTES.values())), len(GATEWAY_ROUTES)) == (45, 48)
    assert go_clean_path("/v3//kv/./range") == "/v3/kv/range"
    assert go_clean_path("/v3/kv/../kv/range/") == "/v3/kv/range/"
    assert go_clean_path("//v3/../..") == "/"
    assert go_clean_path("v3") == "/v3"
