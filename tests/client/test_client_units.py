"""Sans-io parts of the client: the lease clock, the txn DSL, key ranges, error mapping, endpoints."""

from __future__ import annotations

import pytest

from coord import Compare, Delete, Get, Put, SessionState, SortOrder, SortTarget, Txn, prefix_end
from coord import _errors as errors
from coord._endpoints import EndpointRotation
from coord._lease_clock import LeaseClock
from coord._transport import map_error, parse_endpoint
from coord._txn import txn_request
from coord._types import range_of, show_key


class TestLeaseClock:
    def test_deadline_counts_from_send_time_not_reply_time(self) -> None:
        c = LeaseClock(granted_at=100.0, ttl=10)
        assert c.deadline == 110.0
        c.sent(103.0)
        # the reply arrives late (at 109.5): the server reset the lease no earlier than 103
        assert c.replied(10, now=109.5) is SessionState.HELD
        assert c.deadline == 113.0
        assert c.state(112.99) is SessionState.HELD
        assert c.state(113.0) is SessionState.LOST

    def test_suspended_when_stream_breaks_then_held_again(self) -> None:
        c = LeaseClock(0.0, 9)
        c.sent(3.0)
        c.stream_broken()
        assert c.state(4.0) is SessionState.SUSPENDED
        c.sent(5.0)
        assert c.replied(9, now=5.1) is SessionState.HELD
        assert c.deadline == 14.0

    def test_overdue_reply_is_suspended(self) -> None:
        c = LeaseClock(0.0, 9)  # interval 3, patience 1.5
        c.sent(3.0)
        assert c.state(4.4) is SessionState.HELD
        assert not c.overdue(4.4)
        assert c.overdue(4.6)
        assert c.state(4.6) is SessionState.SUSPENDED
        assert c.next_check() == 4.5  # the loop wakes when the reply becomes overdue, before the next send (6.0)
        assert c.state(9.0) is SessionState.LOST

    def test_next_check_is_the_send_time_when_nothing_is_pending(self) -> None:
        c = LeaseClock(0.0, 9)
        c.sent(3.0)
        c.replied(9, now=3.1)
        assert c.next_check() == 6.0

    def test_ttl_zero_reply_is_lost_and_terminal(self) -> None:
        c = LeaseClock(0.0, 9)
        c.sent(1.0)
        assert c.replied(0, now=1.1) is SessionState.LOST
        c.sent(2.0)
        assert c.replied(9, now=2.1) is SessionState.LOST  # terminal
        assert "TTL 0" in c.lost_reason
        assert c.remaining(2.2) == 0.0

    def test_replies_match_requests_in_order(self) -> None:
        c = LeaseClock(0.0, 6)
        c.sent(1.0)
        c.sent(2.0)
        c.replied(6, now=2.5)  # answers the request sent at 1.0
        assert c.deadline == 7.0
        c.replied(6, now=2.6)
        assert c.deadline == 8.0

    def test_deadline_never_moves_back(self) -> None:
        c = LeaseClock(10.0, 6)
        c.sent(11.0)
        c.replied(2, now=11.1)  # a smaller TTL after a leader change must not shorten the belief... nor extend it
        assert c.deadline == 16.0

    def test_invalid_ttl(self) -> None:
        with pytest.raises(ValueError):
            LeaseClock(0.0, 0)


class TestEndpointRotation:
    @staticmethod
    def rotation(n: int) -> EndpointRotation:
        return EndpointRotation(n, jitter=lambda: 0.999)  # backoff = 0.05 * 2**(failures-1) * ~1

    def test_stays_on_a_healthy_endpoint(self) -> None:
        r = self.rotation(3)
        assert r.choose(0.0) == (0, 0.0)
        r.ok(0)
        assert r.choose(1.0) == (0, 0.0) and r.healthy()

    def test_failure_moves_on_and_backs_off_doubling(self) -> None:
        r = self.rotation(1)
        r.failed(0, now=10.0)
        index, wait = r.choose(10.0)
        assert index == 0 and 0.049 < wait <= 0.05
        r.failed(0, now=10.05)
        assert 0.099 < r.choose(10.05)[1] <= 0.1
        for _ in range(20):
            r.failed(0, now=20.0)
        assert r.choose(20.0)[1] <= 2.0  # capped
        r.ok(0)
        assert r.choose(20.0) == (0, 0.0)

    def test_prefers_the_member_that_failed_longest_ago(self) -> None:
        # a killed member (0, still refusing), then member 1 went silent during an election, then member 2 froze:
        # back to 1 (failed earlier, may have recovered), not to 2 (just went silent)
        r = self.rotation(3)
        for t in (1.0, 1.5, 2.5, 4.0):
            r.failed(0, now=t)
        r.current = 1
        r.failed(1, now=2.0)
        r.failed(1, now=2.1)  # reported twice (keep-alive and watch probe): counts do not decide
        assert r.current == 2
        r.ok(2)
        r.failed(2, now=6.0)
        assert r.choose(6.2) == (1, 0.0)

    def test_healthy_first_then_next_in_line(self) -> None:
        r = self.rotation(3)
        r.failed(0, now=0.0)
        assert r.current == 1 and r.healthy()
        r.failed(1, now=0.0)
        assert r.choose(0.0) == (2, 0.0)

    def test_waits_for_the_soonest_when_all_back_off(self) -> None:
        r = self.rotation(2)
        r.failed(0, now=0.0)
        r.failed(0, now=0.0)  # 0.1 s
        r.failed(1, now=0.0)  # 0.05 s
        assert r.choose(0.01) == (1, pytest.approx(0.04, abs=0.001))

    def test_needs_an_endpoint(self) -> None:
        with pytest.raises(ValueError):
            EndpointRotation(0, jitter=lambda: 0.0)


