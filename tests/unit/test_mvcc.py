"""Example-based tests of the sans-io MVCC store (coord_server.mvcc).

Expected behaviour is etcd 3.4.23's (reference/etcd-api.md §2.1-2.6); where a rule comes
from the etcd source the comment names the file (paths are in the v3.4.23 tree).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import crc32c
import pytest

from coord._pb import kv_pb2, rpc_pb2
from coord_server import errors, mvcc, validation

KV = kv_pb2.KeyValue
RR = rpc_pb2.RangeRequest
CMP = rpc_pb2.Compare

KNOWN_LEASES = frozenset({5, 7})
FRESH_HASH = 1084519789  # crc32c(b"key"): `etcdctl endpoint hashkv` on a fresh etcd


# ---------------------------------------------------------------------------- helpers


def leased_store() -> mvcc.Store:
    return mvcc.Store(lease_exists=lambda lease: lease in KNOWN_LEASES)


def put(store: mvcc.Store, key: bytes, value: bytes = b"", **kw: object) -> rpc_pb2.PutResponse:
    return store.put(rpc_pb2.PutRequest(key=key, value=value, **kw))


def delete(store: mvcc.Store, key: bytes, range_end: bytes = b"", **kw: object) -> rpc_pb2.DeleteRangeResponse:
    return store.delete_range(rpc_pb2.DeleteRangeRequest(key=key, range_end=range_end, **kw))


def rng(store: mvcc.Store, key: bytes, range_end: bytes = b"", current: int | None = None,
        **kw: object) -> mvcc.RangeResult:
    return store.range(RR(key=key, range_end=range_end, **kw), store.rev if current is None else current)


def keys(res: mvcc.RangeResult | rpc_pb2.RangeResponse) -> list[bytes]:
    return [kv.key for kv in res.kvs]


def kvt(kv: kv_pb2.KeyValue) -> tuple[bytes, bytes, int, int, int, int]:
    return (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


def op_put(key: bytes, value: bytes = b"", **kw: object) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, **kw))


def op_del(key: bytes, range_end: bytes = b"", **kw: object) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key, range_end=range_end, **kw))


def op_range(key: bytes, range_end: bytes = b"", **kw: object) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_range=RR(key=key, range_end=range_end, **kw))


def txn_req(compare: Sequence[rpc_pb2.Compare] = (), success: Sequence[rpc_pb2.RequestOp] = (),
            failure: Sequence[rpc_pb2.RequestOp] = ()) -> rpc_pb2.TxnRequest:
    return rpc_pb2.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))


def op_txn(compare: Sequence[rpc_pb2.Compare] = (), success: Sequence[rpc_pb2.RequestOp] = (),
           failure: Sequence[rpc_pb2.RequestOp] = ()) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_txn=txn_req(compare, success, failure))


def txn(store: mvcc.Store, compare: Sequence[rpc_pb2.Compare] = (), success: Sequence[rpc_pb2.RequestOp] = (),
        failure: Sequence[rpc_pb2.RequestOp] = ()) -> rpc_pb2.TxnResponse:
    return store.txn(txn_req(compare, success, failure))


_OPERAND = {
    CMP.VALUE: "value",
    CMP.VERSION: "version",
    CMP.CREATE: "create_revision",
    CMP.MOD: "mod_revision",
    CMP.LEASE: "lease",
}


def cmp(key: bytes, target: int, result: int, operand: int | bytes | None = None,
        range_end: bytes = b"") -> rpc_pb2.Compare:
    c = CMP(key=key, range_end=range_end, target=target, result=result)
    if operand is not None:
        setattr(c, _OPERAND[target], operand)
    return c


def rec_t(rec: mvcc.Record) -> tuple[int, int, bool, bytes]:
    return (rec.main, rec.sub, rec.tombstone, rec.kv.SerializeToString())


def state(store: mvcc.Store) -> tuple[object, ...]:
    """Everything observable about a store, for before/after comparisons."""
    full = rng(store, b"\x00", b"\x00")
    return (
        store.rev,
        store.compact_rev,
        store.live_keys,
        [kvt(kv) for kv in full.kvs],
        [rec_t(r) for r in store.all_records()],
        [rec_t(r) for r in store.pending],
        store.hash_kv(0, store.rev),
        sorted(store.keys_with_lease()),
    )


@contextmanager
def raises(expected: errors.EtcdError) -> Iterator[pytest.ExceptionInfo[errors.EtcdError]]:
    """pytest.raises for one exact etcd error (code and message)."""
    with pytest.raises(errors.EtcdError) as info:
        yield info
    assert info.value == expected, (info.value, expected)


def live(store: mvcc.Store, key: bytes) -> kv_pb2.KeyValue:
    kv = store.get(key)
    assert kv is not None, key
    return kv


def manual_hash(records: Iterable[tuple[int, int, bool, bytes]]) -> int:
    """etcd's HashKV written out by hand: crc32c("key" + backend key + backend value ...)."""
    h = crc32c.crc32c(b"key")
    for main, sub, tomb, value in records:
        bkey = struct.pack(">Q", main) + b"_" + struct.pack(">Q", sub) + (b"t" if tomb else b"")
        h = crc32c.crc32c(bkey, h)
        h = crc32c.crc32c(value, h)
    return h


# ---------------------------------------------------------------------------- revision rules


def test_fresh_store() -> None:
    s = mvcc.Store()
    assert (s.rev, s.compact_rev, s.live_keys, s.key_count()) == (1, -1, 0, 0)
    assert list(s.all_records()) == []
    assert s.take_pending() == []
    res = rng(s, b"\x00", b"\x00")
    assert (res.kvs, res.count, res.more) == ([], 0, False)


def test_each_put_bumps_the_revision_even_with_the_same_value() -> None:
    s = mvcc.Store()
    assert put(s, b"a", b"1").header.revision == 2
    assert put(s, b"a", b"1").header.revision == 3
    assert put(s, b"b", b"1").header.revision == 4
    assert s.rev == 4
    assert [(r.main, r.sub) for r in s.take_pending()] == [(2, 0), (3, 0), (4, 0)]


def test_delete_of_nothing_does_not_bump() -> None:
    s = mvcc.Store()
    put(s, b"a")
    s.take_pending()
    resp = delete(s, b"zz")
    assert (resp.deleted, resp.header.revision, s.rev) == (0, 2, 2)
    resp = delete(s, b"b", b"c")
    assert (resp.deleted, resp.header.revision, s.rev) == (0, 2, 2)
    assert s.take_pending() == []


def test_delete_of_many_keys_is_one_revision_with_sub_revisions() -> None:
    s = mvcc.Store()
    for k in (b"a", b"b", b"c"):
        put(s, k)
    s.take_pending()
    resp = delete(s, b"a", b"\x00")
    assert (resp.deleted, resp.header.revision, s.rev) == (3, 5, 5)
    recs = s.take_pending()
    assert [(r.main, r.sub, r.tombstone, r.key) for r in recs] == [
        (5, 0, True, b"a"), (5, 1, True, b"b"), (5, 2, True, b"c")]
    # A tombstone carries the watch-event shape: key and mod_revision only.
    assert recs[0].kv == KV(key=b"a", mod_revision=5)
    assert s.live_keys == 0


def test_txn_with_three_puts_is_one_revision() -> None:
    s = mvcc.Store()
    resp = txn(s, success=[op_put(b"a", b"1"), op_put(b"b", b"2"), op_put(b"c", b"3")])
    assert resp.succeeded
    assert (s.rev, resp.header.revision) == (2, 2)
    recs = s.take_pending()
    assert [(r.main, r.sub, r.key) for r in recs] == [(2, 0, b"a"), (2, 1, b"b"), (2, 2, b"c")]
    assert [r.response_put.header.revision for r in resp.responses] == [2, 2, 2]
    assert [kvt(kv) for kv in rng(s, b"a", b"z").kvs] == [
        (b"a", b"1", 2, 2, 1, 0), (b"b", b"2", 2, 2, 1, 0), (b"c", b"3", 2, 2, 1, 0)]


