"""Transactions: a small comparison DSL and the operations a txn (or a plain call) can carry.

Build compares with the :class:`Compare` helpers and Python comparison operators::

    Compare.value("cfg") == b"v1"
    Compare.version("cfg") > 0
    Compare.create_revision(lock_key) == token      # what Lock.is_owner() returns
    Compare.mod_revision("k", prefix=True) < 100    # every key under the prefix

then ``await client.txn(compare=[...], success=[Put(...), Delete(...)], failure=[Get(...)])``.
Pure values, no I/O: they turn into protobuf messages when sent.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

from ._pb import rpc_pb2
from ._types import (
    DeleteResult,
    Key,
    KeyValue,
    LeaseLike,
    PutResult,
    RangeResult,
    SortOrder,
    SortTarget,
    lease_id_of,
    range_of,
    to_bytes,
)


class _Target(enum.IntEnum):
    VERSION = 0
    CREATE = 1
    MOD = 2
    VALUE = 3
    LEASE = 4


class _Result(enum.IntEnum):
    EQUAL = 0
    GREATER = 1
    LESS = 2
    NOT_EQUAL = 3


@dataclass(frozen=True, slots=True)
class Compare:
    """One txn condition: ``target(key) <op> operand``. For a range (``prefix``/``range_end``) every key
    in the range must satisfy it; a missing key compares as version/revisions/lease 0 (a VALUE compare on a
    missing key is false)."""

    key: bytes
    range_end: bytes
    target: int
    result: int
    operand: int | bytes

    @staticmethod
    def value(key: Key, *, prefix: bool = False, range_end: Key | None = None) -> CompareTarget:
        return CompareTarget(_Target.VALUE, *range_of(key, prefix=prefix, range_end=range_end))

    @staticmethod
    def version(key: Key, *, prefix: bool = False, range_end: Key | None = None) -> CompareTarget:
        return CompareTarget(_Target.VERSION, *range_of(key, prefix=prefix, range_end=range_end))

    @staticmethod
    def create_revision(key: Key, *, prefix: bool = False, range_end: Key | None = None) -> CompareTarget:
        return CompareTarget(_Target.CREATE, *range_of(key, prefix=prefix, range_end=range_end))

    @staticmethod
    def mod_revision(key: Key, *, prefix: bool = False, range_end: Key | None = None) -> CompareTarget:
        return CompareTarget(_Target.MOD, *range_of(key, prefix=prefix, range_end=range_end))

    @staticmethod
    def lease(key: Key, *, prefix: bool = False, range_end: Key | None = None) -> CompareTarget:
        return CompareTarget(_Target.LEASE, *range_of(key, prefix=prefix, range_end=range_end))

    def to_pb(self) -> rpc_pb2.Compare:
        msg = rpc_pb2.Compare(
            result=cast(Any, self.result), target=cast(Any, self.target), key=self.key, range_end=self.range_end
        )
        if self.target == _Target.VALUE:
            assert isinstance(self.operand, bytes)
            msg.value = self.operand
        elif self.target == _Target.VERSION:
            msg.version = int(self.operand)
        elif self.target == _Target.CREATE:
            msg.create_revision = int(self.operand)
        elif self.target == _Target.MOD:
            msg.mod_revision = int(self.operand)
        else:
            msg.lease = int(self.operand)
        return msg


class CompareTarget:
    """``Compare.<target>(key)``: compare it with ``==``, ``!=``, ``<`` or ``>`` to get a :class:`Compare`."""

    __slots__ = ("_key", "_range_end", "_target")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, target: _Target, key: bytes, range_end: bytes) -> None:
        self._target = target
        self._key = key
        self._range_end = range_end

    def _make(self, result: _Result, other: object) -> Compare:
        if self._target == _Target.VALUE:
            if not isinstance(other, str | bytes):
                raise TypeError("a value compares with str or bytes")
            operand: int | bytes = to_bytes(other)
        else:
            if self._target == _Target.LEASE and hasattr(other, "lease_id"):
                other = other.lease_id
            if not isinstance(other, int) or isinstance(other, bool):
                raise TypeError(f"{self._target.name.lower()} compares with an int")
            operand = other
        return Compare(self._key, self._range_end, int(self._target), int(result), operand)

    def __eq__(self, other: object) -> Compare:  # type: ignore[override]
        return self._make(_Result.EQUAL, other)

    def __ne__(self, other: object) -> Compare:  # type: ignore[override]
        return self._make(_Result.NOT_EQUAL, other)

    def __lt__(self, other: object) -> Compare:
        return self._make(_Result.LESS, other)

    def __gt__(self, other: object) -> Compare:
        return self._make(_Result.GREATER, other)

    def __le__(self, other: object) -> NoReturn:
        raise TypeError("etcd compares support ==, !=, < and > only")

    __ge__ = __le__

    def __bool__(self) -> NoReturn:
        raise TypeError("a CompareTarget is not a condition yet: compare it with ==, !=, < or >")


@dataclass(frozen=True, slots=True)
class Get:
    """A read (Range): one key, a ``prefix``, or ``[key, range_end)``."""

    key: Key
    prefix: bool = False
    range_end: Key | None = None
    limit: int = 0
    revision: int = 0
    keys_only: bool = False
    count_only: bool = False
    serializable: bool = False
    sort_order: SortOrder = SortOrder.NONE
    sort_target: SortTarget = SortTarget.KEY
    min_mod_revision: int = 0
    max_mod_revision: int = 0
    min_create_revision: int = 0
    max_create_revision: int = 0

    def to_pb(self) -> rpc_pb2.RangeRequest:
        key, end = range_of(self.key, prefix=self.prefix, range_end=self.range_end)
        return rpc_pb2.RangeRequest(
            key=key,
            range_end=end,
            limit=self.limit,
            revision=self.revision,
            keys_only=self.keys_only,
            count_only=self.count_only,
            serializable=self.serializable,
            sort_order=cast(Any, self.sort_order.value),
            sort_target=cast(Any, self.sort_target.value),
            min_mod_revision=self.min_mod_revision,
            max_mod_revision=self.max_mod_revision,
            min_create_revision=self.min_create_revision,
            max_create_revision=self.max_create_revision,
        )


@dataclass(frozen=True, slots=True)
class Put:
    """A write of ``value`` at ``key``, attached to ``lease`` (an ID or a Session; 0 = none)."""

    key: Key
    value: Key
    lease: LeaseLike = 0
    prev_kv: bool = False

    def to_pb(self) -> rpc_pb2.PutRequest:
        return rpc_pb2.PutRequest(
            key=to_bytes(self.key), value=to_bytes(self.value), lease=lease_id_of(self.lease), prev_kv=self.prev_kv
        )


@dataclass(frozen=True, slots=True)
class Delete:
    """A deletion of one key, a ``prefix``, or ``[key, range_end)``."""

    key: Key
    prefix: bool = False
    range_end: Key | None = None
    prev_kv: bool = False

    def to_pb(self) -> rpc_pb2.DeleteRangeRequest:
        key, end = range_of(self.key, prefix=self.prefix, range_end=self.range_end)
        return rpc_pb2.DeleteRangeRequest(key=key, range_end=end, prev_kv=self.prev_kv)


@dataclass(frozen=True, slots=True)
class Txn:
    """A nested transaction (as an operation inside another txn)."""

    compare: Sequence[Compare] = ()
    success: Sequence[Op] = ()
    failure: Sequence[Op] = ()

    def to_pb(self) -> rpc_pb2.TxnRequest:
        return txn_request(self.compare, self.success, self.failure)


Op = Get | Put | Delete | Txn


def _op_pb(op: Op) -> rpc_pb2.RequestOp:
    if isinstance(op, Get):
        return rpc_pb2.RequestOp(request_range=op.to_pb())
    if isinstance(op, Put):
        return rpc_pb2.RequestOp(request_put=op.to_pb())
    if isinstance(op, Delete):
        return rpc_pb2.RequestOp(request_delete_range=op.to_pb())
    if isinstance(op, Txn):
        return rpc_pb2.RequestOp(request_txn=op.to_pb())
    raise TypeError(f"not a txn operation: {op!r}")


def txn_request(compare: Iterable[Compare], success: Iterable[Op], failure: Iterable[Op]) -> rpc_pb2.TxnRequest:
    for c in compare:
        if not isinstance(c, Compare):
            raise TypeError(f"not a Compare: {c!r} (did you compare a CompareTarget with ==, !=, < or >?)")
    return rpc_pb2.TxnRequest(
        compare=[c.to_pb() for c in compare],
        success=[_op_pb(op) for op in success],
        failure=[_op_pb(op) for op in failure],
    )


@dataclass(frozen=True, slots=True)
class TxnResult:
    """``succeeded`` tells which branch ran; ``responses`` has one result per operation of that branch;
    ``revision`` is the store revision after the txn."""

    succeeded: bool
    responses: tuple[RangeResult | PutResult | DeleteResult | TxnResult, ...] = field(default=())
    revision: int = 0

    @classmethod
    def from_pb(cls, resp: Any, revision: int | None = None) -> TxnResult:
        rev = resp.header.revision if revision is None else revision
        out: list[RangeResult | PutResult | DeleteResult | TxnResult] = []
        for r in resp.responses:
            kind = r.WhichOneof("response")
            if kind == "response_range":
                rr = r.response_range
                out.append(RangeResult(tuple(KeyValue.from_pb(kv) for kv in rr.kvs), rr.count, rr.more, rev))
            elif kind == "response_put":
                p = r.response_put
                out.append(PutResult(rev, KeyValue.from_pb(p.prev_kv) if p.HasField("prev_kv") else None))
            elif kind == "response_delete_range":
                d = r.response_delete_range
                out.append(DeleteResult(d.deleted, tuple(KeyValue.from_pb(kv) for kv in d.prev_kvs), rev))
            elif kind == "response_txn":
                out.append(TxnResult.from_pb(r.response_txn, rev))
        return cls(resp.succeeded, tuple(out), rev)
