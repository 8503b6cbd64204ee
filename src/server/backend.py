"""The durable half: one LMDB environment, written only by the server's single writer.

Layout (named databases, like etcd's bbolt buckets):

- ``key``: revision-keyed records, ``rev_key(main, sub[, tombstone])`` → marshalled KeyValue,
  byte-for-byte what etcd stores, so HashKV over it equals etcd's.
- ``meta``: the consistent revision, compaction state, raft term and index. Written in the
  same transaction as the records it describes, so a crash can never leave the
  marker ahead of (or behind) the data.
- ``alarm``, ``lease`` and later ``auth``: other durable state.

Every :meth:`Backend.commit` is one LMDB write transaction committed with a
synchronous flush (fdatasync of data pages, then the meta page). Any error from
LMDB is fatal to the caller: after a failed sync the on-disk state is unknown,
so the server must stop rather than go on (etcd does the same on WAL errors).

This module does blocking I/O; the writer runs it in a worker thread.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from itertools import groupby
from pathlib import Path

import lmdb

from ._fs import fsync_dir

_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")

DBS = (b"key", b"meta", b"alarm", b"lease", b"auth")

# meta keys
CONSISTENT_REV = b"consistent_rev"
SCHEDULED_COMPACT = b"scheduledCompactRev"
FINISHED_COMPACT = b"finishedCompactRev"
TERM = b"term"
CONSISTENT_INDEX = b"consistent_index"
WAL_INDEX = b"wal_index"  # the last write-ahead-log record whose ops this backend holds

Op = tuple[bytes, bytes, bytes | None]  # (db name, key, value or None to delete)


_DB_IDS = {name: i for i, name in enumerate(DBS)}
_OP_HEAD = struct.Struct("<BI")
_VLEN = struct.Struct("<I")
_DELETE = 0xFFFFFFFF


def encode_ops(ops: Iterable[Op]) -> bytes:
    """Serialize a batch of ops for the write-ahead log."""
    parts: list[bytes] = []
    for db, key, value in ops:
        parts.append(_OP_HEAD.pack(_DB_IDS[db], len(key)))
        parts.append(key)
        if value is None:
            parts.append(_VLEN.pack(_DELETE))
        else:
            parts.append(_VLEN.pack(len(value)))
            parts.append(value)
    return b"".join(parts)


def decode_ops(raw: bytes) -> list[Op]:
    """Inverse of :func:`encode_ops`; raises ValueError on malformed input."""
    ops: list[Op] = []
    off = 0
    try:
        while off < len(raw):
            db_id, klen = _OP_HEAD.unpack_from(raw, off)
            off += _OP_HEAD.size
            key = raw[off : off + klen]
            off += klen
            (vlen,) = _VLEN.unpack_from(raw, off)
            off += _VLEN.size
            value = None
            if vlen != _DELETE:
                value = raw[off : off + vlen]
                off += vlen
            if len(key) != klen or (value is not None and len(value) != vlen):
                raise ValueError("truncated op")
            ops.append((DBS[db_id], key, value))
    except (struct.error, IndexError) as exc:
        raise ValueError(f"malformed op batch: {exc}") from exc
    return ops


def pack_i64(v: int) -> bytes:
    return _I64.pack(v)


def unpack_i64(raw: bytes) -> int:
    return int(_I64.unpack(raw)[0])


class BackendError(Exception):
    """The store on disk cannot be trusted (failed sync, corrupt data): the server must stop."""


class Backend:
    """An LMDB environment at ``<data_dir>/member/db``.

    ``map_size`` bounds the file; the server keeps it well above the quota so
    the quota check, not MAP_FULL, is what stops writers.
    """

    def __init__(self, data_dir: Path, *, map_size: int) -> None:
        self.dir = data_dir / "member"
        self.path = self.dir / "db"
        self.map_size = map_size
        self.dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.dir.parent)
        self._open()

    def _open(self) -> None:
        try:
            self.env = lmdb.open(
                str(self.path), subdir=False, map_size=self.map_size, max_dbs=len(DBS) + 2,
                sync=True, metasync=True, readahead=False, meminit=False, lock=True,
            )
            self.dbs = {name: self.env.open_db(name) for name in DBS}
            self._size = self._file_size()
        except lmdb.Error as exc:
            raise BackendError(f"cannot open backend {self.path}: {exc}") from exc
        fsync_dir(self.dir)

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ reads

    def meta(self) -> dict[bytes, bytes]:
        with self.env.begin(db=self.dbs[b"meta"]) as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}

    def items(self, db: bytes) -> Iterator[tuple[bytes, bytes]]:
        """All (key, value) pairs of ``db`` in key order (one read snapshot)."""
        with self.env.begin(db=self.dbs[db]) as txn:
            for k, v in txn.cursor():
                yield bytes(k), bytes(v)

    # ------------------------------------------------------------------ writes

    def commit(self, ops: Iterable[Op]) -> None:
        """Apply ``ops`` in one transaction and flush it to disk before returning.

        Raises :class:`BackendError` for any failure, including a failed sync.
        """
        try:
            with self.env.begin(write=True) as txn:
                # Runs of puts to one database go through putmulti, which loops in C: a large
                # flush then holds the GIL (and the event loop) far less. Order is kept.
                for (db, is_put), run in groupby(ops, key=lambda op: (op[0], op[2] is not None)):
                    if is_put:
                        txn.cursor(db=self.dbs[db]).putmulti([(k, v) for _, k, v in run if v is not None])
                    else:
                        for _, k, _ in run:
                            txn.delete(k, db=self.dbs[db])
            self._size = self._file_size()
        except lmdb.Error as exc:
            raise BackendError(f"backend commit failed: {exc}") from exc

    def delete_compacted(self, rev: int, keep: set[tuple[int, int]], start: bytes, limit: int) -> bytes | None:
        """Delete up to ``limit`` records at or below ``rev`` that are not in ``keep``.

        Starts at backend key ``start``; returns where to resume, or None when done.
        One synced transaction per call, so a long compaction does not hold the writer.
        """
        bound = _U64.pack(rev + 1)
        try:
            with self.env.begin(write=True, db=self.dbs[b"key"]) as txn:
                cur = txn.cursor()
                if not cur.set_range(start):
                    return None
                n = 0
                while True:
                    k = bytes(cur.key())
                    if not k or k >= bound:  # an empty key: the cursor ran off the end
                        return None
                    if n >= limit:
                        return k
                    main, sub = _U64.unpack_from(k, 0)[0], _U64.unpack_from(k, 9)[0]
                    if (main, sub) not in keep:
                        if not cur.delete():
                            return None
                        n += 1
                    elif not cur.next():
                        return None
        except lmdb.Error as exc:
            raise BackendError(f"backend compaction failed: {exc}") from exc

    def defragment(self) -> None:
        """Rewrite the file compactly (LMDB's compacting copy), then swap it in."""
        tmp = self.path.with_name("db.defrag")
        tmp.unlink(missing_ok=True)
        try:
            self.env.copy(str(tmp), compact=True)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.env.close()
            os.replace(tmp, self.path)
            fsync_dir(self.dir)
        except (OSError, lmdb.Error) as exc:
            raise BackendError(f"defragment failed: {exc}") from exc
        self._open()

    # ------------------------------------------------------------------ sizes

    def size(self) -> int:
        """Bytes the database file occupies (etcd's dbSize), as of the last commit. Cheap: the
        quota check calls it for every write."""
        return self._size

    def _file_size(self) -> int:
        info = self.env.info()
        return int((info["last_pgno"] + 1) * self.env.stat()["psize"])

    def size_in_use(self) -> int:
        """Bytes of pages holding live data (etcd's dbSizeInUse)."""
        psize = int(self.env.stat()["psize"])
        pages = 2  # the two meta pages
        with self.env.begin() as txn:
            main = self.env.stat()
            pages += main["branch_pages"] + main["leaf_pages"] + main["overflow_pages"]
            for db in self.dbs.values():
                st = txn.stat(db)
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return pages * psize

