"""The lessor: leases, their deadlines on a monotonic clock, and etcd's rate limit on expiries.

Sans-io: no sockets, no event loop, no sleeping. The clock is injected (``clock()`` returns
monotonic seconds) and is the only time source deadlines use, so a wall-clock jump can never
make a lease expire early. The wall clock appears once, as the start-up millisecond stamp
etcd folds into server-chosen lease IDs (:class:`IdGenerator`).

Which keys are attached to a lease is not kept here: the MVCC store maintains that index as
keys are written (:meth:`Store.keys_of_lease`), so a revoke deletes them without a scan and the
index can never disagree with the keys themselves. :func:`apply_revoke` ties the two together
inside one write transaction, exactly one revision for all of a lease's keys.

The I/O shell (``services/lease.py``) drives expiry: it asks :meth:`Lessor.next_check` when to
look again, takes at most what the rate limit allows with :meth:`Lessor.take_expired`, and
revokes those leases through the normal write path, re-checking at apply time that each one is
still expired.

Semantics follow etcd 3.4's ``lease/lessor.go`` (reference/etcd-api.md §2.8): the TTL is raised
to the minimum TTL, a renew answers the granted TTL, a lease that has expired cannot be renewed
(it is as good as revoked), and after a restart every lease gets its full TTL plus an
election-timeout grace (``Promote``), spread out when so many would expire at once that the
revoke rate could not keep up.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from coord._pb import rpc_pb2

from . import errors
from .mvcc import Store

MAX_LEASE_TTL = 9_000_000_000  # seconds (etcd's MaxLeaseTTL)
REVOKE_RATE = 1000  # expired leases revoked per second at most (etcd's leaseRevokeRate)
REVOKE_BURST = REVOKE_RATE // 2  # etcd looks every 500 ms and takes at most rate/2 leases
EXPIRY_BATCH = 50  # when the rate limit is exhausted, wait until this many revokes are allowed again
EXPIRED_RETRY = 3.0  # seconds before an expired lease handed out for revoking is offered again
LEASE_DB = b"lease"

Clock = Callable[[], float]
BackendOp = tuple[bytes, bytes, bytes | None]


class LeaseExpired(Exception):
    """Renew of a lease whose deadline has passed: it is waiting to be revoked and cannot be renewed."""


# ---------------------------------------------------------------------- configuration


def election_ticks(election_timeout_ms: int, heartbeat_ms: int) -> int:
    return election_timeout_ms // max(heartbeat_ms, 1)


def min_lease_ttl(election_timeout_ms: int, heartbeat_ms: int) -> int:
    """etcd's minimum lease TTL: ceil((3 * election ticks // 2) heartbeats), 2 s with the defaults."""
    ms = (3 * election_ticks(election_timeout_ms, heartbeat_ms)) // 2 * max(heartbeat_ms, 1)
    return math.ceil(ms / 1000)


def restart_grace(election_timeout_ms: int, heartbeat_ms: int) -> float:
    """The extension every lease gets on promotion (etcd's electionTimeout(): ticks * heartbeat)."""
    return election_ticks(election_timeout_ms, heartbeat_ms) * max(heartbeat_ms, 1) / 1000


class IdGenerator:
    """etcd's request/lease ID generator (``pkg/idutil``).

    Layout: bits 48-63 the low 16 bits of the member ID, then 40 bits of the Unix time in
    milliseconds at start-up, then an 8-bit counter that may carry into the time field.
    Lease IDs clear bit 63, so they are positive.
    """

    __slots__ = ("_prefix", "_suffix")

    _SUFFIX_MASK = (1 << 48) - 1

    def __init__(self, member_id: int, unix_ms: int) -> None:
        self._prefix = (member_id & 0xFFFF) << 48
        self._suffix = (unix_ms & ((1 << 40) - 1)) << 8

    def next(self) -> int:
        self._suffix += 1
        return self._prefix | (self._suffix & self._SUFFIX_MASK)


# ---------------------------------------------------------------------- persistence


def lease_key(lease_id: int) -> bytes:
    """etcd's lease bucket key: the ID as 8 big-endian bytes (two's complement)."""
    return (lease_id & (2**64 - 1)).to_bytes(8, "big")