def test_failed_compare_without_ops_does_not_bump() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")
    s.take_pending()
    resp = txn(s, compare=[cmp(b"a", CMP.VALUE, CMP.EQUAL, b"nope")], success=[op_put(b"a", b"2")])
    assert not resp.succeeded
    assert (len(resp.responses), resp.header.revision, s.rev) == (0, 2, 2)
    assert s.take_pending() == []


def test_empty_txn_succeeds_without_a_bump() -> None:
    s = mvcc.Store()
    resp = s.txn(rpc_pb2.TxnRequest())
    assert resp.succeeded and len(resp.responses) == 0
    assert (resp.header.revision, s.rev) == (1, 1)


def test_txn_that_deletes_nothing_does_not_bump() -> None:
    s = mvcc.Store()
    put(s, b"a")
    s.take_pending()
    resp = txn(s, success=[op_del(b"x"), op_del(b"y", b"z")])
    assert resp.header.revision == 2 and s.rev == 2
    assert [r.response_delete_range.deleted for r in resp.responses] == [0, 0]
    assert s.take_pending() == []


def test_read_only_txn_does_not_bump() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")
    s.take_pending()
    req = txn_req(success=[op_range(b"a")], failure=[op_range(b"b")])
    assert s.is_read_only_txn(req)
    for resp in (s.txn(req), s.read_txn(req, s.rev)):
        assert resp.succeeded and resp.header.revision == 2
        assert [kvt(kv) for kv in resp.responses[0].response_range.kvs] == [(b"a", b"1", 2, 2, 1, 0)]
    assert s.rev == 2 and s.take_pending() == []
    assert not s.is_read_only_txn(txn_req(success=[op_range(b"a")], failure=[op_put(b"a")]))
    assert not s.is_read_only_txn(txn_req(success=[op_del(b"a")]))


def test_read_txn_reads_at_the_given_revision() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")
    put(s, b"a", b"2")
    resp = s.read_txn(txn_req(success=[op_range(b"a")]), 2)
    assert resp.header.revision == 2
    assert resp.responses[0].response_range.header.revision == 2
    assert [kv.value for kv in resp.responses[0].response_range.kvs] == [b"1"]


# ---------------------------------------------------------------------------- versions


def test_version_create_and_mod_revision_across_delete_and_recreate() -> None:
    s = mvcc.Store()
    put(s, b"k", b"1")  # 2
    put(s, b"k", b"2")  # 3
    put(s, b"k", b"3")  # 4
    assert kvt(s.get(b"k")) == (b"k", b"3", 2, 4, 3, 0)  # type: ignore[arg-type]
    delete(s, b"k")  # 5
    assert s.get(b"k") is None and rng(s, b"k").count == 0
    put(s, b"k", b"4")  # 6
    assert kvt(s.get(b"k")) == (b"k", b"4", 6, 6, 1, 0)  # type: ignore[arg-type]
    # History keeps each incarnation.
    assert [kvt(kv) for kv in rng(s, b"k", revision=3).kvs] == [(b"k", b"2", 2, 3, 2, 0)]
    assert rng(s, b"k", revision=5).kvs == []
    assert rng(s, b"k", revision=1).kvs == []
    assert s.live_keys == 1


# ---------------------------------------------------------------------------- Range


@pytest.fixture
def abc() -> mvcc.Store:
    """Keys a, b, c whose VERSION, CREATE, MOD and VALUE orders all differ from key order and each other.

    a: value "1", create 3, mod 6, version 3; b: "3", 4, 4, 1; c: "2", 2, 7, 2.
    """
    s = mvcc.Store()
    put(s, b"c", b"x")  # 2
    put(s, b"a", b"x")  # 3
    put(s, b"b", b"3")  # 4
    put(s, b"a", b"x")  # 5
    put(s, b"a", b"1")  # 6
    put(s, b"c", b"2")  # 7
    return s


def test_prefix_end() -> None:
    assert mvcc.prefix_end(b"foo") == b"fop"
    assert mvcc.prefix_end(b"a\xff") == b"b"
    assert mvcc.prefix_end(b"a\xff\xff") == b"b"
    assert mvcc.prefix_end(b"\xff") == b"\x00"
    assert mvcc.prefix_end(b"\xff\xff") == b"\x00"


def test_range_end_conventions() -> None:
    s = mvcc.Store()
    for k in (b"a", b"ab", b"abc", b"b", b"b\xff", b"c", b"\xff", b"\xff\x01"):
        put(s, k)
    assert keys(rng(s, b"ab")) == [b"ab"]  # empty range_end: the key alone
    assert keys(rng(s, b"zz")) == []
    assert keys(rng(s, b"ab", b"b")) == [b"ab", b"abc"]  # half-open
    assert keys(rng(s, b"a", b"c")) == [b"a", b"ab", b"abc", b"b", b"b\xff"]
    assert keys(rng(s, b"b", b"\x00")) == [b"b", b"b\xff", b"c", b"\xff", b"\xff\x01"]  # from key
    assert keys(rng(s, b"\x00", b"\x00")) == [
        b"a", b"ab", b"abc", b"b", b"b\xff", b"c", b"\xff", b"\xff\x01"]  # everything
    assert keys(rng(s, b"ab", mvcc.prefix_end(b"ab"))) == [b"ab", b"abc"]
    assert keys(rng(s, b"b\xff", mvcc.prefix_end(b"b\xff"))) == [b"b\xff"]
    assert keys(rng(s, b"\xff", mvcc.prefix_end(b"\xff"))) == [b"\xff", b"\xff\x01"]


@pytest.mark.parametrize(("key", "end"), [(b"b", b"b"), (b"b", b"a"), (b"c", b"\x00\x00"), (b"b", b"\x01")])
def test_range_end_at_or_below_key_is_empty(key: bytes, end: bytes) -> None:
    s = mvcc.Store()
    for k in (b"a", b"b", b"c"):
        put(s, k)
    res = rng(s, key, end)
    assert (res.kvs, res.count, res.more) == ([], 0, False)
    resp = delete(s, key, end)
    assert (resp.deleted, s.rev, s.live_keys) == (0, 4, 3)


def test_limit_and_more(abc: mvcc.Store) -> None:
    res = rng(abc, b"a", b"\x00", limit=2)
    assert (keys(res), res.count, res.more) == ([b"a", b"b"], 3, True)
    res = rng(abc, b"a", b"\x00", limit=3)
    assert (keys(res), res.count, res.more) == ([b"a", b"b", b"c"], 3, False)
    res = rng(abc, b"a", b"\x00", limit=10)
    assert (keys(res), res.count, res.more) == ([b"a", b"b", b"c"], 3, False)
    res = rng(abc, b"a", b"\x00", limit=0)
    assert (keys(res), res.more) == ([b"a", b"b", b"c"], False)
    res = rng(abc, b"a", b"\x00", limit=-1)  # a negative limit means no limit, as in etcd
    assert (keys(res), res.more) == ([b"a", b"b", b"c"], False)


SORTED = {
    RR.KEY: [b"a", b"b", b"c"],
    RR.VERSION: [b"b", b"c", b"a"],
    RR.CREATE: [b"c", b"a", b"b"],
    RR.MOD: [b"b", b"a", b"c"],
    RR.VALUE: [b"a", b"c", b"b"],
}


@pytest.mark.parametrize("target", list(SORTED))
def test_sort_by_every_target(abc: mvcc.Store, target: int) -> None:
    asc = rng(abc, b"a", b"\x00", sort_target=target, sort_order=RR.ASCEND)
    assert keys(asc) == SORTED[target]
    desc = rng(abc, b"a", b"\x00", sort_target=target, sort_order=RR.DESCEND)
    assert keys(desc) == SORTED[target][::-1]
    assert asc.count == desc.count == 3
    # The limit is applied after the sort (apply.go Range).
    res = rng(abc, b"a", b"\x00", sort_target=target, sort_order=RR.DESCEND, limit=1)
    assert (keys(res), res.count, res.more) == ([SORTED[target][-1]], 3, True)


@pytest.mark.parametrize("target", [RR.VERSION, RR.CREATE, RR.MOD, RR.VALUE])
def test_sort_target_other_than_key_with_order_none_means_ascend(abc: mvcc.Store, target: int) -> None:
    res = rng(abc, b"a", b"\x00", sort_target=target, sort_order=RR.NONE)
    assert keys(res) == SORTED[target]


