"""The lessor core with a fake monotonic clock, and the store's lease -> keys index.

Expiry order, the revoke rate limit, refresh on keep-alive, restart refresh (etcd's Promote,
pile-up smoothing included), the ID layout, the persisted record format, and revoke through a
store write transaction (one revision for all of a lease's keys).
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from coord._pb import rpc_pb2
from coord_server import errors, lessor, mvcc
from coord_server.lessor import (
    EXPIRED_RETRY,
    MAX_LEASE_TTL,
    IdGenerator,
    LeaseExpired,
    Lessor,
    apply_revoke,
    decode_lease,
    encode_lease,
    lease_key,
    lease_op,
    min_lease_ttl,
    restart_grace,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(min_ttl: int = 2, **kw: object) -> tuple[Lessor, FakeClock]:
    clock = FakeClock()
    return Lessor(clock=clock, min_ttl=min_ttl, **kw), clock  # type: ignore[arg-type]


def drain(ls: Lessor) -> list[int]:
    """What the shell does: take the expired leases and revoke them."""
    got = ls.take_expired()
    for lease_id in got:
        ls.revoke(lease_id)
    return got


# ---------------------------------------------------------------------- configuration and IDs


@pytest.mark.parametrize(("election_ms", "heartbeat_ms", "min_ttl", "grace"), [
    (1000, 100, 2, 1.0),  # etcd defaults: (3*10)//2 = 15 ticks = 1.5 s -> 2 s
    (5000, 100, 8, 5.0),  # 75 ticks = 7.5 s -> 8 s
    (1000, 300, 2, 0.9),  # 3 ticks (integer division, as etcd), 4 ticks * 300 ms = 1.2 s -> 2 s; grace 3 * 300 ms
    (500, 100, 1, 0.5),  # 7 ticks * 100 ms = 0.7 s -> 1 s
])
def test_min_ttl_and_grace_follow_etcd(election_ms: int, heartbeat_ms: int, min_ttl: int, grace: float) -> None:
    assert min_lease_ttl(election_ms, heartbeat_ms) == min_ttl
    assert restart_grace(election_ms, heartbeat_ms) == pytest.approx(grace)


def test_server_chosen_ids_have_etcds_layout() -> None:
    member = 0x8E9E05C52164694D
    unix_ms = 1_700_000_000_123
    ls = Lessor(clock=FakeClock(), ids=IdGenerator(member, unix_ms))
    first, second = ls.new_id(), ls.new_id()
    # bits 48-62: low 15 bits of the member ID (bit 63 cleared); then 40 bits of ms; then the counter.
    assert first >> 48 == member & 0x7FFF
    assert (first >> 8) & ((1 << 40) - 1) == unix_ms & ((1 << 40) - 1)
    assert first & 0xFF == 1
    assert 0 < first < 2**63
    assert second == first + 2, "one ID for the lease and one for the raft request, as etcd"
    # The reference's example: member 9e737febb6b99eee gives leases 1eeea21f8062baXX.
    gen = IdGenerator(0x9E737FEBB6B99EEE, 0xA21F8062BA)
    assert f"{Lessor(clock=FakeClock(), ids=gen).new_id():016x}"[:14] == "1eeea21f8062ba"


def test_server_chosen_ids_skip_ids_clients_took() -> None:
    ls, _ = make(ids=IdGenerator(1, 0))
    probe = Lessor(clock=FakeClock(), ids=IdGenerator(1, 0))
    taken = probe.new_id()
    ls.grant(taken, 10)
    assert ls.new_id() == taken + 2


def test_lease_record_is_etcds_leasepb() -> None:
    assert encode_lease(100, 10) == b"\x08\x64\x10\x0a"
    assert encode_lease(-5, 2) == b"\x08" + b"\xfb" + b"\xff" * 8 + b"\x01" + b"\x10\x02"
    for lease_id, ttl in [(1, 2), (-5, 2), (2**63 - 1, MAX_LEASE_TTL), (-(2**63), 9)]:
        assert decode_lease(encode_lease(lease_id, ttl)) == (lease_id, ttl)
    # remainingTTL (field 3) and unknown fields are skipped
    assert decode_lease(b"\x08\x07\x10\x03\x18\x01\x22\x02ab") == (7, 3)
    for bad in (b"\x08", b"\x08\x80", b"\x0f", b"\x22\x05ab"):
        with pytest.raises(ValueError):
            decode_lease(bad)
    assert lease_key(1) == b"\x00" * 7 + b"\x01"
    assert lease_key(-5) == b"\xff" * 7 + b"\xfb"
    lease = Lessor(clock=FakeClock()).grant(-5, 30)
    assert lease_op(lease) == (b"lease", lease_key(-5), encode_lease(-5, 30))


# ---------------------------------------------------------------------- grant, renew, lookups


def test_grant_raises_ttl_to_the_minimum_and_checks_in_etcds_order() -> None:
    ls, clock = make(min_ttl=2)
    assert ls.grant(1, 0).ttl == 2
    assert ls.grant(2, -7).ttl == 2
    assert ls.grant(3, 1).ttl == 2
    assert ls.grant(4, 3).ttl == 3
    assert ls.grant(-5, MAX_LEASE_TTL).ttl == MAX_LEASE_TTL
    with pytest.raises(errors.EtcdError) as err:
        ls.grant(6, MAX_LEASE_TTL + 1)
    assert err.value == errors.LEASE_TTL_TOO_LARGE
    with pytest.raises(errors.EtcdError) as err:
        ls.grant(1, MAX_LEASE_TTL + 1)  # too large wins over "exists"
    assert err.value == errors.LEASE_TTL_TOO_LARGE
    with pytest.raises(errors.EtcdError) as err:
        ls.grant(1, 10)
    assert err.value == errors.LEASE_EXIST
    with pytest.raises(errors.EtcdError) as err:
        ls.grant(0, 10)
    assert err.value == errors.LEASE_NOT_FOUND
    assert len(ls) == 5 and ls.mutations == 5
    lease = ls.get(4)
    assert lease is not None and ls.remaining(lease) == 3
    clock.advance(1.25)
    assert ls.remaining(lease) == pytest.approx(1.75)


def test_renew_restarts_the_ttl_and_answers_the_granted_ttl() -> None:
    ls, clock = make()
    ls.grant(1, 10)
    clock.advance(9)
    assert ls.renew(1) == 10
    clock.advance(9.999)
    assert not ls.is_expired(1) and drain(ls) == []
    clock.advance(0.001)
    assert ls.is_expired(1)
    with pytest.raises(LeaseExpired):
        ls.renew(1)  # too late: it is as good as revoked
    with pytest.raises(errors.EtcdError) as err:
        ls.renew(99)
    assert err.value == errors.LEASE_NOT_FOUND
    assert ls.mutations == 1, "renewals are not durable changes"


def test_revoke_forgets_the_lease() -> None:
    ls, clock = make()
    ls.grant(1, 5)
    ls.revoke(1)
    assert not ls.exists(1) and ls.get(1) is None and ls.mutations == 2
    with pytest.raises(errors.EtcdError):
        ls.revoke(1)
    clock.advance(10)
    assert drain(ls) == [] and ls.next_check() is None


def test_by_expiry_lists_soonest_first() -> None:
    ls, clock = make()
    ls.grant(1, 30)
    ls.grant(2, 10)
    ls.grant(3, 20)
    clock.advance(5)
    ls.renew(2)  # now expires at +15
    assert [lease.id for lease in ls.by_expiry()] == [2, 3, 1]


# ---------------------------------------------------------------------- expiry


def test_expiry_order_and_never_before_the_deadline() -> None:
    ls, clock = make()
    for lease_id, ttl in [(1, 5), (2, 3), (3, 4), (4, 3), (5, 100)]:
        ls.grant(lease_id, ttl)
    assert ls.next_check() == clock.now + 3
    clock.advance(2.999)
    assert drain(ls) == []
    clock.advance(0.001)
    assert sorted(drain(ls)) == [2, 4]
    clock.advance(1.5)
    assert drain(ls) == [3]
    clock.advance(10)
    assert drain(ls) == [1]
    assert ls.next_check() == clock.now + 100 - 14.5


def test_taken_leases_are_offered_again_only_after_the_retry_interval() -> None:
    ls, clock = make()
    ls.grant(1, 2)
    clock.advance(2)
    assert ls.take_expired() == [1]
    clock.advance(EXPIRED_RETRY - 0.01)
    assert ls.take_expired() == []  # its revoke is (presumably) on the way
    assert ls.next_check() == pytest.approx(clock.now + 0.01)
    clock.advance(0.01)
    assert ls.take_expired() == [1]  # the revoke was lost: offered again
    ls.revoke(1)
    clock.advance(EXPIRED_RETRY)
    assert ls.take_expired() == [] and ls.next_check() is None


def test_renewal_moves_the_deadline_and_the_queue_stays_bounded() -> None:
    ls, clock = make()
    for i in range(1, 101):
        ls.grant(i, 2)
    for _ in range(2000):  # a keep-alive storm: every lease renewed 2000 times
        clock.advance(0.01)
        for i in range(1, 101):
            ls.renew(i)
        assert drain(ls) == []
    assert len(ls._queue) <= 2 * 100 + 1024
    clock.advance(1.99)
    assert drain(ls) == []
    clock.advance(0.01)
    assert sorted(drain(ls)) == list(range(1, 101))


def test_next_check_skips_renewed_leases_instead_of_waking_for_nothing() -> None:
    ls, clock = make()
    ls.grant(1, 10)
    clock.advance(5)
    ls.renew(1)  # deadline +10 from now; its queue entry still says the old one
    assert ls.next_check() == clock.now + 10


def test_earlier_deadlines_wake_the_shell() -> None:
    ls, clock = make()
    wakes: list[float] = []
    ls.on_earlier_deadline = lambda: wakes.append(clock.now)
    ls.grant(1, 100)
    assert ls.next_check() == clock.now + 100  # the shell sleeps until then
    ls.grant(2, 200)
    assert wakes == [], "a later deadline needs no wake-up"
    ls.grant(3, 10)
    assert wakes == [clock.now], "an earlier one does"
    assert ls.next_check() == clock.now + 10
    ls.grant(4, 50)
    assert len(wakes) == 1


def test_rate_limit_spreads_a_pile_up_of_ten_thousand_expiries() -> None:
    ls, clock = make()
    n = 10_000
    for i in range(1, n + 1):
        ls.grant(i, 5)
    clock.advance(5)
    first = drain(ls)
    assert len(first) == lessor.REVOKE_BURST, "at most rate/2 at once, like etcd's 500 per 500 ms tick"
    # Nothing more until a batch of revokes is allowed again (no wake-up per single token).
    assert drain(ls) == []
    nxt = ls.next_check()
    assert nxt == pytest.approx(clock.now + lessor.EXPIRY_BATCH / lessor.REVOKE_RATE)
    taken = set(first)
    start = clock.now
    events: list[tuple[float, int]] = []
    while len(taken) < n:
        at = ls.next_check()
        assert at is not None
        clock.now = max(clock.now, at)
        got = drain(ls)
        assert got, "next_check() promised something"
        events.append((clock.now, len(got)))
        taken.update(got)
    assert len(taken) == n
    assert len(events) <= (n - lessor.REVOKE_BURST) // lessor.EXPIRY_BATCH + 1, "revokes come in batches"
    # In any one-second window, no more than the rate (plus the batch the bucket may hold at its start).
    for t, _ in events:
        in_window = sum(k for u, k in events if t <= u < t + 1)
        assert in_window <= lessor.REVOKE_RATE + lessor.EXPIRY_BATCH
    assert clock.now - start == pytest.approx((n - lessor.REVOKE_BURST) / lessor.REVOKE_RATE, abs=0.06)


def test_the_lessor_reads_no_clock_but_the_injected_one(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden() -> float:
        raise AssertionError("the lessor read a real clock")

    ls, clock = make(ids=IdGenerator(7, 1234))
    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns"):
        monkeypatch.setattr(time, name, forbidden)
    ls.grant(ls.new_id(), 5)
    ls.grant(2, 3)
    ls.renew(2)
    ls.next_check()
    clock.advance(3)
    assert drain(ls) == [2]
    ls.promote(1.0)
    assert drain(ls) == []


# ---------------------------------------------------------------------- restart (Promote)


def test_restart_gives_every_lease_its_full_ttl_plus_the_grace() -> None:
    ls, clock = make()
    ls.restore(1, 10)
    ls.restore(-5, 1)  # raised to the minimum, as etcd's recovery does
    ls.restore(3, 300)
    assert ls.next_check() is None, "no deadline before promotion (etcd: forever)"
    ls.promote(1.0)
    assert {lease.id: ls.remaining(lease) for lease in ls} == {1: 11.0, -5: 3.0, 3: 301.0}
    assert ls.mutations == 0, "restoring is not a change"
    clock.advance(2.999)
    assert drain(ls) == []
    clock.advance(0.001)
    assert drain(ls) == [-5]
    assert ls.renew(1) == 10  # a keep-alive after the restart: the normal TTL from now
    assert ls.get(1).expiry == clock.now + 10  # type: ignore[union-attr]


def test_renew_to_an_earlier_deadline_after_restart_is_honoured() -> None:
    ls, clock = make()
    wakes: list[float] = []
    ls.on_earlier_deadline = lambda: wakes.append(clock.now)
    ls.restore(1, 10)
    ls.promote(5.0)  # expires at +15
    assert ls.next_check() == clock.now + 15
    wakes.clear()
    ls.renew(1)  # now at +10: earlier than the queued deadline
    assert wakes == [clock.now]
    assert ls.next_check() == clock.now + 10
    clock.advance(10)
    assert drain(ls) == [1]


def test_restart_smooths_a_pile_up_like_etcds_promote() -> None:
    ls, _ = make()
    n = 3000
    for i in range(1, n + 1):
        ls.restore(i, 60)
    ls.promote(1.0)
    remaining = sorted(ls.remaining(lease) for lease in ls)
    base = remaining[0]
    assert base == 61.0
    # Three quarters of the revoke rate per second, at most: the rest is pushed into later seconds.
    per_second = Counter(int(r - base + 1e-9) for r in remaining)
    target = (3 * lessor.REVOKE_RATE) // 4
    assert per_second[0] == target
    assert max(per_second.values()) <= target + 1
    assert sum(per_second.values()) == n
    assert remaining[-1] - base == pytest.approx(n / target - 1e-9, abs=0.01)
    # Fewer leases than the revoke rate: no smoothing at all.
    small, _ = make()
    for i in range(1, 500):
        small.restore(i, 60)
    small.promote(1.0)
    assert {small.remaining(lease) for lease in small} == {61.0}


# ---------------------------------------------------------------------- the store's lease index and revoke


KNOWN = {5, 7, 9}


def store() -> mvcc.Store:
    return mvcc.Store(lease_exists=lambda lease: lease in KNOWN)


def put(s: mvcc.Store, key: bytes, lease: int = 0, **kw: object) -> rpc_pb2.PutResponse:
    return s.put(rpc_pb2.PutRequest(key=key, value=b"v", lease=lease, **kw))  # type: ignore[arg-type]


def index(s: mvcc.Store) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for key, lease in s.keys_with_lease():
        out.setdefault(lease, []).append(key)
    return {lease: sorted(keys) for lease, keys in out.items()}


def test_index_follows_attach_detach_move_ignore_lease_and_delete() -> None:
    s = store()
    put(s, b"a", 5)
    put(s, b"b", 5)
    put(s, b"c", 7)
    assert index(s) == {5: [b"a", b"b"], 7: [b"c"]}
    put(s, b"a")  # a plain put detaches
    put(s, b"b", 7)  # another lease moves
    assert index(s) == {7: [b"b", b"c"]}
    put(s, b"b", ignore_lease=True)  # ignore_lease keeps
    assert s.keys_of_lease(7) == [b"b", b"c"]
    s.delete_range(rpc_pb2.DeleteRangeRequest(key=b"c"))  # deleting detaches
    assert index(s) == {7: [b"b"]}
    txn = rpc_pb2.TxnRequest(success=[
        rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"x", lease=9)),
        rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"b", lease=9)),
    ])
    s.txn(txn)  # txn puts attach and move too
    assert index(s) == {9: [b"b", b"x"]}
    assert s.keys_of_lease(7) == [] and s.keys_of_lease(12345) == []


def test_index_is_restored_by_rollback_and_by_restart() -> None:
    s = store()
    put(s, b"a", 5)
    put(s, b"b", 5)
    put(s, b"z", 7)
    before = index(s)
    # Deletes [a, \x00) (detaching a, b and z), then a put with ignore_value on a key it just deleted
    # fails: the whole txn is undone, and the index with it.
    txn = rpc_pb2.TxnRequest(success=[
        rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b"a", range_end=b"\x00")),
        rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"b", ignore_value=True, lease=9)),
    ])
    with pytest.raises(errors.EtcdError) as err:
        s.txn(txn)
    assert err.value == errors.KEY_NOT_FOUND
    assert index(s) == before
    s.compact(s.rev)
    restored = mvcc.Store.restore(s.all_records(), rev=s.rev, compact_rev=s.compact_rev, lease_exists=s.lease_exists)
    assert index(restored) == before


def test_revoke_deletes_all_keys_in_one_revision_in_key_order() -> None:
    ls, _ = make()
    s = mvcc.Store(lease_exists=ls.exists)
    ls.grant(5, 10)
    ls.grant(6, 10)
    for key in (b"k3", b"k1", b"k2"):
        put(s, key, 5)
    put(s, b"other", 6)
    rev = s.rev
    s.take_pending()
    lease, keys, op = apply_revoke(s, ls, 5)
    assert lease.id == 5 and keys == [b"k1", b"k2", b"k3"]
    assert op == (b"lease", lease_key(5), None)
    assert s.rev == rev + 1, "one revision for every key of the lease"
    recs = s.take_pending()
    assert [(r.main, r.sub, r.key, r.tombstone) for r in recs] == [
        (rev + 1, 0, b"k1", True), (rev + 1, 1, b"k2", True), (rev + 1, 2, b"k3", True)]
    assert s.get(b"other") is not None and index(s) == {6: [b"other"]}
    assert not ls.exists(5)
    # A lease with no keys: revoked without a revision.
    ls.grant(8, 10)
    apply_revoke(s, ls, 8)
    assert s.rev == rev + 1 and s.take_pending() == []
    with pytest.raises(errors.EtcdError) as err:
        apply_revoke(s, ls, 5)
    assert err.value == errors.LEASE_NOT_FOUND
    with pytest.raises(errors.EtcdError):
        put(s, b"k1", 5)  # the lease is gone: attaching to it fails
