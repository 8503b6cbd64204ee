"""Request-shape checks (coord_server.validation) against etcd 3.4.23's etcdserver/api/v3rpc/key.go:
checkRangeRequest, checkPutRequest, checkDeleteRequest, checkTxnRequest/checkRequestOp, checkIntervals."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from coord._pb import rpc_pb2
from coord_server import errors, validation

RR = rpc_pb2.RangeRequest
CMP = rpc_pb2.Compare
MAX_OPS = 128


@contextmanager
def raises(expected: errors.EtcdError) -> Iterator[None]:
    with pytest.raises(errors.EtcdError) as info:
        yield
    assert info.value == expected, (info.value, expected)


def put(key: bytes = b"k", **kw: object) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, **kw))


def dele(key: bytes = b"k", range_end: bytes = b"") -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key, range_end=range_end))


def rng(key: bytes = b"k", **kw: object) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_range=RR(key=key, **kw))


def cmp(key: bytes = b"k") -> rpc_pb2.Compare:
    return CMP(key=key, target=CMP.VERSION, result=CMP.EQUAL, version=0)


def txn(compare: Sequence[rpc_pb2.Compare] = (), success: Sequence[rpc_pb2.RequestOp] = (),
        failure: Sequence[rpc_pb2.RequestOp] = ()) -> rpc_pb2.TxnRequest:
    return rpc_pb2.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))


def nested(compare: Sequence[rpc_pb2.Compare] = (), success: Sequence[rpc_pb2.RequestOp] = (),
           failure: Sequence[rpc_pb2.RequestOp] = ()) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_txn=txn(compare, success, failure))


def puts(n: int, prefix: bytes = b"k") -> list[rpc_pb2.RequestOp]:
    return [put(prefix + b"%d" % i) for i in range(n)]


def check(req: rpc_pb2.TxnRequest) -> None:
    validation.check_txn(req, MAX_OPS)


# ---------------------------------------------------------------------------- op counts


@pytest.mark.parametrize("where", ["compare", "success", "failure"])
def test_too_many_ops(where: str) -> None:
    def build(n: int) -> rpc_pb2.TxnRequest:
        if where == "compare":
            return txn(compare=[cmp(b"c%d" % i) for i in range(n)])
        if where == "success":
            return txn(success=puts(n))
        return txn(failure=puts(n))

    check(build(MAX_OPS))  # exactly 128 is fine
    with raises(errors.TOO_MANY_OPS):
        check(build(MAX_OPS + 1))


def test_max_ops_is_a_parameter() -> None:
    validation.check_txn(txn(success=puts(3)), 3)
    with raises(errors.TOO_MANY_OPS):
        validation.check_txn(txn(success=puts(4)), 3)


def test_too_many_ops_comes_before_the_other_checks() -> None:
    with raises(errors.TOO_MANY_OPS):
        check(txn(compare=[cmp(b"")], success=[rpc_pb2.RequestOp()] * (MAX_OPS + 1)))


def test_nested_txn_gets_the_budget_that_remains() -> None:
    # One op at the outer level leaves 127 for the nested txn.
    check(txn(success=[nested(success=puts(127))]))
    with raises(errors.TOO_MANY_OPS):
        check(txn(success=[nested(success=puts(128))]))
    with raises(errors.TOO_MANY_OPS):
        check(txn(failure=[nested(compare=[cmp(b"c%d" % i) for i in range(128)])]))
    # Two levels: 128 - 2 = 126 for the middle txn, 126 - 2 = 124 for the inner one.
    check(txn(success=[put(b"x"), nested(success=[put(b"y"), nested(failure=puts(124))])]))
    with raises(errors.TOO_MANY_OPS):
        check(txn(success=[put(b"x"), nested(success=[put(b"y"), nested(failure=puts(125))])]))


@pytest.mark.parametrize("other", ["compare", "failure"])
def test_nested_budget_is_128_minus_the_largest_of_the_three_lists(other: str) -> None:
    """checkTxnRequest (v3rpc/key.go) computes opc = max(len(compare), len(success), len(failure)) and
    passes maxTxnOps-opc to every nested txn of *either* branch, not 128 - len(its own branch)."""
    filler: dict[str, list[rpc_pb2.Compare] | list[rpc_pb2.RequestOp]] = {
        "compare": [cmp(b"c%d" % i) for i in range(100)],
        "failure": [rng(b"r%d" % i) for i in range(100)],
    }

    def build(n: int) -> rpc_pb2.TxnRequest:
        req = txn(success=[nested(success=puts(n))])
        getattr(req, other).extend(filler[other])
        return req

    check(build(28))  # 128 - 100
    with raises(errors.TOO_MANY_OPS):
        check(build(29))


# ---------------------------------------------------------------------------- empty keys and ops


def test_empty_compare_key() -> None:
    with raises(errors.EMPTY_KEY):
        check(txn(compare=[cmp(b"k"), cmp(b"")]))
    with raises(errors.EMPTY_KEY):
        check(txn(success=[nested(compare=[cmp(b"")])]))
    with raises(errors.EMPTY_KEY):
        check(txn(failure=[nested(compare=[cmp(b"")])]))


@pytest.mark.parametrize("op", [put(b""), dele(b""), rng(b"")])
def test_empty_key_in_an_op(op: rpc_pb2.RequestOp) -> None:
    with raises(errors.EMPTY_KEY):
        check(txn(success=[op]))
    with raises(errors.EMPTY_KEY):
        check(txn(failure=[put(b"a"), op]))
    with raises(errors.EMPTY_KEY):
        check(txn(success=[nested(failure=[op])]))


def test_empty_request_op() -> None:
    with raises(errors.KEY_NOT_FOUND):
        check(txn(success=[rpc_pb2.RequestOp()]))
    with raises(errors.KEY_NOT_FOUND):
        check(txn(failure=[put(b"a"), rpc_pb2.RequestOp()]))
    with raises(errors.KEY_NOT_FOUND):
        check(txn(success=[nested(success=[rpc_pb2.RequestOp()])]))


def test_shape_checks_come_before_duplicate_checks() -> None:
    with raises(errors.KEY_NOT_FOUND):
        check(txn(success=[put(b"a"), put(b"a")], failure=[rpc_pb2.RequestOp()]))
    with raises(errors.EMPTY_KEY):
        check(txn(compare=[cmp(b"")], success=[put(b"a"), put(b"a")]))


def test_empty_and_small_txns_are_fine() -> None:
    check(rpc_pb2.TxnRequest())
    check(txn([cmp()], [put(b"a"), dele(b"b"), rng(b"a")], [rng(b"z"), nested()]))


# ---------------------------------------------------------------------------- duplicates


@pytest.mark.parametrize("branch", ["success", "failure"])
@pytest.mark.parametrize(("ops", "dup"), [
    ([put(b"a"), put(b"a")], True),
    ([put(b"a"), put(b"b")], False),
    ([dele(b"a"), put(b"a")], True),
    ([put(b"a"), dele(b"a")], True),  # order does not matter
    ([dele(b"a", b"c"), put(b"b")], True),  # put inside a delete range
    ([dele(b"a", b"c"), put(b"a")], True),
    ([dele(b"a", b"c"), put(b"c")], False),  # range_end is exclusive
    ([dele(b"b", b"c"), put(b"a")], False),
    ([dele(b"a"), dele(b"a")], False),  # two deletes of the same key are allowed
    ([dele(b"a", b"c"), dele(b"b")], False),
    ([rng(b"a"), put(b"a"), rng(b"a")], False),  # ranges never conflict
    # a from-key delete (range_end "\x00") is an inverted interval for etcd's adt.IntervalTree and overlaps
    # nothing; the same holds for any range_end <= key
    ([dele(b"a", b"\x00"), put(b"b")], False),
    ([dele(b"c", b"a"), put(b"b")], False),
    ([dele(b"a", b"a"), put(b"a")], False),
])
def test_duplicates_in_one_branch(branch: str, ops: list[rpc_pb2.RequestOp], dup: bool) -> None:
    req = rpc_pb2.TxnRequest(**{branch: ops})  # type: ignore[arg-type]
    if dup:
        with raises(errors.DUPLICATE_KEY):
            check(req)
    else:
        check(req)


def test_same_key_in_then_and_else_is_fine() -> None:
    check(txn(success=[put(b"a")], failure=[put(b"a")]))
    check(txn(success=[dele(b"a", b"z")], failure=[put(b"b")]))


@pytest.mark.parametrize(("ops", "dup"), [
    # a nested put against an outer put or delete
    ([put(b"a"), nested(success=[put(b"a")])], True),
    ([put(b"a"), nested(failure=[put(b"a")])], True),
    ([nested(success=[put(b"a")]), put(b"a")], True),
    ([dele(b"a", b"c"), nested(success=[put(b"b")])], True),
    ([nested(failure=[put(b"b")]), dele(b"a", b"c")], True),
    # a nested delete against an outer put
    ([put(b"b"), nested(success=[dele(b"a", b"c")])], True),
    ([put(b"b"), nested(failure=[dele(b"b")])], True),
    # a nested txn may put the same key in its own Then and Else
    ([nested(success=[put(b"a")], failure=[put(b"a")])], False),
    ([nested(success=[put(b"a"), put(b"b")], failure=[put(b"b"), put(b"a")])], False),
    # ... but not twice in one of them
    ([nested(success=[put(b"a"), put(b"a")])], True),
    ([nested(failure=[dele(b"a"), put(b"a")])], True),
    ([nested(success=[nested(failure=[put(b"a")]), put(b"a")])], True),
    # two nested txns
    ([nested(success=[put(b"a")]), nested(success=[put(b"a")])], True),
    ([nested(success=[put(b"a")]), nested(failure=[put(b"a")])], True),
    ([nested(success=[put(b"a")]), nested(success=[put(b"b")])], False),
    ([nested(success=[dele(b"a")]), nested(success=[dele(b"a")])], False),
    # checkIntervals adds a nested txn's deletes only after checking its puts, in op order, so a delete in a
    # *later* sibling txn does not catch an earlier sibling's put, while the other order does.
    ([nested(success=[put(b"a")]), nested(success=[dele(b"a")])], False),
    ([nested(success=[dele(b"a")]), nested(success=[put(b"a")])], True),
    # the unchosen/chosen distinction does not exist at check time: Then and Else both count
    ([nested(success=[dele(b"a", b"c")]), nested(failure=[put(b"b")])], True),
    # the nested Then/Else exemption applies to that txn's own pair only
    ([nested(success=[put(b"a")], failure=[put(b"b")]), nested(success=[put(b"b")])], True),
])
def test_duplicates_with_nested_txns(ops: list[rpc_pb2.RequestOp], dup: bool) -> None:
    for req in (txn(success=ops), txn(failure=ops), txn(success=[nested(success=ops)])):
        if dup:
            with raises(errors.DUPLICATE_KEY):
                check(req)
        else:
            check(req)


# ---------------------------------------------------------------------------- Range / Put / Delete


def test_check_range() -> None:
    validation.check_range(RR(key=b"k"))
    with raises(errors.EMPTY_KEY):
        validation.check_range(RR(key=b""))
    for order in RR.SortOrder.values():
        for target in RR.SortTarget.values():
            validation.check_range(RR(key=b"k", sort_order=order, sort_target=target))


@pytest.mark.parametrize("fields", [
    {"sort_target": 5}, {"sort_target": -1}, {"sort_order": 1, "sort_target": 99},
    {"sort_order": 2, "sort_target": 5}, {"sort_order": 7, "sort_target": 5},
])
def test_check_range_unknown_sort_target(fields: dict[str, int]) -> None:
    """protobuf lets an open enum carry an unknown number. etcd 3.4.23's checkRangeRequest checks only the key,
    and apply.go Range then sorts with a nil sorter and panics (unless the order is unknown too, which skips the
    sort); coord answers what etcd 3.6's checkRangeRequest answers, "etcdserver: invalid sort option"."""
    req = RR(key=b"k", **fields)  # type: ignore[arg-type]
    with raises(errors.INVALID_SORT_OPTION):
        validation.check_range(req)
    with raises(errors.INVALID_SORT_OPTION):
        check(txn(success=[rpc_pb2.RequestOp(request_range=req)]))
    with raises(errors.EMPTY_KEY):  # the key is checked first
        validation.check_range(RR(key=b"", **fields))  # type: ignore[arg-type]


