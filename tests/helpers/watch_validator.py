"""A watch validator: the properties etcd's robustness suite checks, per watcher.

The *history* is built from what the writers were told (acknowledged responses with
``prev_kv``), never from a watch, so the validator does not trust what it checks. Each
watcher is a :class:`WatchLog`: its create request and every response it received, in order.
A watcher resumed from ``last + 1`` after a cancel or a server restart appends to the same
log, so the checks below also prove the resumption (no gap, no duplicate).

Properties (names as in etcd's tests/robustness/validate):
  Filter        every event is in the watched range and passes the NOPUT/NODELETE filters
  Ordered       events come in (revision, position) order
  Unique        no (revision, key) twice
  Atomic        a revision's events for one watcher arrive in one response (fragments joined)
  Reliable      between the start and the last revision seen or notified, exactly the history's
                events for this watcher arrived (none missing, none extra, same content)
  Resumable     a resumed segment continues exactly at last + 1 (covered by Reliable on the log)
  Bookmarkable  a progress notification at revision P comes after every event <= P and
                before any event > P
  IsCreate      an event is a create (create_revision == mod_revision) iff the key did not exist
  PrevKV        with prev_kv, a non-create event carries the key's previous value (it may be
                absent only if that revision was compacted away)
A compaction cancel is valid only when the revision the watcher needed was below it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PUT, DELETE = 0, 1

KVTuple = tuple[bytes, bytes, int, int, int, int]  # key, value, create, mod, version, lease


def kv_tuple(kv: Any) -> KVTuple:
    return (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True)
class HistEvent:
    rev: int
    type: int
    kv: KVTuple  # for a DELETE: (key, b"", 0, rev, 0, 0), as etcd sends it
    prev: KVTuple | None  # the key's value before this revision

    @property
    def key(self) -> bytes:
        return self.kv[0]


@dataclass
class History:
    """Every revision's events, in order; built from acknowledged write responses."""

    events: dict[int, list[HistEvent]] = field(default_factory=dict)
    revisions: set[int] = field(default_factory=set)  # every revision known to exist (with or without events)
    compactions: list[int] = field(default_factory=list)

    def put(self, rev: int, key: bytes, value: bytes, prev: Any | None, lease: int = 0) -> None:
        """A put acknowledged at ``rev``; ``prev`` is the response's prev_kv (None if it was a create)."""
        p = kv_tuple(prev) if prev is not None and prev.key else None
        create = p[2] if p else rev
        version = p[4] + 1 if p else 1
        self._add(HistEvent(rev, PUT, (key, value, create, rev, version, lease), p))

    def delete(self, rev: int, prevs: Iterable[Any]) -> None:
        """A deletion acknowledged at ``rev``; ``prevs`` are the response's prev_kvs."""
        for prev in prevs:
            self._add(HistEvent(rev, DELETE, (prev.key, b"", 0, rev, 0, 0), kv_tuple(prev)))

    def revision(self, rev: int) -> None:
        self.revisions.add(rev)

    def _add(self, ev: HistEvent) -> None:
        self.revisions.add(ev.rev)
        self.events.setdefault(ev.rev, []).append(ev)

    def last(self) -> int:
        return max(self.revisions, default=1)

    def check_complete(self, upto: int) -> None:
        """Every revision 2..upto is accounted for, or the validation would be meaningless."""
        missing = [r for r in range(2, upto + 1) if r not in self.revisions]
        assert not missing, f"history has holes at revisions {missing[:10]}"


@dataclass
class WatchLog:
    """One logical watcher: its create parameters and every response it got, in order."""

    key: bytes
    range_end: bytes = b""
    start_revision: int = 0  # 0 is resolved by the test to created header.revision + 1
    no_put: bool = False
    no_delete: bool = False
    prev_kv: bool = False
    responses: list[Any] = field(default_factory=list)
    resolved_start: int = 0
    compacted_at: int = 0  # compact_revision of a compaction cancel, if one came

    def matches(self, key: bytes) -> bool:
        k = self.key or b"\x00"
        if not self.range_end:
            return key == k
        if self.range_end == b"\x00":
            return key >= k
        return k <= key < self.range_end

    def passes(self, ev_type: int) -> bool:
        return not (self.no_put if ev_type == PUT else self.no_delete)

    def last_event_rev(self) -> int:
        revs = [ev.kv.mod_revision for r in self.responses for ev in r.events]
        return max(revs, default=0)

    def next_start(self) -> int:
        """Where a resumed watch must start: one past the last revision seen or notified."""
        seen = [r.header.revision for r in self.responses if not r.events and not r.created
                and not r.canceled and r.header.revision]
        return max([self.last_event_rev(), *seen, self.resolved_start - 1]) + 1