def test_sort_key_with_order_none_is_key_order(abc: mvcc.Store) -> None:
    assert keys(rng(abc, b"a", b"\x00", sort_target=RR.KEY, sort_order=RR.NONE)) == [b"a", b"b", b"c"]


def test_sort_ties_keep_key_order() -> None:
    # Go's sort.Sort is an insertion sort for < 12 elements, so ties stay in key order both ways.
    s = mvcc.Store()
    for k in (b"a", b"b", b"c", b"d"):
        put(s, k, b"same")
    put(s, b"c", b"same")
    asc = rng(s, b"a", b"\x00", sort_target=RR.VALUE, sort_order=RR.ASCEND)
    desc = rng(s, b"a", b"\x00", sort_target=RR.VALUE, sort_order=RR.DESCEND)
    assert keys(asc) == keys(desc) == [b"a", b"b", b"c", b"d"]
    assert keys(rng(s, b"a", b"\x00", sort_target=RR.VERSION, sort_order=RR.DESCEND)) == [b"c", b"a", b"b", b"d"]


def test_sort_target_with_order_none_and_limit_sorts_only_the_first_limit_plus_one_keys(abc: mvcc.Store) -> None:
    """etcd quirk: apply.go Range picks the fetch limit from the *request's* sort_order (NONE), so it
    reads limit+1 keys in key order, and only then turns NONE into ASCEND and sorts those.
    `etcdctl get --sort-by=CREATE --limit=1` (no --order) sends exactly this request."""
    res = rng(abc, b"a", b"\x00", sort_target=RR.CREATE, sort_order=RR.NONE, limit=1)
    # etcd reads [a (create 3), b (create 4)], sorts them by create, keeps a.
    assert (keys(res), res.count, res.more) == ([b"a"], 3, True)


@pytest.mark.parametrize("target", list(SORTED))
def test_unknown_sort_order_sorts_nothing(abc: mvcc.Store, target: int) -> None:
    """apply.go Range: an order other than NONE reads everything, but only ASCEND/DESCEND sort, so an unknown
    order (protobuf keeps unknown enum numbers; etcd 3.4 does not validate it) gives key order, cut to limit."""
    res = rng(abc, b"a", b"\x00", sort_target=target, sort_order=7)
    assert keys(res) == [b"a", b"b", b"c"]
    res = rng(abc, b"a", b"\x00", sort_target=target, sort_order=7, limit=2)
    assert (keys(res), res.count, res.more) == ([b"a", b"b"], 3, True)


def test_count_is_taken_before_filters_and_limit(abc: mvcc.Store) -> None:
    res = rng(abc, b"a", b"\x00", max_create_revision=1)
    assert (res.kvs, res.count, res.more) == ([], 3, False)
    res = rng(abc, b"a", b"\x00", limit=1)
    assert (res.count, res.more) == (3, True)
    res = rng(abc, b"a", b"\x00", min_mod_revision=5, limit=1)
    assert (keys(res), res.count, res.more) == ([b"a"], 3, True)
    res = rng(abc, b"a", b"\x00", min_mod_revision=5, limit=2)
    assert (keys(res), res.count, res.more) == ([b"a", b"c"], 3, False)


@pytest.mark.parametrize(("opts", "expected"), [
    ({"min_mod_revision": 6}, [b"a", b"c"]),
    ({"min_mod_revision": 7}, [b"c"]),
    ({"max_mod_revision": 6}, [b"a", b"b"]),
    ({"max_mod_revision": 3}, []),
    ({"min_create_revision": 3}, [b"a", b"b"]),
    ({"min_create_revision": 5}, []),
    ({"max_create_revision": 3}, [b"a", b"c"]),
    ({"max_create_revision": 2}, [b"c"]),
    ({"min_mod_revision": 4, "max_mod_revision": 6}, [b"a", b"b"]),
    ({"min_create_revision": 3, "max_mod_revision": 5}, [b"b"]),
])
def test_min_max_filters(abc: mvcc.Store, opts: dict[str, int], expected: list[bytes]) -> None:
    res = rng(abc, b"a", b"\x00", **opts)
    assert (keys(res), res.count, res.more) == (expected, 3, False)


def test_filters_then_sort(abc: mvcc.Store) -> None:
    res = rng(abc, b"a", b"\x00", min_mod_revision=6, sort_target=RR.VERSION, sort_order=RR.ASCEND)
    assert keys(res) == [b"c", b"a"]


def test_keys_only_clears_values_only(abc: mvcc.Store) -> None:
    res = rng(abc, b"a", b"\x00", keys_only=True)
    assert [kvt(kv) for kv in res.kvs] == [
        (b"a", b"", 3, 6, 3, 0), (b"b", b"", 4, 4, 1, 0), (b"c", b"", 2, 7, 2, 0)]
    # and does not touch the stored values
    assert abc.get(b"a").value == b"1"  # type: ignore[union-attr]


def test_count_only(abc: mvcc.Store) -> None:
    res = rng(abc, b"a", b"\x00", count_only=True)
    assert (res.kvs, res.count, res.more) == ([], 3, False)
    res = rng(abc, b"a", b"\x00", count_only=True, limit=1)
    assert (res.kvs, res.count, res.more) == ([], 3, False)
    res = rng(abc, b"a", b"\x00", count_only=True, max_create_revision=1)
    assert (res.kvs, res.count) == ([], 3)
    res = rng(abc, b"a", b"\x00", count_only=True, revision=4)
    assert (res.kvs, res.count) == ([], 3)
    assert rng(abc, b"a", count_only=True, revision=2).count == 0


def test_range_at_past_revisions(abc: mvcc.Store) -> None:
    assert [kvt(kv) for kv in rng(abc, b"a", b"\x00", revision=1).kvs] == []
    assert [kvt(kv) for kv in rng(abc, b"a", b"\x00", revision=2).kvs] == [(b"c", b"x", 2, 2, 1, 0)]
    assert [kvt(kv) for kv in rng(abc, b"a", b"\x00", revision=5).kvs] == [
        (b"a", b"x", 3, 5, 2, 0), (b"b", b"3", 4, 4, 1, 0), (b"c", b"x", 2, 2, 1, 0)]
    assert [kvt(kv) for kv in rng(abc, b"a", b"\x00", revision=7).kvs] == [
        (b"a", b"1", 3, 6, 3, 0), (b"b", b"3", 4, 4, 1, 0), (b"c", b"2", 2, 7, 2, 0)]
    # revision <= 0 means the current revision
    assert keys(rng(abc, b"a", b"\x00", revision=-1)) == [b"a", b"b", b"c"]
    res = rng(abc, b"a", b"\x00", revision=5, sort_target=RR.MOD, sort_order=RR.DESCEND, limit=1)
    assert (keys(res), res.count, res.more) == ([b"a"], 3, True)


def test_range_header_is_the_current_revision_even_for_a_past_read(abc: mvcc.Store) -> None:
    resp = abc.read_txn(txn_req(success=[op_range(b"a", revision=3)]), abc.rev)
    sub = resp.responses[0].response_range
    assert sub.header == rpc_pb2.ResponseHeader(revision=7)
    assert [kv.value for kv in sub.kvs] == [b"x"]


def test_range_revision_errors(abc: mvcc.Store) -> None:
    with raises(errors.FUTURE_REV):
        rng(abc, b"a", revision=8)
    abc.compact(5)
    with raises(errors.COMPACTED):
        rng(abc, b"a", revision=4)
    with raises(errors.COMPACTED):
        rng(abc, b"a", b"\x00", revision=1, count_only=True)
    # the compaction revision itself is still readable
    assert [kvt(kv) for kv in rng(abc, b"a", b"\x00", revision=5).kvs] == [
        (b"a", b"x", 3, 5, 2, 0), (b"b", b"3", 4, 4, 1, 0), (b"c", b"x", 2, 2, 1, 0)]
    assert keys(rng(abc, b"a", b"\x00", revision=-3)) == [b"a", b"b", b"c"]


def test_range_at_a_durable_revision_below_the_store_revision(abc: mvcc.Store) -> None:
    # The read path reads at the newest *durable* revision, which may lag the store.
    res = rng(abc, b"a", b"\x00", current=5)
    assert [kv.value for kv in res.kvs] == [b"x", b"3", b"x"]
    with raises(errors.FUTURE_REV):
        rng(abc, b"a", current=5, revision=6)


