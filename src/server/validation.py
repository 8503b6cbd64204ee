"""Request-shape checks etcd makes before a KV request reaches the store (``v3rpc/key.go``).

Pure functions: each raises the exact :class:`~coord_server.errors.EtcdError`
etcd answers, or returns None.
"""

from __future__ import annotations

from collections.abc import Sequence

from coord._pb import rpc_pb2

from . import errors

_SORT_TARGETS = frozenset(rpc_pb2.RangeRequest.SortTarget.values())


def check_range(r: rpc_pb2.RangeRequest) -> None:
    """etcd 3.4 checks only the key. An unknown sort_order is ignored (keys come back in key order);
    an unknown sort_target makes etcd 3.4 panic, so we answer etcd 3.5's error for it instead."""
    if not r.key:
        raise errors.EMPTY_KEY
    if r.sort_target not in _SORT_TARGETS:
        raise errors.INVALID_SORT_OPTION


def check_put(r: rpc_pb2.PutRequest) -> None:
    if not r.key:
        raise errors.EMPTY_KEY
    if r.ignore_value and r.value:
        raise errors.VALUE_PROVIDED
    if r.ignore_lease and r.lease:
        raise errors.LEASE_PROVIDED


def check_delete(r: rpc_pb2.DeleteRangeRequest) -> None:
    if not r.key:
        raise errors.EMPTY_KEY


def check_txn(r: rpc_pb2.TxnRequest, max_ops: int) -> None:
    """etcd's checkTxnRequest then checkIntervals on both branches."""
    _check_txn_shape(r, max_ops)
    _check_intervals(r.success)
    _check_intervals(r.failure)


def _check_txn_shape(r: rpc_pb2.TxnRequest, max_ops: int) -> None:
    opc = max(len(r.compare), len(r.success), len(r.failure))
    if opc > max_ops:
        raise errors.TOO_MANY_OPS
    for c in r.compare:
        if not c.key:
            raise errors.EMPTY_KEY
    # Nested txns get what is left of the budget after the largest list of this level.
    for op in r.success:
        _check_op(op, max_ops - opc)
    for op in r.failure:
        _check_op(op, max_ops - opc)


def _check_op(op: rpc_pb2.RequestOp, max_ops: int) -> None:
    which = op.WhichOneof("request")
    if which == "request_range":
        check_range(op.request_range)
    elif which == "request_put":
        check_put(op.request_put)
    elif which == "request_delete_range":
        check_delete(op.request_delete_range)
    elif which == "request_txn":
        _check_txn_shape(op.request_txn, max_ops)
    else:
        raise errors.KEY_NOT_FOUND


class _Intervals:
    """Half-open byte intervals, compared the way etcd's adt affine intervals compare.

    A single key is the point interval [key, key+"\\x00"); a range_end at or below
    its key (``"\\x00"`` included) gives an empty interval, which intersects nothing.
    """

    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes]] = []

    def add(self, key: bytes, end: bytes) -> None:
        self.items.append((key, end if end else key + b"\x00"))

    def extend(self, other: _Intervals) -> None:
        self.items.extend(other.items)

    def contains(self, key: bytes) -> bool:
        return any(lo <= key < hi for lo, hi in self.items)


def _check_intervals(ops: Sequence[rpc_pb2.RequestOp]) -> tuple[set[bytes], _Intervals]:
    dels = _Intervals()
    for op in ops:
        if op.WhichOneof("request") == "request_delete_range":
            d = op.request_delete_range
            dels.add(d.key, d.range_end)
    puts: set[bytes] = set()
    for op in ops:
        if op.WhichOneof("request") != "request_txn":
            continue
        puts_then, dels_then = _check_intervals(op.request_txn.success)
        puts_else, dels_else = _check_intervals(op.request_txn.failure)
        for k in puts_then:
            if k in puts or dels.contains(k):
                raise errors.DUPLICATE_KEY
            puts.add(k)
        for k in puts_else:
            # Then and Else are exclusive, so a key in both of one nested txn is fine.
            if (k in puts and k not in puts_then) or dels.contains(k):
                raise errors.DUPLICATE_KEY
            puts.add(k)
        dels.extend(dels_then)
        dels.extend(dels_else)
    for op in ops:
        if op.WhichOneof("request") != "request_put":
            continue
        k = op.request_put.key
        if k in puts or dels.contains(k):
            raise errors.DUPLICATE_KEY
        puts.add(k)
    return puts, dels
