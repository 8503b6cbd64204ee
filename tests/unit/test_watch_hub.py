"""The sans-io watch hub (coord_server.watch_hub): examples, then a Hypothesis state machine whose
watchers are checked by the watch validator (tests/helpers/watch_validator.py) against a history
built from the write responses."""

from __future__ import annotations

from typing import Any

import pytest
from helpers.watch_validator import History, WatchLog, validate
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from coord._pb import rpc_pb2
from coord_server import mvcc
from coord_server.watch_hub import ERR_DUPLICATE_ID, ERR_EMPTY_RANGE, Limits, WatchHub, WatchStream, as_response

WR = rpc_pb2.WatchRequest
WCR = rpc_pb2.WatchCreateRequest
NOPUT = WCR.NOPUT
NODELETE = WCR.NODELETE


def header(rev: int) -> rpc_pb2.ResponseHeader:
    return rpc_pb2.ResponseHeader(cluster_id=1, member_id=2, raft_term=3, revision=rev)


class Harness:
    """A store, a hub and helpers that write through the store and publish, like the writer does."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.store = mvcc.Store()
        self.hub = WatchHub(self.store, header, limits=limits or Limits())
        self.history = History()

    def stream(self) -> WatchStream:
        return self.hub.open_stream(lambda: None)

    def put(self, key: bytes, value: bytes = b"v") -> int:
        resp = self.store.put(rpc_pb2.PutRequest(key=key, value=value, prev_kv=True))
        rev = self.store.rev
        self.history.put(rev, key, value, resp.prev_kv if resp.HasField("prev_kv") else None)
        self.hub.publish(rev)
        return rev

    def delete(self, key: bytes, end: bytes = b"") -> int:
        before = self.store.rev
        resp = self.store.delete_range(rpc_pb2.DeleteRangeRequest(key=key, range_end=end, prev_kv=True))
        if self.store.rev != before:
            self.history.delete(self.store.rev, resp.prev_kvs)
        self.hub.publish(self.store.rev)
        return self.store.rev

    def txn(self, puts: list[tuple[bytes, bytes]]) -> int:
        ops = [rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=v, prev_kv=True)) for k, v in puts]
        resp = self.store.txn(rpc_pb2.TxnRequest(success=ops))
        rev = self.store.rev
        for (k, v), r in zip(puts, resp.responses, strict=True):
            p = r.response_put
            self.history.put(rev, k, v, p.prev_kv if p.HasField("prev_kv") else None)
        self.hub.publish(rev)
        return rev

    def compact(self, rev: int) -> None:
        self.store.compact(rev)
        self.history.compactions.append(rev)


def take(stream: WatchStream) -> list[rpc_pb2.WatchResponse]:
    """The outbox as a sender takes it (each payload reported sent), parsed back into messages."""
    out = []
    for payload, events in stream.take():
        resp = as_response(payload)
        assert len(resp.events) == events
        out.append(resp)
        stream.sent(events)
    return out


def drain(stream: WatchStream) -> list[rpc_pb2.WatchResponse]:
    """What a fast reader gets: the outbox, then catch-up chunks, until nothing is left."""
    out: list[rpc_pb2.WatchResponse] = []
    while True:
        if stream.outbox:
            out.extend(take(stream))
        elif stream.needs_catch_up():
            stream.catch_up()
            if not stream.outbox and stream.needs_catch_up() and not stream.has_room():
                raise AssertionError("catch-up made no progress")
        else:
            return out


def create(stream: WatchStream, key: bytes, end: bytes = b"", **kw: Any) -> None:
    stream.handle(WR(create_request=WCR(key=key, range_end=end, **kw)))


def evs(resp: rpc_pb2.WatchResponse) -> list[tuple[str, bytes, int]]:
    return [("PUT" if e.type == 0 else "DELETE", e.kv.key, e.kv.mod_revision) for e in resp.events]


# ---------------------------------------------------------------------------------------------------
# examples


def test_created_then_live_events_one_response_per_revision() -> None:
    h = Harness()
    s = h.stream()
    create(s, b"a", b"c")
    [created] = drain(s)
    assert (created.watch_id, created.created, created.header.revision) == (0, True, 1)
    h.put(b"a")
    h.txn([(b"a2", b"x"), (b"b", b"y"), (b"c", b"z")])  # c is outside [a, c)
    h.delete(b"a")
    got = drain(s)
    assert [evs(r) for r in got] == [[("PUT", b"a", 2)], [("PUT", b"a2", 3), ("PUT", b"b", 3)],
                                     [("DELETE", b"a", 4)]]
    assert [r.header.revision for r in got] == [2, 3, 4]  # live: the write's revision


def test_ids_auto_explicit_and_duplicates() -> None:
    h = Harness()
    s = h.stream()
    create(s, b"a")
    create(s, b"a")
    create(s, b"a", watch_id=7)
    create(s, b"a", watch_id=2)
    create(s, b"a")  # skips the taken 2
    create(s, b"a", watch_id=7)  # duplicate
    got = drain(s)
    assert [r.watch_id for r in got] == [0, 1, 7, 2, 3, -1]
    assert got[-1].canceled and got[-1].created and got[-1].cancel_reason == ERR_DUPLICATE_ID


def test_empty_range_and_key_forms() -> None:
    h = Harness()
    s = h.stream()
    create(s, b"b", b"a")
    create(s, b"b", b"b")
    create(s, b"", b"\x00")  # every key
    got = drain(s)
    assert [(r.watch_id, r.canceled, r.cancel_reason) for r in got] == [
        (-1, True, ERR_EMPTY_RANGE), (-1, True, ERR_EMPTY_RANGE), (0, False, "")]
    h.put(b"\x00")
    h.put(b"zzz")
    assert [evs(r) for r in drain(s)] == [[("PUT", b"\x00", 2)], [("PUT", b"zzz", 3)]]


def test_cancel_known_and_unknown() -> None:
    h = Harness()
    s = h.stream()
    create(s, b"a")
    drain(s)
    s.handle(WR(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=5)))
    assert drain(s) == []  # unknown: no reply at all
    s.handle(WR(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=0)))
    [r] = drain(s)
    assert (r.watch_id, r.canceled, r.created, r.header.revision) == (0, True, False, 1)
    h.put(b"a")
    assert drain(s) == []
    assert h.hub.synced_count() == 0


def test_past_start_replays_with_current_header_then_goes_live() -> None:
    h = Harness()
    for i in range(5):
        h.put(b"k", b"%d" % i)
    s = h.stream()
    create(s, b"k", start_revision=3, prev_kv=True)
    got = drain(s)
    assert got[0].created and got[0].header.revision == 6
    assert evs(got[1]) == [("PUT", b"k", 3), ("PUT", b"k", 4), ("PUT", b"k", 5), ("PUT", b"k", 6)]
    assert got[1].header.revision == 6  # catch-up: the current revision
    assert [e.prev_kv.value for e in got[1].events] == [b"0", b"1", b"2", b"3"]
    h.put(b"k", b"x")
    [live] = drain(s)
    assert evs(live) == [("PUT", b"k", 7)] and live.header.revision == 7


def test_future_start_waits() -> None:
    h = Harness()
    s = h.stream()
    create(s, b"k", start_revision=4)
    drain(s)
    h.put(b"k")
    h.put(b"k")
    assert drain(s) == []
    h.put(b"k")
    assert [evs(r) for r in drain(s)] == [[("PUT", b"k", 4)]]


def test_filters_and_prev_kv_on_create_and_delete() -> None:
    h = Harness()
    s = h.stream()
    create(s, b"a", b"z", filters=[NOPUT], watch_id=1)
    create(s, b"a", b"z", filters=[NODELETE], watch_id=2, prev_kv=True)
    drain(s)
    h.put(b"b", b"1")
    h.put(b"b", b"2")
    h.delete(b"b")
    got = drain(s)
    by_id: dict[int, list[rpc_pb2.WatchResponse]] = {}
    for r in got:
        by_id.setdefault(r.watch_id, []).append(r)
    assert [evs(r) for r in by_id[1]] == [[("DELETE", b"b", 4)]]
    puts = by_id[2]
    assert [evs(r) for r in puts] == [[("PUT", b"b", 2)], [("PUT", b"b", 3)]]
    assert not puts[0].events[0].HasField("prev_kv")  # a create has no previous value
    assert puts[1].events[0].prev_kv.value == b"1"


def test_compacted_start_gets_created_then_compaction_cancel() -> None:
    h = Harness()
    for _ in range(6):
        h.put(b"k")
    h.compact(5)
    s = h.stream()
    create(s, b"k", start_revision=3)
    created, cancel = drain(s)
    assert created.created and not created.canceled and created.header.revision == 7
    assert (cancel.watch_id, cancel.canceled, cancel.compact_revision, cancel.header.revision) == (0, True, 5, 0)
    assert cancel.cancel_reason == ""
    # the id stays taken until the client cancels it, then the cancel is answered
    create(s, b"k")
    assert drain(s)[0].watch_id == 1
    s.handle(WR(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=0)))
    [r] = drain(s)
    assert r.canceled and r.watch_id == 0


def test_start_at_the_compaction_revision_gets_all_its_events() -> None:
    """etcd drops the tombstones at the compaction revision, so a watch resuming exactly there silently
    misses those deletions; coord keeps that revision whole (docs/compatibility.md)."""
    h = Harness()
    h.put(b"a")  # 2
    h.txn([(b"b", b"1")])  # 3
    h.delete(b"a")  # 4
    h.compact(4)
    s = h.stream()
    create(s, b"a", b"z", start_revision=4)
    assert [evs(r) for r in drain(s)[1:]] == [[("DELETE", b"a", 4)]]
    s2 = h.stream()
    create(s2, b"a", b"z", start_revision=3)
    assert drain(s2)[1].compact_revision == 4


def test_progress_request_is_deferred_until_caught_up() -> None:
    h = Harness(Limits(catch_up_events=2))
    for i in range(10):
        h.put(b"k%d" % i)
    s = h.stream()
    create(s, b"k", b"l", start_revision=2)
    s.handle(WR(progress_request=rpc_pb2.WatchProgressRequest()))
    got = drain(s)
    assert got[0].created
    assert [r.watch_id for r in got[1:]] == [0] * 5 + [-1]  # five chunks of two, then the bookmark
    assert got[-1].header.revision == 11 and not got[-1].events
    # with nothing behind it is answered at once
    s.handle(WR(progress_request=rpc_pb2.WatchProgressRequest()))
    assert [(r.watch_id, r.header.revision) for r in take(s)] == [(-1, 11)]


def test_progress_notify_ticks_only_quiet_synced_watchers() -> None:
    h = Harness()
    s = h.stream()
    create(s, b"a", progress_notify=True, watch_id=1)
    create(s, b"b", progress_notify=True, watch_id=2)
    create(s, b"c", watch_id=3)
    drain(s)
    h.hub.progress_tick()
    assert [(r.watch_id, r.header.revision) for r in drain(s)] == [(1, 1), (2, 1)]
    h.put(b"a")
    drain(s)
    h.hub.progress_tick()  # watcher 1 sent an event since the last tick
    assert [(r.watch_id, r.header.revision) for r in drain(s)] == [(2, 2)]
    h.hub.progress_tick()
    assert [r.watch_id for r in drain(s)] == [1, 2]


def test_fragments_split_big_responses_only_when_asked() -> None:
    limits = Limits(fragment_bytes=1000)
    h = Harness(limits)
    s = h.stream()
    create(s, b"k", b"l", fragment=True, watch_id=1)
    create(s, b"k", b"l", watch_id=2)
    drain(s)
    h.txn([(b"k%d" % i, b"x" * 300) for i in range(10)])
    got = drain(s)
    frag = [r for r in got if r.watch_id == 1]
    whole = [r for r in got if r.watch_id == 2]
    assert len(whole) == 1 and len(whole[0].events) == 10 and not whole[0].fragment
    assert len(frag) > 1
    assert [r.fragment for r in frag] == [True] * (len(frag) - 1) + [False]
    assert sum(len(r.events) for r in frag) == 10
    assert all(r.ByteSize() < 1000 or len(r.events) == 1 for r in frag)
    assert all(r.header == frag[0].header for r in frag)


def test_stalled_stream_is_bounded_and_then_gets_everything_in_order() -> None:
    limits = Limits(max_events=50, catch_up_events=20)
    h = Harness(limits)
    slow = h.stream()
    fast = h.stream()
    create(slow, b"k", b"l", watch_id=1)
    create(fast, b"k", b"l", watch_id=1)
    drain(slow)
    drain(fast)
    peak = 0
    for i in range(3000):
        h.put(b"k%d" % (i % 7), b"%d" % i)
        peak = max(peak, slow.buffered_events)
        assert len(drain(fast)) == 1
    assert peak <= 50
    assert h.hub.victims >= 1
    got = drain(slow)
    revs = [e.kv.mod_revision for r in got for e in r.events]
    assert revs == list(range(2, 3002))
    # caught up: synced again, live from here
    h.put(b"k0")
    assert [evs(r) for r in drain(slow)] == [[("PUT", b"k0", 3002)]]


def test_stalled_stream_whose_history_is_compacted_gets_the_cancel() -> None:
    h = Harness(Limits(max_events=5))
    s = h.stream()
    create(s, b"k", watch_id=1)
    drain(s)
    for _ in range(20):
        h.put(b"k")
    h.compact(15)
    got = drain(s)
    delivered = [e.kv.mod_revision for r in got for e in r.events]
    assert delivered == [2, 3, 4, 5, 6]
    assert got[-1].canceled and got[-1].compact_revision == 15 and got[-1].header.revision == 0


def test_close_releases_everything() -> None:
    counts: list[int] = []
    store = mvcc.Store()
    hub = WatchHub(store, header, on_watchers=counts.append)
    s = hub.open_stream(lambda: None)
    for i in range(1000):
        create(s, b"k%d" % i, b"k%d\xff" % i if i % 2 else b"")
    assert sum(counts) == 1000 and hub.synced_count() == 1000
    s.close()
    assert sum(counts) == 0 and hub.synced_count() == 0 and not hub.streams


# ---------------------------------------------------------------------------------------------------
# the state machine

KEYS = [b"a", b"b", b"c", b"d"]
RANGES = [(b"a", b""), (b"b", b""), (b"a", b"c"), (b"b", b"e"), (b"", b"\x00"), (b"c", b"\x00")]


class HubMachine(RuleBasedStateMachine):
    """Random writes, compactions, watchers (past/now/future starts, filters, prev_kv), cancels
    with resumption, slow and fast readers, progress requests and ticks; then the validator."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(Limits(max_events=6, catch_up_events=3, catch_up_revisions=5))
        self.streams = [self.h.stream(), self.h.stream()]
        self.active: list[dict[int, WatchLog]] = [{}, {}]
        self.logs: list[WatchLog] = []
        self.next_id = [1, 1]
        self.created: list[set[int]] = [set(), set()]

    def _route(self, i: int, responses: list[rpc_pb2.WatchResponse]) -> None:
        for r in responses:
            if r.watch_id == -1:
                # a client hands a stream-wide bookmark to the watchers it knows are created
                for wid, log in self.active[i].items():
                    if wid in self.created[i]:
                        log.responses.append(r)
                continue
            log = self.active[i].get(r.watch_id)
            assert log is not None, f"response for unknown watcher {r.watch_id}"
            log.responses.append(r)
            if r.created:
                self.created[i].add(r.watch_id)
                if not log.resolved_start:
                    log.resolved_start = log.start_revision or r.header.revision + 1
            if r.canceled:
                if r.compact_revision:
                    log.compacted_at = r.compact_revision
                del self.active[i][r.watch_id]
                self.created[i].discard(r.watch_id)

    @rule(key=st.sampled_from(KEYS), value=st.binary(max_size=3))
    def put(self, key: bytes, value: bytes) -> None:
        self.h.put(key, value)

    @rule(span=st.sampled_from(RANGES))
    def delete(self, span: tuple[bytes, bytes]) -> None:
        self.h.delete(*span)

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
    def txn(self, keys: list[bytes]) -> None:
        self.h.txn([(k, b"t") for k in keys])

    @precondition(lambda self: self.h.store.rev > max(self.h.store.compact_rev, 1))
    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        store = self.h.store
        self.h.compact(data.draw(st.integers(max(store.compact_rev + 1, 1), store.rev)))

    @rule(i=st.integers(0, 1), span=st.sampled_from(RANGES), start=st.integers(-3, 3),
          no_put=st.booleans(), no_delete=st.booleans(), prev_kv=st.booleans(), data=st.data())
    def watch(self, i: int, span: tuple[bytes, bytes], start: int, no_put: bool, no_delete: bool,
              prev_kv: bool, data: st.DataObject) -> None:
        rev = self.h.store.rev
        start_rev = 0 if start == 0 else max(1, rev + start)
        log = WatchLog(key=span[0], range_end=span[1], start_revision=start_rev, no_put=no_put,
                       no_delete=no_delete, prev_kv=prev_kv)
        self._start(i, log)

    def _start(self, i: int, log: WatchLog) -> None:
        wid = self.next_id[i]
        self.next_id[i] += 1
        filters = ([NOPUT] if log.no_put else []) + ([NODELETE] if log.no_delete else [])
        if not any(existing is log for existing in self.logs):
            self.logs.append(log)
        self.active[i][wid] = log
        create(self.streams[i], log.key, log.range_end, start_revision=log.start_revision, filters=filters,
               prev_kv=log.prev_kv, watch_id=wid)

    @rule(i=st.integers(0, 1), data=st.data())
    def cancel_and_resume(self, i: int, data: st.DataObject) -> None:
        """Cancel a watcher after reading all it has, then resume it from last + 1 (Resumable)."""
        if not self.active[i]:
            return
        wid = data.draw(st.sampled_from(sorted(self.active[i])))
        log = self.active[i][wid]
        self._route(i, drain(self.streams[i]))
        if wid not in self.active[i] or not log.resolved_start:
            return
        self.streams[i].handle(WR(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=wid)))
        self._route(i, drain(self.streams[i]))
        log.start_revision = log.next_start()  # the same logical watcher goes on from there
        self._start(i, log)

    @rule(i=st.integers(0, 1), n=st.integers(0, 4))
    def read_some(self, i: int, n: int) -> None:
        """A reader that takes only part of what is ready (slow) — or nothing (stalled)."""
        s = self.streams[i]
        if not s.outbox and s.needs_catch_up():
            s.catch_up()
        out = take(s) if n else []
        self._route(i, out)

    @rule(i=st.integers(0, 1))
    def read_all(self, i: int) -> None:
        self._route(i, drain(self.streams[i]))

    @rule(i=st.integers(0, 1))
    def progress_request(self, i: int) -> None:
        self.streams[i].handle(WR(progress_request=rpc_pb2.WatchProgressRequest()))

    @invariant()
    def bounded(self) -> None:
        for s in self.streams:
            assert self.h.hub.buffered.get(id(s), 0) == s.buffered_events + s.held_events == s.buffered_events
            # the outbox is bounded; one revision may overshoot when it arrives at an empty outbox
            assert s.buffered_events <= 6 + len(KEYS)

    def teardown(self) -> None:
        for i in range(2):
            self._route(i, drain(self.streams[i]))
        report = validate(self.logs, self.h.history)
        assert report.total == 0, report.summary() + "\n" + "\n".join(report.examples)