@pytest.mark.parametrize("order", [3, -1, 1000])
def test_check_range_unknown_sort_order_is_accepted(order: int) -> None:
    # etcd 3.4 does not check it, and Range then sorts nothing (see test_mvcc.py::test_unknown_sort_order)
    for target in RR.SortTarget.values():
        req = RR(key=b"k", sort_order=order, sort_target=target)
        validation.check_range(req)
        check(txn(success=[rpc_pb2.RequestOp(request_range=req)]))


@pytest.mark.parametrize(("req", "expected"), [
    (rpc_pb2.PutRequest(key=b"k", value=b"v", lease=5, prev_kv=True), None),
    (rpc_pb2.PutRequest(key=b"k", ignore_value=True), None),
    (rpc_pb2.PutRequest(key=b"k", ignore_lease=True), None),
    (rpc_pb2.PutRequest(key=b"k", ignore_value=True, ignore_lease=True, prev_kv=True), None),
    (rpc_pb2.PutRequest(key=b"k", value=b"v", ignore_lease=True), None),
    (rpc_pb2.PutRequest(key=b"k", lease=5, ignore_value=True), None),
    (rpc_pb2.PutRequest(key=b"k", value=b"v", ignore_value=True), errors.VALUE_PROVIDED),
    (rpc_pb2.PutRequest(key=b"k", lease=5, ignore_lease=True), errors.LEASE_PROVIDED),
    (rpc_pb2.PutRequest(key=b"k", value=b"v", lease=5, ignore_value=True, ignore_lease=True),
     errors.VALUE_PROVIDED),
    (rpc_pb2.PutRequest(key=b"", value=b"v", ignore_value=True), errors.EMPTY_KEY),
    (rpc_pb2.PutRequest(key=b""), errors.EMPTY_KEY),
])
def test_check_put(req: rpc_pb2.PutRequest, expected: errors.EtcdError | None) -> None:
    for run in (lambda: validation.check_put(req),
                lambda: check(txn(success=[rpc_pb2.RequestOp(request_put=req)]))):
        if expected is None:
            run()
        else:
            with raises(expected):
                run()


def test_check_delete() -> None:
    validation.check_delete(rpc_pb2.DeleteRangeRequest(key=b"k", range_end=b"\x00"))
    with raises(errors.EMPTY_KEY):
        validation.check_delete(rpc_pb2.DeleteRangeRequest(key=b"", range_end=b"z"))