# ---------------------------------------------------------------------------- Put


def test_put_prev_kv() -> None:
    s = mvcc.Store()
    resp = put(s, b"a", b"1", prev_kv=True)
    assert not resp.HasField("prev_kv")
    resp = put(s, b"a", b"2", prev_kv=True)
    assert kvt(resp.prev_kv) == (b"a", b"1", 2, 2, 1, 0)
    resp = put(s, b"a", b"3")
    assert not resp.HasField("prev_kv")
    assert resp.header == rpc_pb2.ResponseHeader(revision=4)


def test_put_ignore_value_keeps_the_value() -> None:
    s = leased_store()
    put(s, b"a", b"keep", lease=5)
    resp = put(s, b"a", ignore_value=True, prev_kv=True)
    assert kvt(resp.prev_kv) == (b"a", b"keep", 2, 2, 1, 5)
    # ignore_value keeps the value only: lease 0 detaches the key
    assert kvt(s.get(b"a")) == (b"a", b"keep", 2, 3, 2, 0)  # type: ignore[arg-type]


def test_put_ignore_lease_keeps_the_lease() -> None:
    s = leased_store()
    put(s, b"a", b"v1", lease=7)
    put(s, b"a", b"v2", ignore_lease=True)
    assert kvt(s.get(b"a")) == (b"a", b"v2", 2, 3, 2, 7)  # type: ignore[arg-type]
    put(s, b"a", ignore_lease=True, ignore_value=True)
    assert kvt(s.get(b"a")) == (b"a", b"v2", 2, 4, 3, 7)  # type: ignore[arg-type]


@pytest.mark.parametrize("flags", [{"ignore_value": True}, {"ignore_lease": True},
                                   {"ignore_value": True, "ignore_lease": True}])
def test_put_ignore_flags_on_a_missing_key(flags: dict[str, bool]) -> None:
    s = mvcc.Store()
    put(s, b"other")
    delete(s, b"gone")
    put(s, b"gone")
    delete(s, b"gone")
    s.take_pending()
    before = state(s)
    with raises(errors.KEY_NOT_FOUND):
        put(s, b"gone", **flags)
    assert state(s) == before


def test_put_with_an_unknown_lease() -> None:
    s = mvcc.Store()  # the default lease lookup knows no lease
    before = state(s)
    with raises(errors.LEASE_NOT_FOUND):
        put(s, b"a", b"v", lease=1)
    assert state(s) == before
    # The lease is checked before the key (apply.go Put).
    with raises(errors.LEASE_NOT_FOUND):
        put(s, b"a", lease=1, ignore_value=True)


def test_put_attaches_moves_and_detaches_leases() -> None:
    s = leased_store()
    put(s, b"a", lease=5)
    put(s, b"b", lease=5)
    put(s, b"c")
    assert sorted(s.keys_with_lease()) == [(b"a", 5), (b"b", 5)]
    put(s, b"a", lease=7)
    put(s, b"b")
    assert sorted(s.keys_with_lease()) == [(b"a", 7)]
    delete(s, b"a")
    assert sorted(s.keys_with_lease()) == []


# ---------------------------------------------------------------------------- DeleteRange


def test_delete_range_prev_kv_and_count() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")
    put(s, b"b", b"2")
    put(s, b"b", b"3")
    put(s, b"c", b"4")
    resp = delete(s, b"a", b"c", prev_kv=True)
    assert resp.deleted == 2 and resp.header.revision == 6
    assert [kvt(kv) for kv in resp.prev_kvs] == [(b"a", b"1", 2, 2, 1, 0), (b"b", b"3", 3, 4, 2, 0)]
    resp = delete(s, b"c")
    assert resp.deleted == 1 and len(resp.prev_kvs) == 0
    resp = delete(s, b"a", b"\x00", prev_kv=True)
    assert resp.deleted == 0 and len(resp.prev_kvs) == 0 and resp.header.revision == 7
    assert s.live_keys == 0


def test_delete_prefix_and_from_key() -> None:
    s = mvcc.Store()
    for k in (b"a", b"ab", b"abc", b"b", b"c"):
        put(s, k)
    assert delete(s, b"ab", mvcc.prefix_end(b"ab")).deleted == 2
    assert keys(rng(s, b"\x00", b"\x00")) == [b"a", b"b", b"c"]
    assert delete(s, b"b", b"\x00").deleted == 2
    assert keys(rng(s, b"\x00", b"\x00")) == [b"a"]
    assert s.live_keys == 1


# ---------------------------------------------------------------------------- Txn compares


@pytest.fixture
def one_key() -> mvcc.Store:
    """k: value "m", create 2, mod 3, version 2, lease 5."""
    s = leased_store()
    put(s, b"k", b"a", lease=5)
    put(s, b"k", b"m", lease=5)
    return s


_ACTUAL: dict[int, tuple[object, object, object]] = {  # (below, equal, above) the actual value of k
    CMP.VERSION: (1, 2, 3),
    CMP.CREATE: (1, 2, 3),
    CMP.MOD: (2, 3, 4),
    CMP.LEASE: (4, 5, 6),
    CMP.VALUE: (b"l", b"m", b"n"),
}
# result -> expected outcome when the stored value is (above, equal to, below) the operand
_OUTCOME = {
    CMP.EQUAL: (False, True, False),
    CMP.NOT_EQUAL: (True, False, True),
    CMP.GREATER: (True, False, False),
    CMP.LESS: (False, False, True),
}
_COMPARE_CASES = [
    (target, result, operands[i], _OUTCOME[result][i])
    for target, operands in _ACTUAL.items()
    for result in _OUTCOME
    for i in range(3)
]


def _chosen(store: mvcc.Store, compares: Sequence[rpc_pb2.Compare]) -> bool:
    resp = txn(store, compare=compares, success=[op_range(b"k")], failure=[])
    assert len(resp.responses) == (1 if resp.succeeded else 0)
    return resp.succeeded


@pytest.mark.parametrize(("target", "result", "operand", "expected"), _COMPARE_CASES)
def test_compare_every_target_and_result(one_key: mvcc.Store, target: int, result: int, operand: object,
                                         expected: bool) -> None:
    assert _chosen(one_key, [cmp(b"k", target, result, operand)]) is expected  # type: ignore[arg-type]
    # the read-only path agrees
    req = txn_req([cmp(b"k", target, result, operand)], [op_range(b"k")])  # type: ignore[arg-type]
    assert one_key.read_txn(req, one_key.rev).succeeded is expected


@pytest.mark.parametrize(("compare", "expected"), [
    (cmp(b"nope", CMP.VERSION, CMP.EQUAL, 0), True),
    (cmp(b"nope", CMP.VERSION, CMP.LESS, 1), True),
    (cmp(b"nope", CMP.VERSION, CMP.GREATER, 0), False),
    (cmp(b"nope", CMP.CREATE, CMP.EQUAL, 0), True),
    (cmp(b"nope", CMP.MOD, CMP.EQUAL, 0), True),
    (cmp(b"nope", CMP.MOD, CMP.NOT_EQUAL, 0), False),
    (cmp(b"nope", CMP.LEASE, CMP.EQUAL, 0), True),
    # VALUE on a missing key is always false, whatever the operator (apply.go applyCompare)
    (cmp(b"nope", CMP.VALUE, CMP.EQUAL, b""), False),
    (cmp(b"nope", CMP.VALUE, CMP.NOT_EQUAL, b"x"), False),
    (cmp(b"nope", CMP.VALUE, CMP.LESS, b"z"), False),
    (cmp(b"nope", CMP.VALUE, CMP.GREATER, b""), False),
    # an unset target_union compares with 0 / empty
    (cmp(b"nope", CMP.VERSION, CMP.EQUAL), True),
    (cmp(b"k", CMP.VERSION, CMP.EQUAL), False),
    (cmp(b"k", CMP.VERSION, CMP.GREATER), True),
    (cmp(b"k", CMP.VALUE, CMP.GREATER), True),
    (cmp(b"k", CMP.LEASE, CMP.NOT_EQUAL), True),
])
def test_compare_missing_key_and_unset_operand(one_key: mvcc.Store, compare: rpc_pb2.Compare,
                                               expected: bool) -> None:
    assert _chosen(one_key, [compare]) is expected