def _varint(v: int) -> bytes:
    v &= 2**64 - 1
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def encode_lease(lease_id: int, ttl: int) -> bytes:
    """A marshalled ``leasepb.Lease{ID, TTL}`` (remaining_TTL is never set: no checkpoints)."""
    out = b""
    if lease_id:
        out += b"\x08" + _varint(lease_id)
    if ttl:
        out += b"\x10" + _varint(ttl)
    return out


def decode_lease(raw: bytes) -> tuple[int, int]:
    """(ID, TTL) of a marshalled ``leasepb.Lease``; unknown fields are skipped. Raises ValueError."""
    fields = {1: 0, 2: 0}
    i = 0
    while i < len(raw):
        tag, i = _read_varint(raw, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _read_varint(raw, i)
            if number in fields:
                fields[number] = value - (1 << 64) if value >= 1 << 63 else value
        elif wire == 2:
            size, i = _read_varint(raw, i)
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"bad wire type {wire} in lease record")
    if i != len(raw):
        raise ValueError("truncated lease record")
    return fields[1], fields[2]


def _read_varint(raw: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(raw) or shift > 63:
            raise ValueError("truncated varint in lease record")
        b = raw[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


# ---------------------------------------------------------------------- the lessor


@dataclass(slots=True, eq=False)
class Lease:
    """One lease. ``ttl`` is the granted TTL (after raising to the minimum); ``expiry`` a monotonic deadline."""

    id: int
    ttl: int
    expiry: float = math.inf
    check_at: float = math.inf  # when the expiry queue next looks at this lease: expiry, or a retry time
    queued_at: float = math.inf  # the time of this lease's live entry in the queue


class Lessor:
    """Every lease of one member and the queue of their deadlines.

    ``min_ttl``: granted TTLs below it are raised to it. ``on_earlier_deadline`` is called when a
    change makes the next deadline earlier than before (the shell's expiry loop sleeps until the
    next deadline and must be woken).

    ``mutations`` counts grants and revokes; the shell compares it with what is durable.
    """

    def __init__(self, *, clock: Clock, min_ttl: int = 2, ids: IdGenerator | None = None,
                 revoke_rate: int = REVOKE_RATE, revoke_burst: int = REVOKE_BURST,
                 expiry_batch: int = EXPIRY_BATCH, expired_retry: float = EXPIRED_RETRY) -> None:
        self.clock = clock
        self.ids = ids if ids is not None else IdGenerator(0, 0)
        self.min_ttl = min_ttl
        self.revoke_rate = revoke_rate
        self.revoke_burst = revoke_burst
        self.expiry_batch = max(1, min(expiry_batch, revoke_burst))
        self.expired_retry = expired_retry
        self.mutations = 0
        self.on_earlier_deadline: Callable[[], None] | None = None
        self._leases: dict[int, Lease] = {}
        self._queue: list[tuple[float, int]] = []  # (time, lease id); stale entries are skipped lazily
        self._tokens = float(revoke_burst)
        self._tokens_at = clock()
        self._armed_at = -math.inf  # what next_check() last answered: earlier deadlines must wake the shell

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[Lease]:
        return iter(self._leases.values())

    def exists(self, lease_id: int) -> bool:
        """Whether the lease exists (an expired lease exists until it is revoked, as in etcd)."""
        return lease_id in self._leases

    def get(self, lease_id: int) -> Lease | None:
        return self._leases.get(lease_id)

    def remaining(self, lease: Lease) -> float:
        """Seconds until ``lease`` expires (negative once expired)."""
        return lease.expiry - self.clock()

    def is_expired(self, lease_id: int) -> bool:
        lease = self._leases.get(lease_id)
        return lease is not None and lease.expiry <= self.clock()

    def by_expiry(self) -> list[Lease]:
        """All leases, soonest expiry first (etcd's ``Leases()`` order)."""
        return sorted(self._leases.values(), key=lambda lease: lease.expiry)

    # ------------------------------------------------------------------ changes

    def new_id(self) -> int:
        """A server-chosen lease ID: positive and not in use.

        etcd takes one generator ID for the lease and one for the raft request that carries it,
        so consecutive grants differ by 2; we take both too. (etcd would answer "lease already
        exists" if the ID were taken by a client-chosen lease; we skip to the next one.)
        """
        while True:
            lease_id = self.ids.next() & (2**63 - 1)
            self.ids.next()
            if lease_id and lease_id not in self._leases:
                return lease_id

    def grant(self, lease_id: int, ttl: int) -> Lease:
        """Create a lease expiring ``ttl`` (raised to the minimum) seconds from now.

        Raises LEASE_NOT_FOUND for ID 0, LEASE_TTL_TOO_LARGE, then LEASE_EXIST (etcd's order).
        """
        if lease_id == 0:
            raise errors.LEASE_NOT_FOUND
        if ttl > MAX_LEASE_TTL:
            raise errors.LEASE_TTL_TOO_LARGE
        if lease_id in self._leases:
            raise errors.LEASE_EXIST
        lease = Lease(lease_id, max(ttl, self.min_ttl))
        self._leases[lease_id] = lease
        self._set_deadline(lease, self.clock() + lease.ttl)
        self.mutations += 1
        return lease

    def revoke(self, lease_id: int) -> Lease:
        """Forget the lease (its keys are the caller's business: see :func:`apply_revoke`).

        Raises LEASE_NOT_FOUND.
        """
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            raise errors.LEASE_NOT_FOUND
        self.mutations += 1
        return lease

    def renew(self, lease_id: int) -> int:
        """Restart the lease's TTL from now; returns the granted TTL.

        Raises LEASE_NOT_FOUND for an unknown lease and :class:`LeaseExpired` for one whose
        deadline has passed (it will be revoked; etcd answers only once the revoke is done).
        """
        lease = self._leases.get(lease_id)
        if lease is None:
            raise errors.LEASE_NOT_FOUND
        now = self.clock()
        if lease.expiry <= now:
            raise LeaseExpired(lease_id)
        self._set_deadline(lease, now + lease.ttl)
        return lease.ttl

    def restore(self, lease_id: int, ttl: int) -> Lease:
        """Load a persisted lease. It has no deadline until :meth:`promote` (etcd: "forever")."""
        lease = Lease(lease_id, max(ttl, self.min_ttl))
        self._leases[lease_id] = lease
        return lease

    def promote(self, extend: float) -> None:
        """Give every lease its full TTL plus ``extend`` seconds from now (etcd's ``Promote``).

        With ``revoke_rate`` leases or more, leases that would expire within the same second
        beyond three quarters of the revoke rate are pushed back, so that a restart does not
        produce an expiry pile-up the rate limit would turn into late expiries.
        """
        now = self.clock()
        for lease in self._leases.values():
            lease.expiry = now + extend + lease.ttl
        if len(self._leases) >= self.revoke_rate:
            leases = self.by_expiry()
            base = leases[0].expiry - now
            window_end = base + 1.0
            expires = 0
            target = (3 * self.revoke_rate) // 4
            for lease in leases:
                remaining = lease.expiry - now
                if remaining > window_end:
                    base = remaining
                    window_end = base + 1.0
                    expires = 1
                    continue
                expires += 1
                if expires <= target:
                    continue
                # Leases later than the window's start need less extra delay to fall into the next slot.
                delay = expires / target - (remaining - base)
                window_end = base + delay
                lease.expiry = now + delay + extend + lease.ttl
        self._queue = []
        for lease in self._leases.values():
            lease.check_at = lease.queued_at = lease.expiry
            self._queue.append((lease.expiry, lease.id))
        heapq.heapify(self._queue)
        self._armed_at = -math.inf
        if self.on_earlier_deadline is not None:
            self.on_earlier_deadline()

    # ------------------------------------------------------------------ expiry

    def take_expired(self) -> list[int]:
        """Leases past their deadline, soonest first, as many as the rate limit allows now.

        Each one is handed out once; if it still exists ``expired_retry`` seconds later (its
        revoke was lost), it is handed out again.
        """
        now = self.clock()
        self._refill(now)
        limit = int(self._tokens + 1e-9)  # a refill computed for a whole batch may fall short by a rounding error
        out: list[int] = []
        queue = self._queue
        while queue and len(out) < limit:
            at, lease_id = queue[0]
            lease = self._leases.get(lease_id)
            if lease is None or at != lease.queued_at:
                heapq.heappop(queue)  # stale: revoked, or superseded by an earlier entry
                continue
            if at > now:
                break
            heapq.heappop(queue)
            if lease.check_at > at:  # renewed since it was queued: queue it at its new time
                self._push(lease, lease.check_at)
                continue
            if lease.expiry <= now:
                out.append(lease_id)
                lease.check_at = now + self.expired_retry
            else:  # not expired yet (cannot normally happen): look again at its expiry
                lease.check_at = lease.expiry
            self._push(lease, lease.check_at)
        self._tokens -= len(out)
        return out

    def next_check(self) -> float | None:
        """When :meth:`take_expired` may next return something (a clock value), or None if never."""
        queue = self._queue
        while queue:
            at, lease_id = queue[0]
            lease = self._leases.get(lease_id)
            if lease is None or at != lease.queued_at:
                heapq.heappop(queue)
                continue
            if lease.check_at > at:  # renewed since it was queued: move it now rather than wake for nothing
                heapq.heappop(queue)
                self._push(lease, lease.check_at)
                continue
            now = self.clock()
            self._refill(now)
            if self._tokens >= 1:
                self._armed_at = at
            else:
                # Rate limit exhausted: come back when a batch of revokes is allowed, not one by one.
                need = self.expiry_batch - self._tokens
                self._armed_at = max(at, now + need / self.revoke_rate)
            return self._armed_at
        self._armed_at = math.inf
        return None

    # ------------------------------------------------------------------ internals

    def _refill(self, now: float) -> None:
        elapsed = now - self._tokens_at
        if elapsed > 0:
            self._tokens = min(float(self.revoke_burst), self._tokens + elapsed * self.revoke_rate)
            self._tokens_at = now

    def _set_deadline(self, lease: Lease, expiry: float) -> None:
        lease.expiry = lease.check_at = expiry
        if expiry < lease.queued_at:
            # Only an earlier deadline needs a new queue entry; a later one is picked up when the
            # old entry comes due (renewals stay O(1) and the queue does not grow with them).
            self._push(lease, expiry)
            if expiry < self._armed_at:
                self._armed_at = expiry
                if self.on_earlier_deadline is not None:
                    self.on_earlier_deadline()

    def _push(self, lease: Lease, at: float) -> None:
        lease.queued_at = at
        heapq.heappush(self._queue, (at, lease.id))
        if len(self._queue) > 2 * len(self._leases) + 1024:
            self._rebuild_queue()

    def _rebuild_queue(self) -> None:
        self._queue = [(lease.queued_at, lease.id) for lease in self._leases.values()
                       if lease.queued_at != math.inf]
        heapq.heapify(self._queue)


# ---------------------------------------------------------------------- write-path operations


def lease_op(lease: Lease) -> BackendOp:
    """The backend op that persists ``lease`` (etcd's lease bucket record)."""
    return (LEASE_DB, lease_key(lease.id), encode_lease(lease.id, lease.ttl))


def apply_revoke(store: Store, lessor: Lessor, lease_id: int) -> tuple[Lease, list[bytes], BackendOp]:
    """Revoke a lease: delete every attached key in ONE write transaction (one revision, DELETE
    events, keys in sorted order as etcd deletes them), then forget the lease.

    Returns (lease, deleted keys, backend op removing the lease record). A lease without keys
    changes no revision. Raises LEASE_NOT_FOUND. Runs inside the write path.
    """
    if not lessor.exists(lease_id):
        raise errors.LEASE_NOT_FOUND
    keys = store.keys_of_lease(lease_id)
    if keys:
        with store.write() as txn:
            for key in keys:
                txn.delete_range(rpc_pb2.DeleteRangeRequest(key=key))
    lease = lessor.revoke(lease_id)
    return lease, keys, (LEASE_DB, lease_key(lease_id), None)