TestHubMachine = HubMachine.TestCase


def test_validator_catches_a_gap_and_a_duplicate() -> None:
    """The validator itself must fail on broken streams (a test that cannot fail proves nothing)."""
    h = Harness()
    s = h.stream()
    create(s, b"k", watch_id=1)
    for _ in range(4):
        h.put(b"k")
    responses = drain(s)
    log = WatchLog(key=b"k", resolved_start=2, responses=[r for r in responses if not r.created])
    assert validate([log], h.history).total == 0
    gap = WatchLog(key=b"k", resolved_start=2, responses=log.responses[:1] + log.responses[2:])
    assert validate([gap], h.history).violations["Reliable"] >= 1
    dup = WatchLog(key=b"k", resolved_start=2, responses=log.responses + log.responses[-1:])
    report = validate([dup], h.history)
    assert report.violations["Unique"] == 1 and report.violations["Atomic"] == 1
    wrong_filter = WatchLog(key=b"j", resolved_start=2, responses=log.responses)
    assert validate([wrong_filter], h.history).violations["Filter"] == 4


@pytest.mark.parametrize("n", [1, 3])
def test_many_watchers_on_one_key_share_events(n: int) -> None:
    h = Harness()
    streams = [h.stream() for _ in range(n)]
    for s in streams:
        for _ in range(100):
            create(s, b"hot")
        drain(s)
    h.put(b"hot", b"x")
    for s in streams:
        got = drain(s)
        assert len(got) == 100 and all(evs(r) == [("PUT", b"hot", 2)] for r in got)