def test_compare_value_on_an_existing_empty_value() -> None:
    s = mvcc.Store()
    put(s, b"e", b"")
    assert _chosen(s, [cmp(b"e", CMP.VALUE, CMP.EQUAL, b"")])
    assert _chosen(s, [cmp(b"e", CMP.VALUE, CMP.EQUAL)])


@pytest.fixture
def two_keys() -> mvcc.Store:
    """k1: version 1, value "x"; k2: version 2, value "y"."""
    s = mvcc.Store()
    put(s, b"k1", b"x")
    put(s, b"k2", b"y")
    put(s, b"k2", b"y")
    return s


@pytest.mark.parametrize(("compare", "expected"), [
    (cmp(b"k1", CMP.VERSION, CMP.GREATER, 0, range_end=b"k3"), True),
    (cmp(b"k1", CMP.VERSION, CMP.EQUAL, 1, range_end=b"k3"), False),  # k2 fails it
    (cmp(b"k1", CMP.VERSION, CMP.LESS, 3, range_end=b"k3"), True),
    (cmp(b"k1", CMP.VERSION, CMP.EQUAL, 1, range_end=b"k2"), True),  # half-open: only k1
    (cmp(b"k2", CMP.VERSION, CMP.EQUAL, 2, range_end=b"\x00"), True),  # from key
    (cmp(b"\x00", CMP.VALUE, CMP.GREATER, b"w", range_end=b"\x00"), True),  # all keys
    (cmp(b"\x00", CMP.VALUE, CMP.EQUAL, b"x", range_end=b"\x00"), False),
    (cmp(b"k1", CMP.MOD, CMP.LESS, 5, range_end=b"k3"), True),
    (cmp(b"k1", CMP.MOD, CMP.LESS, 4, range_end=b"k3"), False),  # k2's mod is 4
    # an empty range compares against a zero KeyValue...
    (cmp(b"x", CMP.VERSION, CMP.EQUAL, 0, range_end=b"y"), True),
    (cmp(b"x", CMP.CREATE, CMP.LESS, 1, range_end=b"y"), True),
    (cmp(b"x", CMP.MOD, CMP.GREATER, 0, range_end=b"y"), False),
    (cmp(b"k3", CMP.VERSION, CMP.EQUAL, 0, range_end=b"k1"), True),  # range_end < key: empty
    # ... except VALUE, which is false
    (cmp(b"x", CMP.VALUE, CMP.EQUAL, b"", range_end=b"y"), False),
    (cmp(b"x", CMP.VALUE, CMP.NOT_EQUAL, b"", range_end=b"y"), False),
])
def test_range_compares(two_keys: mvcc.Store, compare: rpc_pb2.Compare, expected: bool) -> None:
    assert _chosen(two_keys, [compare]) is expected


def test_all_compares_must_hold(two_keys: mvcc.Store) -> None:
    t = cmp(b"k1", CMP.VALUE, CMP.EQUAL, b"x")
    f = cmp(b"k2", CMP.VALUE, CMP.EQUAL, b"x")
    assert _chosen(two_keys, [t, t])
    assert not _chosen(two_keys, [t, f])
    assert not _chosen(two_keys, [f, t])


def test_compares_see_the_pre_txn_state_and_the_failure_branch_runs() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")
    resp = txn(s, compare=[cmp(b"a", CMP.VALUE, CMP.EQUAL, b"2")],
               success=[op_put(b"ok", b"1")],
               failure=[op_put(b"a", b"2"), op_range(b"a"), op_put(b"failed", b"1")])
    assert not resp.succeeded
    assert [r.WhichOneof("response") for r in resp.responses] == [
        "response_put", "response_range", "response_put"]
    assert [kv.value for kv in resp.responses[1].response_range.kvs] == [b"2"]
    assert keys(rng(s, b"\x00", b"\x00")) == [b"a", b"failed"]


# ---------------------------------------------------------------------------- nested txns


def test_nested_compares_are_evaluated_on_the_pre_txn_state() -> None:
    s = mvcc.Store()
    resp = txn(s, success=[
        op_put(b"a", b"1"),
        op_txn(compare=[cmp(b"a", CMP.VERSION, CMP.EQUAL, 0)],
               success=[op_put(b"b", b"then")], failure=[op_put(b"b", b"else")]),
    ])
    assert resp.succeeded and resp.responses[1].response_txn.succeeded
    assert s.get(b"b").value == b"then"  # type: ignore[union-attr]
    assert s.rev == 2 and [(r.main, r.sub, r.key) for r in s.take_pending()] == [(2, 0, b"a"), (2, 1, b"b")]


def test_nested_txn_paths_line_up() -> None:
    s = mvcc.Store()
    no = cmp(b"z", CMP.VERSION, CMP.EQUAL, 1)  # false: z does not exist
    yes = cmp(b"z", CMP.VERSION, CMP.EQUAL, 0)
    inner = op_txn([no], success=[op_put(b"x", b"1a-then")], failure=[op_put(b"x", b"1a-else")])
    resp = txn(s, compare=[no], success=[op_put(b"wrong", b"1")], failure=[
        op_txn([yes], success=[inner, op_txn([yes], success=[op_put(b"v", b"1b-then")])],
               failure=[op_put(b"wrong", b"2")]),
        op_txn([no], success=[op_put(b"y", b"2-then")], failure=[op_put(b"y", b"2-else")]),
        op_txn([yes, yes], success=[op_put(b"w", b"3-then"), op_range(b"x")], failure=[op_put(b"wrong", b"3")]),
        op_txn([], success=[], failure=[]),
    ])
    assert not resp.succeeded
    vals = {kv.key: kv.value for kv in rng(s, b"\x00", b"\x00").kvs}
    assert vals == {b"x": b"1a-else", b"v": b"1b-then", b"y": b"2-else", b"w": b"3-then"}
    r0, r1, r2, r3 = (r.response_txn for r in resp.responses)
    assert (r0.succeeded, r1.succeeded, r2.succeeded, r3.succeeded) == (True, False, True, True)
    assert not r0.responses[0].response_txn.succeeded
    assert r0.responses[1].response_txn.succeeded
    assert [kv.value for kv in r2.responses[1].response_range.kvs] == [b"1a-else"]
    assert len(r3.responses) == 0
    assert [(r.sub, r.key) for r in s.take_pending()] == [(0, b"x"), (1, b"v"), (2, b"y"), (3, b"w")]


def test_nested_txn_checks_follow_the_chosen_path() -> None:
    s = leased_store()
    bad_put = op_put(b"missing", ignore_value=True)
    # on the path not taken: fine
    resp = txn(s, success=[op_txn([cmp(b"z", CMP.VERSION, CMP.EQUAL, 0)], success=[op_put(b"a")],
                                  failure=[bad_put])])
    assert resp.succeeded and s.rev == 2
    before = state(s)
    with raises(errors.KEY_NOT_FOUND):
        txn(s, success=[op_put(b"b"), op_txn([cmp(b"z", CMP.VERSION, CMP.EQUAL, 1)], failure=[bad_put])])
    assert state(s) == before
    with raises(errors.FUTURE_REV):
        txn(s, success=[op_put(b"b"), op_txn(success=[op_range(b"a", revision=3)])])
    assert state(s) == before


def test_sub_response_headers_carry_only_the_revision() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")
    put(s, b"b", b"1")  # rev 3
    resp = txn(s, success=[
        op_range(b"a"), op_del(b"missing"), op_put(b"a", b"2"), op_range(b"a"), op_del(b"missing2"),
        op_del(b"b"),
    ])
    assert resp.header == rpc_pb2.ResponseHeader(revision=4)
    heads = [getattr(r, r.WhichOneof("response")).header for r in resp.responses]
    assert heads == [rpc_pb2.ResponseHeader(revision=r) for r in (3, 3, 4, 4, 4, 4)]
    assert [kv.value for kv in resp.responses[0].response_range.kvs] == [b"1"]
    assert [kv.value for kv in resp.responses[3].response_range.kvs] == [b"2"]
    # read-only and no-write txns: the current revision
    resp = txn(s, success=[op_range(b"a"), op_del(b"missing")])
    assert resp.header.revision == 4
    assert [getattr(r, r.WhichOneof("response")).header.revision for r in resp.responses] == [4, 4]


