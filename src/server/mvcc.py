"""The MVCC key-value store: revisions, key index, range, txn, compaction, HashKV.

Sans-io: no sockets, no clock, no event loop, no files. The server's write path
feeds it requests one write transaction at a time and persists the
:class:`Record` list each transaction leaves in :attr:`Store.pending`; the
read path asks it for the state at a revision it knows to be durable.

Semantics follow etcd 3.4's ``mvcc`` package and ``etcdserver/apply.go``
(reference/etcd-api.md §2): one revision per write transaction, sub-revisions
inside it, a key's history split into generations by tombstones, compaction
that keeps the newest version of every live key.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import crc32c
from sortedcontainers import SortedDict

from coord._pb import kv_pb2, rpc_pb2

from . import errors

KeyValue = kv_pb2.KeyValue
RangeRequest = rpc_pb2.RangeRequest

_REV = struct.Struct(">Q")
_ALL = b"\x00"

NO_LEASE = 0


def rev_key(main: int, sub: int, tombstone: bool = False) -> bytes:
    """The backend key of a record: etcd's ``revToBytes`` (+ ``t`` for a tombstone)."""
    return _REV.pack(main) + b"_" + _REV.pack(sub) + (b"t" if tombstone else b"")


def parse_rev_key(raw: bytes) -> tuple[int, int, bool]:
    if len(raw) not in (17, 18) or raw[8:9] != b"_" or (len(raw) == 18 and raw[17:] != b"t"):
        raise ValueError(f"malformed revision key {raw!r}")
    return _REV.unpack_from(raw, 0)[0], _REV.unpack_from(raw, 9)[0], len(raw) == 18


def prefix_end(key: bytes) -> bytes:
    """The range_end that selects every key starting with ``key`` (clientv3 ``GetPrefixRangeEnd``)."""
    end = bytearray(key)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return _ALL


@dataclass(slots=True, eq=False)
class Record:
    """One entry of the revision log, i.e. one backend record.

    For a put ``kv`` is the stored KeyValue; for a deletion it is the watch-event
    shape ``KeyValue(key, mod_revision)`` and ``tombstone`` is set.
    """

    main: int
    sub: int
    kv: KeyValue
    tombstone: bool = False

    @property
    def key(self) -> bytes:
        return self.kv.key

    def backend_key(self) -> bytes:
        return rev_key(self.main, self.sub, self.tombstone)

    def backend_value(self) -> bytes:
        if self.tombstone:
            # etcd stores a deletion as a KeyValue carrying only the key.
            return KeyValue(key=self.kv.key).SerializeToString()
        return self.kv.SerializeToString()

    @classmethod
    def from_backend(cls, raw_key: bytes, raw_value: bytes) -> Record:
        main, sub, tomb = parse_rev_key(raw_key)
        kv = KeyValue.FromString(raw_value)
        if tomb:
            kv.mod_revision = main
        return cls(main, sub, kv, tomb)


class KeyHistory:
    """Every retained revision of one key, oldest first; tombstones end generations."""

    __slots__ = ("records", "revs")

    def __init__(self) -> None:
        self.revs: list[int] = []
        self.records: list[Record] = []

    def at(self, rev: int) -> KeyValue | None:
        """The live value at ``rev``, or None if absent or deleted then."""
        i = bisect_right(self.revs, rev) - 1
        if i < 0:
            return None
        rec = self.records[i]
        return None if rec.tombstone else rec.kv

    def latest(self) -> KeyValue | None:
        if not self.records:
            return None
        rec = self.records[-1]
        return None if rec.tombstone else rec.kv

    def keep_index(self, at_rev: int) -> int:
        """Index of the first record a compaction at ``at_rev`` keeps."""
        i = bisect_right(self.revs, at_rev) - 1
        if i < 0:
            return 0
        return i + 1 if self.records[i].tombstone else i

    def append(self, rec: Record) -> None:
        self.revs.append(rec.main)
        self.records.append(rec)


@dataclass(slots=True)
class RangeResult:
    kvs: list[KeyValue]
    count: int
    more: bool




LeaseLookup = Callable[[int], bool]


def _no_leases(_lease: int) -> bool:
    return False