class TestKeys:
    @pytest.mark.parametrize(
        ("prefix", "end"),
        [(b"foo", b"fop"), (b"a\xff", b"b"), (b"\xff\xff", b"\x00"), (b"a/", b"a0"), (b"", b"\x00")],
    )
    def test_prefix_end(self, prefix: bytes, end: bytes) -> None:
        assert prefix_end(prefix) == end

    def test_show_key(self) -> None:
        assert show_key(b"jobs/lock") == "'jobs/lock'"
        assert show_key(b"\xff\x00") == "b'\\xff\\x00'"

    def test_range_of(self) -> None:
        assert range_of("k") == (b"k", b"")
        assert range_of("k", prefix=True) == (b"k", b"l")
        assert range_of("", prefix=True) == (b"\x00", b"\x00")
        assert range_of(b"a", range_end="c") == (b"a", b"c")
        with pytest.raises(ValueError):
            range_of("a", prefix=True, range_end="b")
        with pytest.raises(TypeError):
            range_of(3)  # type: ignore[arg-type]


class TestTxnDsl:
    def test_compares_to_wire(self) -> None:
        req = txn_request(
            [
                Compare.value("k") == "v",
                Compare.version("k") > 2,
                Compare.create_revision(b"l/1") == 7,
                Compare.mod_revision("p", prefix=True) < 100,
                Compare.lease("k") != 5,
            ],
            [Put("k", b"v2", lease=5, prev_kv=True), Delete("p", prefix=True), Txn([], [Get("x")], [])],
            [Get("k", limit=1, sort_order=SortOrder.DESCEND, sort_target=SortTarget.CREATE)],
        )
        c = req.compare
        assert (c[0].target, c[0].result, c[0].value) == (3, 0, b"v")
        assert (c[1].target, c[1].result, c[1].version) == (0, 1, 2)
        assert (c[2].target, c[2].create_revision, c[2].key) == (1, 7, b"l/1")
        assert (c[3].target, c[3].result, c[3].range_end) == (2, 2, b"q")
        assert (c[4].target, c[4].result, c[4].lease) == (4, 3, 5)
        assert req.success[0].request_put.lease == 5 and req.success[0].request_put.prev_kv
        assert req.success[1].request_delete_range.range_end == b"q"
        assert req.success[2].request_txn.success[0].request_range.key == b"x"
        f = req.failure[0].request_range
        assert (f.limit, f.sort_order, f.sort_target) == (1, 2, 2)

    def test_misuse_is_a_type_error(self) -> None:
        with pytest.raises(TypeError):
            Compare.version("k") == "x"  # noqa: B015
        with pytest.raises(TypeError):
            Compare.value("k") == 3  # noqa: B015
        with pytest.raises(TypeError):
            Compare.version("k") >= 1  # noqa: B015
        with pytest.raises(TypeError):
            txn_request([Compare.version("k")], [], [])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            bool(Compare.version("k"))


class TestErrorMapping:
    @pytest.mark.parametrize(
        ("code", "details", "write", "cls"),
        [
            ("OUT_OF_RANGE", "etcdserver: mvcc: required revision has been compacted", False, errors.Compacted),
            ("OUT_OF_RANGE", "etcdserver: mvcc: required revision is a future revision", False, errors.FutureRevision),
            ("NOT_FOUND", "etcdserver: requested lease not found", True, errors.LeaseNotFound),
            ("UNKNOWN", "etcdserver: requested lease not found", True, errors.LeaseNotFound),
            ("PERMISSION_DENIED", "etcdserver: permission denied", False, errors.PermissionDenied),
            ("UNKNOWN", "auth: permission denied", False, errors.PermissionDenied),
            (
                "INVALID_ARGUMENT",
                "etcdserver: authentication failed, invalid user ID or password",
                False,
                errors.AuthenticationFailed,
            ),
            ("UNAUTHENTICATED", "etcdserver: invalid auth token", False, errors.AuthenticationFailed),
            ("RESOURCE_EXHAUSTED", "etcdserver: mvcc: database space exceeded", True, errors.NoSpace),
            ("INVALID_ARGUMENT", "etcdserver: key is not provided", True, errors.InvalidRequest),
            ("UNAVAILABLE", "etcdserver: request timed out", True, errors.OutcomeUnknown),
            ("UNAVAILABLE", "etcdserver: request timed out", False, errors.Unavailable),
            ("UNAVAILABLE", "etcdserver: no leader", True, errors.Unavailable),
            ("UNAVAILABLE", "failed to connect to all addresses", True, errors.Unavailable),
            ("INTERNAL", "boom", False, errors.ServerError),
        ],
    )
    def test_map(self, code: str, details: str, write: bool, cls: type[errors.CoordError]) -> None:
        err = map_error(code, details, write=write)
        assert type(err) is cls
        assert err.code == code and err.details == details
        assert isinstance(err, errors.CoordError)


def test_parse_endpoint() -> None:
    assert parse_endpoint("127.0.0.1:2379") == "127.0.0.1:2379"
    assert parse_endpoint("http://localhost:2379/") == "localhost:2379"
    for bad in ("https://x:1", "unix:///tmp/s", "nohost", ""):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