@dataclass
class Report:
    watchers: int = 0
    events: int = 0
    progress_notifications: int = 0
    violations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def fail(self, prop: str, detail: str) -> None:
        self.violations[prop] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{prop}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.violations.values())

    def summary(self) -> str:
        props = ["Filter", "Ordered", "Unique", "Atomic", "Reliable", "Bookmarkable", "IsCreate", "PrevKV",
                 "Compaction"]
        counts = " ".join(f"{p}={self.violations.get(p, 0)}" for p in props)
        return (f"watchers={self.watchers} events={self.events} progress={self.progress_notifications} "
                f"violations={self.total} [{counts}]")


def _received(log: WatchLog) -> list[tuple[int, list[tuple[int, int, KVTuple, KVTuple | None]]]]:
    """(response index, events) with fragments joined into their final response."""
    out: list[tuple[int, list[tuple[int, int, KVTuple, KVTuple | None]]]] = []
    pending: list[tuple[int, int, KVTuple, KVTuple | None]] = []
    for i, r in enumerate(log.responses):
        evs = [(ev.kv.mod_revision, int(ev.type), kv_tuple(ev.kv),
                kv_tuple(ev.prev_kv) if ev.HasField("prev_kv") else None) for ev in r.events]
        pending.extend(evs)
        if r.fragment:
            continue
        if pending:
            out.append((i, pending))
        pending = []
    return out


def validate(logs: Sequence[WatchLog], history: History, report: Report | None = None) -> Report:
    """Check every property for every watcher; returns the (accumulated) report."""
    report = report or Report()
    compactions = sorted(history.compactions)
    for n, log in enumerate(logs):
        report.watchers += 1
        start = log.resolved_start or log.start_revision
        assert start > 0, "resolve start_revision 0 from the created reply before validating"
        name = f"watcher#{n} {log.key!r}..{log.range_end!r}@{start}"
        received = _received(log)
        flat = [(ri, ev) for ri, evs in received for ev in evs]
        report.events += len(flat)

        # Filter, Ordered, Unique, Atomic
        seen: set[tuple[int, bytes]] = set()
        rev_response: dict[int, int] = {}
        last_rev = 0
        for ri, (rev, etype, kv, _prev) in flat:
            if not log.matches(kv[0]) or not log.passes(etype):
                report.fail("Filter", f"{name}: event {etype} {kv[0]!r}@{rev}")
            if rev < last_rev:
                report.fail("Ordered", f"{name}: revision {rev} after {last_rev}")
            last_rev = max(last_rev, rev)
            if (rev, kv[0]) in seen:
                report.fail("Unique", f"{name}: {kv[0]!r}@{rev} twice")
            seen.add((rev, kv[0]))
            if rev_response.setdefault(rev, ri) != ri:
                report.fail("Atomic", f"{name}: revision {rev} split across responses")

        # Bookmarkable: walk responses in order
        got_so_far = 0
        for r in log.responses:
            got_so_far += len(r.events)
            is_progress = not r.events and not r.created and not r.canceled and r.header.revision > 0
            if not is_progress:
                continue
            report.progress_notifications += 1
            p = r.header.revision
            expected_upto = _expected(log, history, start, p)
            if got_so_far != len(expected_upto):
                report.fail("Bookmarkable", f"{name}: progress at {p} after {got_so_far} events, "
                                            f"history has {len(expected_upto)} up to it")

        # Reliable (+ IsCreate/PrevKV through content equality)
        notified = [r.header.revision for r in log.responses if not r.events and not r.created
                    and not r.canceled and r.header.revision > 0]
        upto = max([last_rev, *notified, 0])
        if log.compacted_at:
            need = log.next_start()
            if need >= log.compacted_at:
                report.fail("Compaction", f"{name}: cancelled by compaction at {log.compacted_at}, "
                                          f"but it needed revision {need}")
        if upto:
            history.check_complete(upto)
        expected = _expected(log, history, start, upto)
        got = [ev for _, ev in flat]
        if len(got) != len(expected):
            report.fail("Reliable", f"{name}: {len(got)} events, history has {len(expected)} in "
                                    f"[{start}, {upto}]")
        for g, e in zip(got, expected, strict=False):
            rev, etype, kv, prev = g
            if (rev, etype, kv) != (e.rev, e.type, e.kv):
                prop = "IsCreate" if etype == e.type == PUT and kv[2:4] != e.kv[2:4] else "Reliable"
                report.fail(prop, f"{name}: got {etype} {kv} want {e.type} {e.kv}")
                continue
            if log.prev_kv:
                is_create = etype == PUT and kv[2] == kv[3]
                want = None if is_create else e.prev
                if prev != want:
                    lost = prev is None and any(c > rev - 1 for c in compactions)
                    if not lost:
                        report.fail("PrevKV", f"{name}: {kv[0]!r}@{rev} prev {prev} want {want}")
            elif prev is not None:
                report.fail("PrevKV", f"{name}: prev_kv sent without being asked")
    return report


def _expected(log: WatchLog, history: History, start: int, upto: int) -> list[HistEvent]:
    out = []
    for rev in range(start, upto + 1):
        for ev in history.events.get(rev, ()):
            if log.matches(ev.key) and log.passes(ev.type):
                out.append(ev)
    return out