def test_nested_txn_response_header_is_present_but_empty() -> None:
    """etcd's newTxnResp (etcdserver/apply.go) gives every nested TxnResponse ``Header: &pb.ResponseHeader{}``
    and neither applyTxn nor v3rpc's header.fill touches it (only the top-level header gets the revision
    and cluster fields). So a nested txn's header is sent present but empty, revision 0."""
    s = mvcc.Store()
    put(s, b"a", b"1")
    for req in (txn_req(success=[op_put(b"b"), op_txn(success=[op_put(b"c")])]),
                txn_req(success=[op_txn(success=[op_range(b"a")])])):
        resp = s.txn(req)
        nested = resp.responses[-1].response_txn
        assert nested.HasField("header")
        assert nested.header == rpc_pb2.ResponseHeader()
        # ...while its own sub-responses carry revisions as usual
        inner = nested.responses[0]
        assert getattr(inner, inner.WhichOneof("response")).header.revision == s.rev


def test_txn_range_revision_checks() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")
    put(s, b"a", b"2")  # rev 3
    before = state(s)
    # the revision the txn is about to write is still a future revision (checked on the pre-txn view)
    with raises(errors.FUTURE_REV):
        txn(s, success=[op_put(b"b"), op_range(b"a", revision=4)])
    assert state(s) == before
    resp = txn(s, success=[op_put(b"b"), op_range(b"a", revision=2), op_range(b"a", revision=-1)])
    assert [kv.value for kv in resp.responses[1].response_range.kvs] == [b"1"]
    assert [kv.value for kv in resp.responses[2].response_range.kvs] == [b"2"]
    assert resp.responses[1].response_range.header.revision == 4
    s.compact(3)
    with raises(errors.COMPACTED):
        txn(s, success=[op_range(b"a", revision=2)])
    with raises(errors.COMPACTED):
        s.read_txn(txn_req(success=[op_range(b"a", revision=2)]), s.rev)
    # checkRange: a negative revision below the compaction revision is "compacted", unlike a plain Range
    with raises(errors.COMPACTED):
        txn(s, success=[op_range(b"a", revision=-1)])
    assert keys(rng(s, b"a", revision=-1)) == [b"a"]
    resp = txn(s, success=[op_range(b"a", revision=3)])
    assert [kv.value for kv in resp.responses[0].response_range.kvs] == [b"2"]


def test_txn_negative_range_revision_before_any_compaction() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")
    resp = txn(s, success=[op_range(b"a", revision=-1)])  # -1 is not below compact_rev -1
    assert [kv.value for kv in resp.responses[0].response_range.kvs] == [b"1"]
    with raises(errors.COMPACTED):
        txn(s, success=[op_range(b"a", revision=-2)])


def test_txn_put_checks_come_before_range_checks_and_fail_the_whole_txn() -> None:
    s = leased_store()
    put(s, b"a", b"1")
    before = state(s)
    with raises(errors.LEASE_NOT_FOUND):
        txn(s, success=[op_range(b"a", revision=99), op_put(b"b", lease=9)])
    with raises(errors.KEY_NOT_FOUND):
        txn(s, success=[op_put(b"c"), op_put(b"missing", ignore_lease=True)])
    with raises(errors.FUTURE_REV):
        txn(s, success=[op_put(b"c"), op_range(b"a", revision=99)])
    assert state(s) == before
    # the same ops on the branch not taken do not matter
    resp = txn(s, compare=[cmp(b"a", CMP.VALUE, CMP.EQUAL, b"1")], success=[op_put(b"c", lease=5)],
               failure=[op_put(b"b", lease=9), op_range(b"a", revision=99)])
    assert resp.succeeded and s.get(b"c").lease == 5  # type: ignore[union-attr]


def test_txn_put_sees_earlier_ops_of_the_same_txn() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")
    resp = txn(s, success=[op_del(b"a", prev_kv=True), op_put(b"b", b"x", prev_kv=True),
                           op_range(b"\x00", b"\x00")])
    assert [kvt(kv) for kv in resp.responses[0].response_delete_range.prev_kvs] == [(b"a", b"1", 2, 2, 1, 0)]
    assert not resp.responses[1].response_put.HasField("prev_kv")
    assert [kvt(kv) for kv in resp.responses[2].response_range.kvs] == [(b"b", b"x", 3, 3, 1, 0)]
    assert s.live_keys == 1


def test_from_key_delete_then_ignore_put_of_a_deleted_key() -> None:
    """checkIntervals sees a from-key delete (range_end "\\x00") as an empty interval, so
    [delete a.., put b ignore_value] passes validation, and checkPut finds b on the pre-txn view; the put then
    finds b already deleted by the txn. etcd 3.4 panics there (apply.go applyTxn "unexpected error during txn",
    so the member crash-loops on that WAL entry); coord refuses the whole txn with KEY_NOT_FOUND instead and
    changes nothing."""
    s = mvcc.Store()
    put(s, b"a", b"1")
    put(s, b"b", b"1")
    s.take_pending()
    req = txn_req(success=[op_del(b"a", b"\x00"), op_put(b"b", ignore_value=True)])
    validation.check_txn(req, 128)
    before = state(s)
    with raises(errors.KEY_NOT_FOUND):
        s.txn(req)
    assert state(s) == before


def test_delete_and_put_of_one_key_at_one_revision() -> None:
    # The same from-key blind spot lets one txn delete and put a key at the same revision.
    s = mvcc.Store()
    put(s, b"a", b"1")
    put(s, b"b", b"1")  # rev 3
    s.take_pending()
    req = txn_req(success=[op_del(b"a", b"\x00"), op_put(b"b", b"2")])
    validation.check_txn(req, 128)
    s.txn(req)  # rev 4: a and b deleted, then b put again
    assert [kvt(kv) for kv in rng(s, b"\x00", b"\x00").kvs] == [(b"b", b"2", 4, 4, 1, 0)]
    req = txn_req(success=[op_put(b"c", b"3"), op_del(b"b", b"\x00")])
    validation.check_txn(req, 128)
    s.txn(req)  # rev 5: c put, then b and c deleted
    assert rng(s, b"\x00", b"\x00").kvs == [] and s.live_keys == 0
    assert [(r.main, r.sub, r.tombstone, r.key) for r in s.take_pending()] == [
        (4, 0, True, b"a"), (4, 1, True, b"b"), (4, 2, False, b"b"),
        (5, 0, False, b"c"), (5, 1, True, b"b"), (5, 2, True, b"c")]
    assert [kvt(kv) for kv in rng(s, b"\x00", b"\x00", revision=4).kvs] == [(b"b", b"2", 4, 4, 1, 0)]
    s.compact(4)
    assert [(r.main, r.sub, r.key) for r in s.all_records()] == [(4, 2, b"b"), (5, 0, b"c"), (5, 1, b"b"),
                                                                   (5, 2, b"c")]
    s.compact(5)
    assert list(s.all_records()) == []
    assert s.hash_kv(0, s.rev) == (FRESH_HASH, 5)


def test_two_deletes_of_the_same_key_in_one_txn() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")
    resp = txn(s, success=[op_del(b"a"), op_del(b"a")])
    assert [r.response_delete_range.deleted for r in resp.responses] == [1, 0]
    assert [r.response_delete_range.header.revision for r in resp.responses] == [3, 3]
    assert s.rev == 3 and s.live_keys == 0
    assert [(r.main, r.sub, r.tombstone) for r in s.take_pending()] == [(2, 0, False), (3, 0, True)]


# ---------------------------------------------------------------------------- compaction


@pytest.fixture
def history() -> mvcc.Store:
    """a@2, a@3, b@4, b deleted @5, c@6, a deleted @7, a@8 (rev 8)."""
    s = mvcc.Store()
    put(s, b"a", b"a2")
    put(s, b"a", b"a3")
    put(s, b"b", b"b4")
    delete(s, b"b")
    put(s, b"c", b"c6")
    delete(s, b"a")
    put(s, b"a", b"a8")
    s.take_pending()
    return s