@dataclass(slots=True)
class Store:
    """The whole MVCC state.

    ``rev`` is the newest applied revision (etcd's ``currentRev``);
    ``compact_rev`` is -1 until the first compaction, as in etcd.
    ``lease_exists`` is injected by the lessor; without one no lease exists.
    """

    rev: int = 1
    compact_rev: int = -1
    lease_exists: LeaseLookup = _no_leases
    _index: SortedDict = field(default_factory=SortedDict)  # bytes -> KeyHistory
    _log: dict[int, list[Record]] = field(default_factory=dict)  # main rev -> records (>= compact_rev)
    pending: list[Record] = field(default_factory=list)  # written since the last take_pending()
    live_keys: int = 0
    _lease_keys: dict[int, set[bytes]] = field(default_factory=dict)  # lease -> live keys attached to it

    # ------------------------------------------------------------------ restore

    @classmethod
    def restore(
        cls, records: Iterable[Record], *, rev: int, compact_rev: int, lease_exists: LeaseLookup = _no_leases
    ) -> Store:
        """Rebuild from backend records (in revision order) and the persisted meta.

        Records at or below ``compact_rev`` that a compaction would not keep are
        dropped here, which finishes a compaction the crash interrupted.
        """
        store = cls(rev=rev, compact_rev=compact_rev, lease_exists=lease_exists)
        for rec in records:
            if rec.main > rev:
                raise ValueError(f"record at revision {rec.main} above the committed revision {rev}")
            hist = store._index.get(rec.key)
            if hist is None:
                hist = store._index[rec.key] = KeyHistory()
            hist.append(rec)
            if rec.main >= compact_rev:
                store._log.setdefault(rec.main, []).append(rec)
        if compact_rev > 0:
            store._compact_index(compact_rev)
        live = 0
        for key, hist in store._index.items():
            kv = hist.latest()
            if kv is not None:
                live += 1
                if kv.lease:
                    store._move_lease(key, NO_LEASE, kv.lease)
        store.live_keys = live
        return store

    # ------------------------------------------------------------------ reads

    def _iter_range(self, key: bytes, end: bytes, rev: int) -> Iterator[KeyValue]:
        if not end:
            hist = self._index.get(key)
            if hist is not None:
                kv = hist.at(rev)
                if kv is not None:
                    yield kv
            return
        if end == _ALL:
            keys = self._index.irange(minimum=key)
        else:
            if end <= key:
                return
            keys = self._index.irange(minimum=key, maximum=end, inclusive=(True, False))
        index = self._index
        for k in keys:
            kv = index[k].at(rev)
            if kv is not None:
                yield kv

    def check_read_rev(self, revision: int, current: int) -> int:
        """The revision a read of ``revision`` sees when ``current`` is the newest visible one.

        Raises FUTURE_REV / COMPACTED as etcd's ``rangeKeys`` does (<= 0 means current).
        """
        if revision > current:
            raise errors.FUTURE_REV
        if revision <= 0:
            revision = current
        if revision < self.compact_rev:
            raise errors.COMPACTED
        return revision

    def range(self, req: RangeRequest, current: int) -> RangeResult:
        """Serve a RangeRequest as etcd's applier does, reading at ``current`` or ``req.revision``."""
        rev = self.check_read_rev(req.revision, current)
        it = self._iter_range(req.key, req.range_end, rev)
        filtered = bool(req.min_mod_revision or req.max_mod_revision or req.min_create_revision
                        or req.max_create_revision)
        limit = req.limit
        if req.count_only:
            return RangeResult([], sum(1 for _ in it), False)
        if not filtered and req.sort_order == RangeRequest.NONE and limit > 0:
            # etcd reads limit+1 keys in key order (still counting all), and only then sorts:
            # with a sort target but no order, the sort applies to that first page only.
            kvs = []
            count = 0
            for kv in it:
                if count <= limit:
                    kvs.append(kv)
                count += 1
        else:
            kvs = list(it)
            count = len(kvs)
            if filtered:
                kvs = [kv for kv in kvs if _passes_filters(req, kv)]
        sort_order = req.sort_order
        if req.sort_target != RangeRequest.KEY and sort_order == RangeRequest.NONE:
            sort_order = RangeRequest.ASCEND
        if sort_order in (RangeRequest.ASCEND, RangeRequest.DESCEND):  # etcd 3.4 ignores unknown orders
            target = req.sort_target
            reverse = sort_order == RangeRequest.DESCEND
            if target == RangeRequest.KEY:
                if reverse:
                    kvs.reverse()
            else:
                kvs.sort(key=_SORT_KEYS[target], reverse=reverse)
        more = False
        if limit > 0 and len(kvs) > limit:
            del kvs[limit:]
            more = True
        if req.keys_only:
            kvs = [_without_value(kv) for kv in kvs]
        return RangeResult(kvs, count, more)

    def get(self, key: bytes, rev: int | None = None) -> KeyValue | None:
        hist: KeyHistory | None = self._index.get(key)
        if hist is None:
            return None
        return hist.latest() if rev is None else hist.at(rev)

    def events_between(self, start: int, end: int) -> Iterator[Record]:
        """Records with ``start <= main <= end`` in revision order (the watch catch-up source).

        History below ``compact_rev`` is gone; ``compact_rev`` itself is whole. (etcd's backend
        drops the tombstones at the compaction revision, so a watch resuming there silently
        misses those deletions; :meth:`physical_keep` keeps them.)
        """
        log = self._log
        for main in range(max(start, self.compact_rev), end + 1):
            recs = log.get(main)
            if recs:
                yield from recs

    def records_at(self, main: int) -> list[Record]:
        """The records written at revision ``main`` (empty if none or compacted away)."""
        return self._log.get(main, [])

    # ------------------------------------------------------------------ writes

    def take_pending(self) -> list[Record]:
        out, self.pending = self.pending, []
        return out

    def write(self) -> WriteTxn:
        return WriteTxn(self)

    def put(self, req: rpc_pb2.PutRequest) -> rpc_pb2.PutResponse:
        """Apply a PutRequest in its own write transaction (lease checked first, as etcd does)."""
        if req.lease != NO_LEASE and not self.lease_exists(req.lease):
            raise errors.LEASE_NOT_FOUND
        with self.write() as txn:
            return txn.put(req)

    def delete_range(self, req: rpc_pb2.DeleteRangeRequest) -> rpc_pb2.DeleteRangeResponse:
        with self.write() as txn:
            return txn.delete_range(req)

    def txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        """Apply a TxnRequest: compares on one view, the chosen branch checked whole, then applied."""
        with self.write() as txn:
            path = _compare_path(txn, req)
            _check_path(req, path, txn._check_put)
            _check_path(req, path, txn._check_range)
            resp = rpc_pb2.TxnResponse()
            _apply_txn(txn, req, path, resp)
            resp.header.revision = txn.view_rev()
            return resp

    def is_read_only_txn(self, req: rpc_pb2.TxnRequest) -> bool:
        return _is_read_only(req)

    def read_txn(self, req: rpc_pb2.TxnRequest, current: int) -> rpc_pb2.TxnResponse:
        """A Txn with only ranges in every branch, served at ``current`` without a write."""
        view = ReadView(self, current)
        path = _compare_path(view, req)
        _check_path(req, path, view._check_range)
        resp = rpc_pb2.TxnResponse()
        _apply_txn(view, req, path, resp)
        resp.header.revision = current
        return resp

    # ------------------------------------------------------------------ compaction

    def compact(self, rev: int) -> None:
        """Drop history below ``rev``, keeping each live key's newest version at or below it.

        Raises COMPACTED (``rev <= compact_rev``) or FUTURE_REV (``rev > self.rev``).
        """
        if rev <= self.compact_rev:
            raise errors.COMPACTED
        if rev > self.rev:
            raise errors.FUTURE_REV
        old = self.compact_rev
        self.compact_rev = rev
        for main in range(max(old, 0), rev):
            self._log.pop(main, None)
        self._compact_index(rev)

    def _compact_index(self, rev: int) -> None:
        dead = []
        for key, hist in self._index.items():
            i = hist.keep_index(rev)
            if i:
                del hist.revs[:i]
                del hist.records[:i]
            if not hist.records:
                dead.append(key)
        for key in dead:
            del self._index[key]

    def keep(self, rev: int) -> set[tuple[int, int]]:
        """The (main, sub) revisions a compaction at ``rev`` keeps (etcd's ``kvindex.Keep``)."""
        out: set[tuple[int, int]] = set()
        for hist in self._index.values():
            i = bisect_right(hist.revs, rev) - 1
            if i >= 0 and not hist.records[i].tombstone:
                rec = hist.records[i]
                out.add((rec.main, rec.sub))
        return out

    def physical_keep(self, rev: int) -> set[tuple[int, int]]:
        """What the backend keeps after a compaction at ``rev``: :meth:`keep` plus the
        tombstones at ``rev`` itself, so the revision log stays whole from ``rev`` on (also
        after a restart) and a watch starting there gets every event of that revision."""
        out = self.keep(rev)
        out.update((r.main, r.sub) for r in self._log.get(rev, ()) if r.tombstone)
        return out

    def hash_kv(self, rev: int, current: int) -> tuple[int, int]:
        """etcd's HashKV: CRC-32C over "key" and every retained record up to ``rev``.

        Returns (hash, revision hashed). Raises COMPACTED / FUTURE_REV like etcd.
        """
        if 0 < rev <= self.compact_rev:
            raise errors.COMPACTED
        if rev > current:
            raise errors.FUTURE_REV
        if rev == 0:
            rev = current  # only 0 means "current": a negative revision hashes no record, as in etcd
        keep = self.keep(rev)
        lower = self.compact_rev + 1
        records = [rec for hist in self._index.values() for rec in hist.records if rec.main <= rev]
        records.sort(key=lambda r: (r.main, r.sub))
        h = crc32c.crc32c(b"key")
        for rec in records:
            if rec.main < lower and keep and (rec.main, rec.sub) not in keep:
                continue
            h = crc32c.crc32c(rec.backend_key(), h)
            h = crc32c.crc32c(rec.backend_value(), h)
        return h, rev

    # ------------------------------------------------------------------ introspection

    def all_records(self) -> Iterator[Record]:
        """Every retained record in revision order (what the backend must hold)."""
        recs = [rec for hist in self._index.values() for rec in hist.records]
        recs.sort(key=lambda r: (r.main, r.sub))
        return iter(recs)

    def key_count(self) -> int:
        return self.live_keys

    def keys_with_lease(self) -> Iterator[tuple[bytes, int]]:
        for lease, keys in self._lease_keys.items():
            for key in keys:
                yield key, lease

    def keys_of_lease(self, lease: int) -> list[bytes]:
        """The live keys attached to ``lease``, sorted (the order etcd's Revoke deletes them in)."""
        return sorted(self._lease_keys.get(lease, ()))

    def _move_lease(self, key: bytes, old: int, new: int) -> None:
        """Keep the lease -> keys index in step with a key's latest value (0 = no lease / deleted)."""
        if old == new:
            return
        if old != NO_LEASE:
            keys = self._lease_keys[old]
            keys.discard(key)
            if not keys:
                del self._lease_keys[old]
        if new != NO_LEASE:
            self._lease_keys.setdefault(new, set()).add(key)


