"""Typed results: immutable values built from the wire messages (no I/O here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

Key = str | bytes
"""Keys and values are bytes on the wire; ``str`` is encoded as UTF-8."""


class HasLeaseId(Protocol):
    """Anything with a ``lease_id`` (a :class:`coord.Session`) can be passed where a lease is expected."""

    @property
    def lease_id(self) -> int: ...


LeaseLike = int | HasLeaseId


def lease_id_of(lease: LeaseLike) -> int:
    """The lease ID of an int or of an object with ``lease_id`` (a Session)."""
    if isinstance(lease, int):
        return lease
    return int(lease.lease_id)


def to_bytes(value: Key) -> bytes:
    """``str`` → UTF-8 bytes; bytes pass through. Raises TypeError for anything else."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"keys and values are str or bytes, not {type(value).__name__}")


def show_key(key: bytes) -> str:
    """A key for messages: quoted text when it is UTF-8 (as it was most likely given), else the bytes repr."""
    try:
        return repr(key.decode())
    except UnicodeDecodeError:
        return repr(key)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes ``[prefix, end)`` cover every key starting with ``prefix`` (etcd's rule:
    drop trailing 0xff bytes, increment the last byte; all 0xff or empty means "to the end": ``\\x00``)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\x00"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def range_of(key: Key, *, prefix: bool = False, range_end: Key | None = None) -> tuple[bytes, bytes]:
    """(key, range_end) on the wire for a single key, a prefix, or an explicit half-open range.

    An empty key with ``prefix=True`` means every key (etcd's ``\\x00``/``\\x00`` form). Raises ValueError
    when both ``prefix`` and ``range_end`` are given.
    """
    k = to_bytes(key)
    if prefix and range_end is not None:
        raise ValueError("give prefix=True or range_end, not both")
    if prefix:
        if not k:
            return b"\x00", b"\x00"
        return k, prefix_end(k)
    return k, (b"" if range_end is None else to_bytes(range_end))


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One version of a key. ``create_revision`` is the revision that created this incarnation of the
    key (a lock's fencing token); ``mod_revision`` the last write; ``version`` counts puts since creation;
    ``lease`` is the attached lease ID (0 = none)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: Any) -> KeyValue:
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


class EventType(enum.Enum):
    PUT = 0
    DELETE = 1


@dataclass(frozen=True, slots=True)
class Event:
    """A change seen by a watch. For a DELETE, ``kv`` holds only the key and ``mod_revision`` (the
    deletion's revision); ``prev_kv`` is set when the watch asked for it and history still had it."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision

    @property
    def key(self) -> bytes:
        return self.kv.key

    @classmethod
    def from_pb(cls, ev: Any) -> Event:
        prev = KeyValue.from_pb(ev.prev_kv) if ev.HasField("prev_kv") else None
        return cls(EventType(ev.type), KeyValue.from_pb(ev.kv), prev)


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Every event of one revision that matched the watch, in the order the transaction made them."""

    revision: int
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class RangeResult:
    """``kvs`` found (after limit), ``count`` of keys in the range (before limit), ``more`` if the limit cut
    some off, ``revision`` = the store revision the read saw."""

    kvs: tuple[KeyValue, ...]
    count: int
    more: bool
    revision: int

    @classmethod
    def from_pb(cls, resp: Any) -> RangeResult:
        return cls(tuple(KeyValue.from_pb(kv) for kv in resp.kvs), resp.count, resp.more, resp.header.revision)


@dataclass(frozen=True, slots=True)
class PutResult:
    """``revision`` = the revision of this put; ``prev_kv`` when asked for and the key existed."""

    revision: int
    prev_kv: KeyValue | None

    @classmethod
    def from_pb(cls, resp: Any) -> PutResult:
        prev = KeyValue.from_pb(resp.prev_kv) if resp.HasField("prev_kv") else None
        return cls(resp.header.revision, prev)


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """``deleted`` = number of keys removed; ``prev_kvs`` when asked for; ``revision`` after the delete."""

    deleted: int
    prev_kvs: tuple[KeyValue, ...]
    revision: int

    @classmethod
    def from_pb(cls, resp: Any) -> DeleteResult:
        return cls(resp.deleted, tuple(KeyValue.from_pb(kv) for kv in resp.prev_kvs), resp.header.revision)


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """A granted lease: its ``id`` and the ``ttl`` the server chose (it may raise a small TTL)."""

    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """``ttl`` = whole seconds left (-1: the lease does not exist), ``granted_ttl``, attached ``keys``."""

    id: int
    ttl: int
    granted_ttl: int
    keys: tuple[bytes, ...]


class SortOrder(enum.Enum):
    NONE = 0
    ASCEND = 1
    DESCEND = 2


class SortTarget(enum.Enum):
    KEY = 0
    VERSION = 1
    CREATE = 2
    MOD = 3
    VALUE = 4


class WatchFilter(enum.Enum):
    """Server-side watch filters: ``NO_PUT`` drops PUT events, ``NO_DELETE`` drops DELETE events."""

    NO_PUT = 0
    NO_DELETE = 1