def test_compaction_keeps_the_newest_version_of_live_keys(history: mvcc.Store) -> None:
    history.compact(6)
    assert (history.rev, history.compact_rev) == (8, 6)
    assert [(r.main, r.sub, r.tombstone, r.key) for r in history.all_records()] == [
        (3, 0, False, b"a"),  # a as of 6 (deleted later, so kept along with its tombstone)
        (6, 0, False, b"c"),
        (7, 0, True, b"a"),
        (8, 0, False, b"a"),
    ]
    # b was deleted at 5 <= 6: its puts and its tombstone are gone
    assert history.get(b"b") is None
    assert [kvt(kv) for kv in rng(history, b"\x00", b"\x00", revision=6).kvs] == [
        (b"a", b"a3", 2, 3, 2, 0), (b"c", b"c6", 6, 6, 1, 0)]
    assert [kvt(kv) for kv in rng(history, b"\x00", b"\x00", revision=7).kvs] == [(b"c", b"c6", 6, 6, 1, 0)]
    assert keys(rng(history, b"\x00", b"\x00")) == [b"a", b"c"]
    assert history.live_keys == 2
    # compaction writes nothing and bumps nothing
    assert history.take_pending() == []


def test_compaction_at_a_tombstone_drops_the_key(history: mvcc.Store) -> None:
    history.compact(7)
    assert [(r.main, r.key) for r in history.all_records()] == [(6, b"c"), (8, b"a")]
    assert [kvt(kv) for kv in rng(history, b"\x00", b"\x00", revision=7).kvs] == [(b"c", b"c6", 6, 6, 1, 0)]
    history.compact(8)
    assert [(r.main, r.key) for r in history.all_records()] == [(6, b"c"), (8, b"a")]


def test_history_reads_below_compaction_fail(history: mvcc.Store) -> None:
    history.compact(5)
    for r in (1, 2, 4):
        with raises(errors.COMPACTED):
            rng(history, b"a", revision=r)
    assert [kvt(kv) for kv in rng(history, b"a", revision=5).kvs] == [(b"a", b"a3", 2, 3, 2, 0)]


def test_compaction_revision_errors(history: mvcc.Store) -> None:
    with raises(errors.FUTURE_REV):
        history.compact(9)
    history.compact(4)
    for bad in (4, 3, -1):
        with raises(errors.COMPACTED):
            history.compact(bad)
    assert history.compact_rev == 4
    history.compact(8)  # the current revision is allowed
    assert (history.compact_rev, history.rev) == (8, 8)
    with raises(errors.COMPACTED):
        history.compact(8)


def test_compaction_of_a_fresh_store() -> None:
    s = mvcc.Store()
    s.compact(0)  # etcd accepts 0 > compactMainRev (-1)
    assert s.compact_rev == 0
    s.compact(1)
    assert (s.rev, s.compact_rev) == (1, 1)
    put(s, b"a")
    assert keys(rng(s, b"a")) == [b"a"]


def test_events_between_after_compaction(history: mvcc.Store) -> None:
    every = [(r.main, r.sub, r.tombstone, r.key) for r in history.events_between(1, 8)]
    assert every == [(2, 0, False, b"a"), (3, 0, False, b"a"), (4, 0, False, b"b"), (5, 0, True, b"b"),
                     (6, 0, False, b"c"), (7, 0, True, b"a"), (8, 0, False, b"a")]
    assert [r.main for r in history.events_between(4, 6)] == [4, 5, 6]
    history.compact(5)
    assert [r.main for r in history.events_between(6, 8)] == [6, 7, 8]
    # a start below the compaction revision is clamped to it
    assert [r.main for r in history.events_between(1, 8)] == [5, 6, 7, 8]
    assert [r.main for r in history.events_between(1, 4)] == []
    # the compaction revision itself stays whole, its tombstones included (etcd drops those, and a
    # watch resuming there would miss the deletion); the backend keeps them too, for a restart
    history.compact(7)
    assert [(r.main, r.tombstone) for r in history.events_between(1, 8)] == [(7, True), (8, False)]
    assert (7, 0) in history.physical_keep(7) and (7, 0) not in history.keep(7)


def test_events_between_keeps_sub_revision_order() -> None:
    s = mvcc.Store()
    txn(s, success=[op_put(b"b"), op_put(b"a"), op_del(b"zz")])
    delete(s, b"\x00", b"\x00")
    assert [(r.main, r.sub, r.key, r.tombstone) for r in s.events_between(2, 3)] == [
        (2, 0, b"b", False), (2, 1, b"a", False), (3, 0, b"a", True), (3, 1, b"b", True)]


# ---------------------------------------------------------------------------- HashKV


def test_hash_kv_of_a_fresh_store() -> None:
    assert mvcc.Store().hash_kv(0, 1) == (FRESH_HASH, 1)


def _build(ops: Sequence[tuple[str, bytes, bytes]]) -> mvcc.Store:
    s = mvcc.Store()
    for kind, key, value in ops:
        if kind == "put":
            put(s, key, value)
        else:
            delete(s, key)
    return s


_OPS = [("put", b"a", b"1"), ("put", b"b", b"2"), ("del", b"a", b""), ("put", b"a", b"3"), ("put", b"c", b"")]


def test_hash_kv_equal_histories_hash_equal() -> None:
    s1, s2 = _build(_OPS), _build(_OPS)
    assert s1.hash_kv(0, s1.rev) == s2.hash_kv(0, s2.rev)
    assert s1.hash_kv(0, s1.rev)[0] != FRESH_HASH
    other = _build([*_OPS[:-1], ("put", b"c", b"x")])
    assert other.hash_kv(0, other.rev)[0] != s1.hash_kv(0, s1.rev)[0]
    # a past revision hashes what a store that stopped there holds
    for r in range(1, s1.rev + 1):
        prefix = _build(_OPS[: r - 1])
        assert s1.hash_kv(r, s1.rev) == (prefix.hash_kv(0, prefix.rev)[0], r)


def test_hash_kv_is_crc32c_over_backend_records() -> None:
    s = _build(_OPS)
    expected = manual_hash((r.main, r.sub, r.tombstone, r.backend_value()) for r in s.all_records())
    assert s.hash_kv(0, s.rev) == (expected, 6)
    two = [(2, 0, False, KV(key=b"a", value=b"1", create_revision=2, mod_revision=2, version=1).SerializeToString()),
           (3, 0, False, KV(key=b"b", value=b"2", create_revision=3, mod_revision=3, version=1).SerializeToString())]
    assert s.hash_kv(3, s.rev) == (manual_hash(two), 3)
    tomb = (4, 0, True, KV(key=b"a").SerializeToString())
    assert s.hash_kv(4, s.rev) == (manual_hash([*two, tomb]), 4)


def test_hash_kv_revision_errors() -> None:
    s = _build(_OPS)  # rev 6
    with raises(errors.FUTURE_REV):
        s.hash_kv(7, s.rev)
    with raises(errors.FUTURE_REV):
        s.hash_kv(6, 5)  # beyond the caller's current revision
    s.compact(4)
    for bad in (1, 3, 4):  # HashKV, unlike Range, refuses the compaction revision itself
        with raises(errors.COMPACTED):
            s.hash_kv(bad, s.rev)
    assert s.hash_kv(5, s.rev)[1] == 5
    assert s.hash_kv(0, s.rev)[1] == 6


def test_hash_kv_negative_revision_hashes_nothing() -> None:
    """mvcc/kvstore.go HashByRev only maps rev == 0 to the current revision; a negative revision passes both
    error checks (they are guarded by ``rev > 0``) and hashes no record, since upper = rev+1 <= 0.
    So etcd answers crc32c("key") for HashKV{revision: -1}."""
    s = _build(_OPS)
    assert s.hash_kv(-1, s.rev)[0] == FRESH_HASH