class ReadView:
    """A read-only view at a fixed revision, used for read-only txns."""

    def __init__(self, store: Store, rev: int) -> None:
        self.store = store
        self._rev = rev

    def view_rev(self) -> int:
        return self._rev

    def range(self, req: RangeRequest) -> rpc_pb2.RangeResponse:
        return _range_response(self.store, req, self._rev)

    def _check_range(self, op: rpc_pb2.RequestOp) -> None:
        _check_range_op(self.store, op, self._rev)

    def range_kvs(self, key: bytes, end: bytes) -> list[KeyValue]:
        return list(self.store._iter_range(key, end, self._rev))


class WriteTxn:
    """One write transaction: every change gets revision ``begin + 1`` and the next sub-revision.

    Use as a context manager: a clean exit bumps the store revision if anything
    changed; an exception undoes the changes made so far.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.begin = store.rev
        self.changes: list[Record] = []

    def __enter__(self) -> WriteTxn:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._undo()
            return
        if self.changes:
            store = self.store
            store.rev = self.begin + 1
            store._log[store.rev] = self.changes
            store.pending.extend(self.changes)

    def _undo(self) -> None:
        index = self.store._index
        for rec in reversed(self.changes):
            hist = index[rec.key]
            prev_live = len(hist.records) >= 2 and not hist.records[-2].tombstone
            hist.revs.pop()
            hist.records.pop()
            restored = hist.records[-1].kv.lease if prev_live else NO_LEASE
            self.store._move_lease(rec.key, NO_LEASE if rec.tombstone else rec.kv.lease, restored)
            if rec.tombstone:
                self.store.live_keys += 1
            elif not prev_live:
                self.store.live_keys -= 1
            if not hist.records:
                del index[rec.key]
        self.changes.clear()

    def view_rev(self) -> int:
        return self.begin + 1 if self.changes else self.begin

    def range_kvs(self, key: bytes, end: bytes) -> list[KeyValue]:
        return list(self.store._iter_range(key, end, self.view_rev()))

    def range(self, req: RangeRequest) -> rpc_pb2.RangeResponse:
        return _range_response(self.store, req, self.view_rev())

    def _check_range(self, op: rpc_pb2.RequestOp) -> None:
        _check_range_op(self.store, op, self.view_rev())

    def _check_put(self, op: rpc_pb2.RequestOp) -> None:
        if op.WhichOneof("request") != "request_put":
            return
        req = op.request_put
        if (req.ignore_value or req.ignore_lease) and self.store.get(req.key, self.view_rev()) is None:
            raise errors.KEY_NOT_FOUND
        if req.lease != NO_LEASE and not self.store.lease_exists(req.lease):
            raise errors.LEASE_NOT_FOUND

    def _record(self, key: bytes, rec: Record) -> None:
        index = self.store._index
        hist = index.get(key)
        if hist is None:
            hist = index[key] = KeyHistory()
        prev = hist.latest()
        hist.append(rec)
        self.changes.append(rec)
        old_lease = NO_LEASE if prev is None else prev.lease
        new_lease = NO_LEASE if rec.tombstone else rec.kv.lease
        if old_lease != new_lease:
            self.store._move_lease(key, old_lease, new_lease)

    def put(self, req: rpc_pb2.PutRequest) -> rpc_pb2.PutResponse:
        resp = rpc_pb2.PutResponse()
        key, value, lease = req.key, req.value, req.lease
        prev = self.store.get(key, self.view_rev())
        if req.ignore_value or req.ignore_lease:
            if prev is None:
                raise errors.KEY_NOT_FOUND
            if req.ignore_value:
                value = prev.value
            if req.ignore_lease:
                lease = prev.lease
        if req.prev_kv and prev is not None:
            resp.prev_kv.CopyFrom(prev)
        rev = self.begin + 1
        if prev is None:
            kv = KeyValue(key=key, value=value, create_revision=rev, mod_revision=rev, version=1, lease=lease)
            self.store.live_keys += 1
        else:
            kv = KeyValue(key=key, value=value, create_revision=prev.create_revision, mod_revision=rev,
                          version=prev.version + 1, lease=lease)
        self._record(key, Record(rev, len(self.changes), kv))
        resp.header.revision = rev
        return resp

    def delete_range(self, req: rpc_pb2.DeleteRangeRequest) -> rpc_pb2.DeleteRangeResponse:
        resp = rpc_pb2.DeleteRangeResponse()
        victims = self.range_kvs(req.key, req.range_end)
        if req.prev_kv:
            resp.prev_kvs.extend(victims)
        rev = self.begin + 1
        for kv in victims:
            self._record(kv.key, Record(rev, len(self.changes), KeyValue(key=kv.key, mod_revision=rev), True))
            self.store.live_keys -= 1
        resp.deleted = len(victims)
        resp.header.revision = self.view_rev()
        return resp


# ---------------------------------------------------------------------- helpers


def _passes_filters(req: RangeRequest, kv: KeyValue) -> bool:
    if req.max_mod_revision and kv.mod_revision > req.max_mod_revision:
        return False
    if req.min_mod_revision and kv.mod_revision < req.min_mod_revision:
        return False
    if req.max_create_revision and kv.create_revision > req.max_create_revision:
        return False
    return not (req.min_create_revision and kv.create_revision < req.min_create_revision)


_SORT_KEYS: dict[int, Callable[[KeyValue], Any]] = {
    RangeRequest.VERSION: lambda kv: kv.version,
    RangeRequest.CREATE: lambda kv: kv.create_revision,
    RangeRequest.MOD: lambda kv: kv.mod_revision,
    RangeRequest.VALUE: lambda kv: kv.value,
}


def _without_value(kv: KeyValue) -> KeyValue:
    return KeyValue(key=kv.key, create_revision=kv.create_revision, mod_revision=kv.mod_revision,
                    version=kv.version, lease=kv.lease)


def _range_response(store: Store, req: RangeRequest, current: int) -> rpc_pb2.RangeResponse:
    res = store.range(req, current)
    resp = rpc_pb2.RangeResponse(kvs=res.kvs, more=res.more, count=res.count)
    resp.header.revision = current
    return resp


def _check_range_op(store: Store, op: rpc_pb2.RequestOp, view_rev: int) -> None:
    # etcd's checkRequestRange: unlike a plain Range, a negative revision is "compacted".
    if op.WhichOneof("request") != "request_range":
        return
    rev = op.request_range.revision
    if rev == 0:
        return
    if rev > view_rev:
        raise errors.FUTURE_REV
    if rev < store.compact_rev:
        raise errors.COMPACTED


def _compare_int(a: int, b: int) -> int:
    return (a > b) - (a < b)


def _compare_kv(c: rpc_pb2.Compare, kv: KeyValue) -> bool:
    target = c.target
    union = c.WhichOneof("target_union")
    if target == rpc_pb2.Compare.VALUE:
        want = c.value if union == "value" else b""
        have = kv.value
        result = (have > want) - (have < want)
    elif target == rpc_pb2.Compare.CREATE:
        result = _compare_int(kv.create_revision, c.create_revision if union == "create_revision" else 0)
    elif target == rpc_pb2.Compare.MOD:
        result = _compare_int(kv.mod_revision, c.mod_revision if union == "mod_revision" else 0)
    elif target == rpc_pb2.Compare.VERSION:
        result = _compare_int(kv.version, c.version if union == "version" else 0)
    elif target == rpc_pb2.Compare.LEASE:
        result = _compare_int(kv.lease, c.lease if union == "lease" else 0)
    else:
        result = 0
    op = c.result
    if op == rpc_pb2.Compare.EQUAL:
        return result == 0
    if op == rpc_pb2.Compare.NOT_EQUAL:
        return result != 0
    if op == rpc_pb2.Compare.GREATER:
        return result > 0
    if op == rpc_pb2.Compare.LESS:
        return result < 0
    return True


_EMPTY_KV = KeyValue()


def _apply_compare(view: ReadView | WriteTxn, c: rpc_pb2.Compare) -> bool:
    kvs = view.range_kvs(c.key, c.range_end)
    if not kvs:
        if c.target == rpc_pb2.Compare.VALUE:
            return False
        return _compare_kv(c, _EMPTY_KV)
    return all(_compare_kv(c, kv) for kv in kvs)


def _compare_path(view: ReadView | WriteTxn, req: rpc_pb2.TxnRequest) -> list[bool]:
    """etcd's compareToPath: every nested compare on the chosen path, on the pre-txn view."""
    ok = all(_apply_compare(view, c) for c in req.compare)
    path = [ok]
    for op in req.success if ok else req.failure:
        if op.WhichOneof("request") == "request_txn":
            path.extend(_compare_path(view, op.request_txn))
    return path