def test_hash_kv_after_compaction_skips_records_not_kept() -> None:
    s = mvcc.Store()
    put(s, b"a", b"1")  # 2
    put(s, b"b", b"1")  # 3
    s.compact(2)
    put(s, b"a", b"2")  # 4
    a2 = (2, 0, False, KV(key=b"a", value=b"1", create_revision=2, mod_revision=2, version=1).SerializeToString())
    b3 = (3, 0, False, KV(key=b"b", value=b"1", create_revision=3, mod_revision=3, version=1).SerializeToString())
    a4 = (4, 0, False, KV(key=b"a", value=b"2", create_revision=2, mod_revision=4, version=2).SerializeToString())
    # a@2 is still stored (it was a's newest version at the compaction) but keep(4) no longer holds it
    assert s.hash_kv(0, s.rev) == (manual_hash([b3, a4]), 4)
    assert s.hash_kv(3, s.rev) == (manual_hash([a2, b3]), 3)


def test_hash_kv_after_compaction_with_nothing_kept_hashes_everything() -> None:
    # HashByRev: "don't skip if there isn't one" (len(keep) == 0)
    s = mvcc.Store()
    put(s, b"a", b"1")  # 2
    s.compact(2)
    delete(s, b"a")  # 3
    a2 = (2, 0, False, KV(key=b"a", value=b"1", create_revision=2, mod_revision=2, version=1).SerializeToString())
    t3 = (3, 0, True, KV(key=b"a").SerializeToString())
    assert s.hash_kv(0, s.rev) == (manual_hash([a2, t3]), 3)


# ---------------------------------------------------------------------------- failure atomicity


def _busy_store() -> mvcc.Store:
    s = leased_store()
    put(s, b"a", b"1", lease=5)
    put(s, b"b", b"1")
    put(s, b"gone", b"1")
    delete(s, b"gone")
    put(s, b"c", b"1")
    s.compact(3)
    s.take_pending()
    put(s, b"d", b"pending")  # leave something pending
    return s


def test_write_txn_that_raises_part_way_changes_nothing() -> None:
    s = _busy_store()
    before = state(s)
    with pytest.raises(RuntimeError, match="boom"), s.write() as w:
        w.put(rpc_pb2.PutRequest(key=b"new", value=b"x"))  # a new key
        w.put(rpc_pb2.PutRequest(key=b"a", value=b"x"))  # an existing key
        w.put(rpc_pb2.PutRequest(key=b"gone", value=b"x"))  # a deleted key
        w.delete_range(rpc_pb2.DeleteRangeRequest(key=b"b", range_end=b"d"))  # b, c
        w.put(rpc_pb2.PutRequest(key=b"b", value=b"again"))  # a key deleted in this txn
        assert w.view_rev() == s.rev + 1
        raise RuntimeError("boom")
    assert state(s) == before
    # the next write gets the next revision and sub-revision 0
    put(s, b"z")
    assert [(r.main, r.sub) for r in s.take_pending()] == [(7, 0), (8, 0)]
    assert [r.key for r in s.events_between(8, 8)] == [b"z"]


def test_txn_that_fails_while_applying_changes_nothing() -> None:
    # Validation would refuse this txn (DUPLICATE_KEY), so the store sees it only if a caller skips
    # validation; the put then fails on the second op and the whole txn must be undone.
    s = _busy_store()
    before = state(s)
    with raises(errors.KEY_NOT_FOUND):
        txn(s, success=[op_put(b"x"), op_del(b"b"), op_put(b"b", ignore_value=True)])
    assert state(s) == before


def test_put_that_fails_changes_nothing() -> None:
    s = _busy_store()
    before = state(s)
    with raises(errors.KEY_NOT_FOUND):
        put(s, b"nope", ignore_lease=True)
    with raises(errors.LEASE_NOT_FOUND):
        put(s, b"a", lease=9)
    assert state(s) == before


# ---------------------------------------------------------------------------- restore / records


def _ranges(s: mvcc.Store) -> list[object]:
    out: list[object] = []
    for r in range(max(s.compact_rev, 1), s.rev + 1):
        out.append([kvt(kv) for kv in rng(s, b"\x00", b"\x00", revision=r).kvs])
    return out


def _restored(s: mvcc.Store, records: Iterable[mvcc.Record]) -> mvcc.Store:
    return mvcc.Store.restore(records, rev=s.rev, compact_rev=s.compact_rev, lease_exists=s.lease_exists)


@pytest.mark.parametrize("via_backend", [False, True])
def test_restore_reproduces_the_store(via_backend: bool) -> None:
    s = _busy_store()
    txn(s, success=[op_put(b"e", b"1", lease=7), op_del(b"a"), op_put(b"f")])
    s.take_pending()
    records = list(s.all_records())
    if via_backend:
        records = [mvcc.Record.from_backend(r.backend_key(), r.backend_value()) for r in records]
    r = _restored(s, records)
    assert (r.rev, r.compact_rev, r.live_keys) == (s.rev, s.compact_rev, s.live_keys)
    assert _ranges(r) == _ranges(s)
    assert r.hash_kv(0, r.rev) == s.hash_kv(0, s.rev)
    assert [rec_t(x) for x in r.all_records()] == [rec_t(x) for x in s.all_records()]
    assert [rec_t(x) for x in r.events_between(1, r.rev)] == [rec_t(x) for x in s.events_between(1, s.rev)]
    assert sorted(r.keys_with_lease()) == sorted(s.keys_with_lease()) == [(b"e", 7)]
    assert r.take_pending() == []
    with raises(errors.COMPACTED):
        rng(r, b"a", revision=2)
    # and it carries on like the original
    for store in (r, s):
        put(store, b"g", b"1", prev_kv=True)
        txn(store, success=[op_put(b"c", b"2")])
    assert state(r) == state(s)


def test_restore_of_a_fresh_store() -> None:
    r = mvcc.Store.restore([], rev=1, compact_rev=-1)
    assert state(r) == state(mvcc.Store())


def test_restore_finishes_an_interrupted_compaction() -> None:
    s = _busy_store()
    s.take_pending()
    put(s, b"a", b"2")
    delete(s, b"b")
    before_compaction = list(s.all_records())
    s.compact(s.rev - 1)
    r = mvcc.Store.restore(before_compaction, rev=s.rev, compact_rev=s.compact_rev, lease_exists=s.lease_exists)
    assert [rec_t(x) for x in r.all_records()] == [rec_t(x) for x in s.all_records()]
    assert r.hash_kv(0, r.rev) == s.hash_kv(0, s.rev)
    assert _ranges(r) == _ranges(s)
    assert r.live_keys == s.live_keys


def test_restore_refuses_records_above_the_revision() -> None:
    s = _busy_store()
    with pytest.raises(ValueError, match="above the committed revision"):
        mvcc.Store.restore(s.all_records(), rev=s.rev - 1, compact_rev=s.compact_rev)


def test_rev_key_format() -> None:
    assert mvcc.rev_key(2, 1) == b"\x00" * 7 + b"\x02_" + b"\x00" * 7 + b"\x01"
    assert mvcc.rev_key(2, 1, True) == mvcc.rev_key(2, 1) + b"t"
    assert mvcc.parse_rev_key(mvcc.rev_key(2**40, 3, True)) == (2**40, 3, True)
    assert mvcc.parse_rev_key(mvcc.rev_key(7, 0)) == (7, 0, False)
    for bad in (b"", mvcc.rev_key(1, 1)[:-1], mvcc.rev_key(1, 1) + b"x", mvcc.rev_key(1, 1).replace(b"_", b"-")):
        with pytest.raises(ValueError, match="malformed"):
            mvcc.parse_rev_key(bad)


def test_record_backend_round_trip() -> None:
    kv = KV(key=b"k", value=b"v", create_revision=2, mod_revision=3, version=2, lease=5)
    rec = mvcc.Record(3, 1, kv)
    back = mvcc.Record.from_backend(rec.backend_key(), rec.backend_value())
    assert (back.main, back.sub, back.tombstone, back.kv) == (3, 1, False, kv)
    tomb = mvcc.Record(4, 0, KV(key=b"k", mod_revision=4), True)
    assert tomb.backend_value() == KV(key=b"k").SerializeToString()  # etcd stores only the key
    back = mvcc.Record.from_backend(tomb.backend_key(), tomb.backend_value())
    assert (back.main, back.sub, back.tombstone, back.kv) == (4, 0, True, KV(key=b"k", mod_revision=4))