def _check_path(req: rpc_pb2.TxnRequest, path: list[bool], check: Callable[[rpc_pb2.RequestOp], None]) -> int:
    """Run ``check`` on every op of the chosen path; returns how many nested txns it walked."""
    ops = req.success if path[0] else req.failure
    rest = path[1:]
    walked = 0
    for op in ops:
        if op.WhichOneof("request") == "request_txn":
            n = _check_path(op.request_txn, rest, check)
            rest = rest[n + 1 :]
            walked += n + 1
        else:
            check(op)
    return walked


def _apply_txn(view: ReadView | WriteTxn, req: rpc_pb2.TxnRequest, path: list[bool],
               resp: rpc_pb2.TxnResponse) -> int:
    ok = path[0]
    resp.succeeded = ok
    rest = path[1:]
    walked = 0
    for op in req.success if ok else req.failure:
        which = op.WhichOneof("request")
        out = resp.responses.add()
        if which == "request_range":
            out.response_range.CopyFrom(view.range(op.request_range))
        elif which == "request_put":
            assert isinstance(view, WriteTxn)
            out.response_put.CopyFrom(view.put(op.request_put))
        elif which == "request_delete_range":
            assert isinstance(view, WriteTxn)
            out.response_delete_range.CopyFrom(view.delete_range(op.request_delete_range))
        elif which == "request_txn":
            sub = out.response_txn
            # etcd leaves a nested txn's header present but empty.
            sub.header.SetInParent()
            n = _apply_txn(view, op.request_txn, rest, sub)
            rest = rest[n + 1 :]
            walked += n + 1
    return walked


def _is_read_only(req: rpc_pb2.TxnRequest) -> bool:
    for op in (*req.success, *req.failure):
        which = op.WhichOneof("request")
        if which == "request_txn":
            if not _is_read_only(op.request_txn):
                return False
        elif which != "request_range":
            return False
    return True
