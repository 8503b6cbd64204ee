"""The watch hub: which watcher gets which event, and when. Sans-io.

A :class:`WatchHub` hangs off the write path (``publish(rev)`` runs after every durable
commit) and reads events from the store's revision log. Each gRPC watch stream is a
:class:`WatchStream` with an outbox of ready responses that the I/O shell sends.

Watchers are *synced* (they receive events as revisions are published) or *unsynced*
(their start revision is in the past, or their stream fell behind): unsynced watchers
catch up from the store when their stream has room, a bounded chunk at a time, and
become synced again once they reach the published revision. A stream's outbox is
bounded (events and bytes): when a live revision does not fit, the watchers it concerns
turn unsynced instead of growing the outbox, and catch up later. So a stalled reader
costs a bounded amount of memory and still gets every event exactly once, in order —
or, if the history it needs was compacted meanwhile, the explicit compaction cancel.

Everything here runs on one thread, without awaiting: a watcher moves between the two
states atomically with respect to publishing, which is what rules out gaps and duplicates.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from coord._pb import kv_pb2, rpc_pb2

from .mvcc import Record, Store

Event = kv_pb2.Event
WatchResponse = rpc_pb2.WatchResponse
PUT = kv_pb2.Event.PUT
DELETE = kv_pb2.Event.DELETE
NOPUT = rpc_pb2.WatchCreateRequest.NOPUT
NODELETE = rpc_pb2.WatchCreateRequest.NODELETE

INVALID_WATCH_ID = -1
GRPC_OVERHEAD_BYTES = 512 * 1024  # etcd fragments above max-request-bytes + this

ERR_EMPTY_RANGE = "mvcc: watcher range is empty"
ERR_DUPLICATE_ID = "mvcc: duplicate watch ID provided on the WatchStream"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-stream bounds. ``max_events``/``max_bytes`` cap what waits in a stream's outbox;
    ``catch_up_events`` caps one catch-up chunk (whole revisions, so it may run over by one)."""

    max_events: int = 4096
    max_bytes: int = 16 << 20
    catch_up_events: int = 1024
    catch_up_revisions: int = 1000  # revisions scanned per chunk (etcd: watchBatchMaxRevs), so a step stays short
    fragment_bytes: int = 1536 * 1024 + GRPC_OVERHEAD_BYTES


@dataclass(eq=False, slots=True)
class Watcher:
    id: int
    stream: WatchStream
    key: bytes
    end: bytes | None  # None: the single key; b"": every key >= key; else [key, end)
    min_rev: int  # events below this revision are not for this watcher
    next_rev: int  # unsynced: the first revision still to deliver
    no_put: bool = False
    no_delete: bool = False
    prev_kv: bool = False
    progress_notify: bool = False
    fragment: bool = False
    synced: bool = False
    compacted: bool = False  # cancelled by a compaction; the id stays taken until the client cancels
    sent_since_tick: bool = False

    def matches(self, key: bytes) -> bool:
        if self.end is None:
            return key == self.key
        return self.key <= key and (not self.end or key < self.end)

    def wants(self, rec: Record) -> bool:
        return not (self.no_delete if rec.tombstone else self.no_put)


def _event_cost(ev: Event) -> int:
    kv = ev.kv
    cost = 64 + len(kv.key) + len(kv.value)
    if ev.HasField("prev_kv"):
        cost += len(ev.prev_kv.key) + len(ev.prev_kv.value)
    return cost


class WatchStream:
    """One client stream: its watchers and the responses waiting to be sent, in order.

    ``on_ready`` is called (synchronously) when the outbox goes from empty to non-empty
    or when catch-up work appears, so that the I/O shell wakes its sender.
    """

    def __init__(self, hub: WatchHub, on_ready: Callable[[], None]) -> None:
        self.hub = hub
        self.on_ready = on_ready
        self.watchers: dict[int, Watcher] = {}
        self.unsynced: dict[Watcher, None] = {}  # insertion-ordered set
        self.outbox: deque[tuple[WatchResponse | bytes, int, int]] = deque()  # (payload, events, bytes)
        self.buffered_events = 0  # in the outbox
        self.buffered_bytes = 0
        self.held_events = 0  # taken by the sender and not sent yet
        self.progress_wanted = False  # a progress request waits for the unsynced watchers
        self._next_id = 0
        self.closed = False

    # ------------------------------------------------------------------ requests

    def handle(self, req: rpc_pb2.WatchRequest) -> None:
        """Apply one client request; replies land in the outbox. Never raises on bad input."""
        kind = req.WhichOneof("request_union")
        if kind == "create_request":
            self.create(req.create_request)
        elif kind == "cancel_request":
            self.cancel(req.cancel_request.watch_id)
        elif kind == "progress_request":
            self.request_progress()
        # an empty WatchRequest is ignored, as etcd does

    def create(self, creq: rpc_pb2.WatchCreateRequest) -> None:
        hub = self.hub
        current = hub.rev
        key = creq.key or b"\x00"
        end: bytes | None = creq.range_end or None
        if end == b"\x00":
            end = b""
        if end and key >= end:
            self._reply(self._created(INVALID_WATCH_ID, current, canceled=True, reason=ERR_EMPTY_RANGE))
            return
        wid = creq.watch_id
        if wid == 0:
            while self._next_id in self.watchers:
                self._next_id += 1
            wid = self._next_id
            self._next_id += 1
        elif wid in self.watchers:
            self._reply(self._created(INVALID_WATCH_ID, current, canceled=True, reason=ERR_DUPLICATE_ID))
            return
        start = creq.start_revision or current + 1
        filters = set(creq.filters)
        w = Watcher(id=wid, stream=self, key=key, end=end, min_rev=start, next_rev=start,
                    no_put=NOPUT in filters, no_delete=NODELETE in filters, prev_kv=creq.prev_kv,
                    progress_notify=creq.progress_notify, fragment=creq.fragment)
        self.watchers[wid] = w
        hub.counters_watchers(+1)
        self._reply(self._created(wid, current))
        if start <= current:
            self.unsynced[w] = None
            self.on_ready()
        else:
            hub.add_synced(w)

    def cancel(self, wid: int) -> None:
        """Cancel a watcher; an unknown id gets no reply at all (as in etcd)."""
        w = self.watchers.pop(wid, None)
        if w is None:
            return
        self._drop(w)
        self._reply(WatchResponse(header=self.hub.header(self.hub.rev), watch_id=wid, canceled=True))
        self._settled()

    def request_progress(self) -> None:
        """Queue a progress reply (watch_id -1) once every watcher here is caught up.

        etcd 3.4 answers at once, possibly ahead of events it has not sent yet; waiting
        keeps the reply a true bookmark (the 3.5 behaviour, without dropping the request).
        """
        if self.unsynced:
            self.progress_wanted = True
            return
        self._reply(WatchResponse(header=self.hub.header(self.hub.rev), watch_id=INVALID_WATCH_ID))

    def close(self) -> None:
        """Forget every watcher and pending response (the client went away)."""
        if self.closed:
            return
        self.closed = True
        for w in self.watchers.values():
            self._drop(w)
        self.watchers.clear()
        self.outbox.clear()
        self.buffered_events = self.buffered_bytes = self.held_events = 0
        self.hub.streams.discard(self)
        self.hub.buffered.pop(id(self), None)

    def _drop(self, w: Watcher) -> None:
        if w.synced:
            self.hub.remove_synced(w)
        self.unsynced.pop(w, None)
        if not w.compacted:
            self.hub.counters_watchers(-1)
            w.compacted = True  # no longer live either way

    # ------------------------------------------------------------------ outbox

    def _created(self, wid: int, rev: int, *, canceled: bool = False, reason: str = "") -> WatchResponse:
        return WatchResponse(header=self.hub.header(rev), watch_id=wid, created=True, canceled=canceled,
                             cancel_reason=reason)

    def _reply(self, resp: WatchResponse | bytes, events: int = 0, size: int = 0) -> None:
        was_empty = not self.outbox
        self.outbox.append((resp, events, size))
        self.buffered_events += events
        self.buffered_bytes += size
        if events:
            self._report()
        if was_empty:
            self.on_ready()

    def _report(self) -> None:
        self.hub.buffered[id(self)] = self.buffered_events + self.held_events

    def has_room(self) -> bool:
        limits = self.hub.limits
        return self.buffered_events < limits.max_events and self.buffered_bytes < limits.max_bytes

    def fits(self, events: int, size: int) -> bool:
        """Whether a response of this size may join the outbox now (an empty outbox takes anything)."""
        if not self.outbox:
            return True
        limits = self.hub.limits
        return (self.buffered_events + events <= limits.max_events
                and self.buffered_bytes + size <= limits.max_bytes)

    def take(self) -> list[tuple[WatchResponse | bytes, int]]:
        """Everything ready to send, in order, as (payload, events in it); the outbox is emptied. A
        payload is a WatchResponse or its serialized bytes (see :func:`as_response`). The caller
        reports each one it hands on with :meth:`sent`, so the stream's buffered count stays true."""
        out = [(resp, events) for resp, events, _ in self.outbox]
        self.held_events += self.buffered_events
        self.outbox.clear()
        self.buffered_events = self.buffered_bytes = 0
        return out

    def ready(self) -> list[tuple[WatchResponse | bytes, int]]:
        """What a sender hands on now: the outbox, or else what one catch-up step produced; empty
        when there is nothing yet (call again while :meth:`needs_catch_up`, after a checkpoint)."""
        if not self.outbox and self.unsynced:
            self.catch_up()
        return self.take()

    def sent(self, events: int) -> None:
        if events:
            self.held_events -= events
            self._report()

    def send_encoded(self, w: Watcher, common: bytes, events: int, size: int) -> None:
        """Queue a response for ``w`` whose header and events are already serialized in ``common``."""
        w.sent_since_tick = True
        self._reply(_watch_id_field(w.id) + common, events, size)

    def send_events(self, w: Watcher, events: list[Event], size: int, header: rpc_pb2.ResponseHeader) -> None:
        """Queue ``events`` for ``w`` as one response, or as fragments if it asked for them."""
        w.sent_since_tick = True
        resp = WatchResponse(header=header, watch_id=w.id, events=events)
        if not w.fragment or len(events) < 2 or resp.ByteSize() < self.hub.limits.fragment_bytes:
            self._reply(resp, len(events), size)
            return
        for part in _fragments(resp, self.hub.limits.fragment_bytes):
            self._reply(part, len(part.events), size * len(part.events) // len(events))

    # ------------------------------------------------------------------ catch-up

    def needs_catch_up(self) -> bool:
        return bool(self.unsynced)

    def catch_up(self) -> None:
        """Move the unsynced watchers forward by one bounded chunk, if the outbox has room.

        A watcher that reaches the published revision becomes synced in the same step.
        A watcher whose next revision was compacted gets the compaction cancel.
        Call again while :meth:`needs_catch_up` (the shell checkpoints in between).
        """
        hub = self.hub
        store = hub.store
        current = hub.rev
        if self.unsynced and self.has_room():
            group: list[Watcher] = []
            for w in list(self.unsynced):
                if w.next_rev < store.compact_rev:
                    self._compacted(w, store.compact_rev)
                elif w.next_rev > current:  # nothing left to replay
                    self._resync(w)
                else:
                    group.append(w)
            if group:
                self._replay(group, current)
        self._settled()

    def _settled(self) -> None:
        """Answer a deferred progress request once no watcher is behind."""
        if not self.unsynced and self.progress_wanted:
            self.progress_wanted = False
            self.request_progress()

    def _replay(self, group: list[Watcher], current: int) -> None:
        """Replay one chunk of history for ``group`` (whole revisions), then resync those done."""
        hub = self.hub
        store = hub.store
        limit = hub.limits.catch_up_events
        start = min(w.next_rev for w in group)
        found: dict[Watcher, list[Event]] = {}
        sizes: dict[Watcher, int] = {}
        total = 0
        last = current
        for main in range(start, current + 1):
            recs = store.records_at(main)
            if not recs:
                continue
            if total >= limit or main - start >= hub.limits.catch_up_revisions:
                last = main - 1
                break
            for w in group:
                if main < w.next_rev or main < w.min_rev:
                    continue
                for rec in recs:
                    if w.matches(rec.key) and w.wants(rec):
                        ev = hub.event(rec, w.prev_kv)
                        found.setdefault(w, []).append(ev)
                        cost = _event_cost(ev)
                        sizes[w] = sizes.get(w, 0) + cost
                        total += 1
        header = hub.header(current)
        for w in group:
            evs = found.get(w)
            if evs:
                self.send_events(w, evs, sizes[w], header)
            w.next_rev = max(w.next_rev, last + 1)
            if w.next_rev > current:
                self._resync(w)

    def _resync(self, w: Watcher) -> None:
        self.unsynced.pop(w, None)
        self.hub.add_synced(w)

    def _compacted(self, w: Watcher, compact_rev: int) -> None:
        """etcd's compaction cancel: header revision 0, compact_revision set, no reason."""
        self.unsynced.pop(w, None)
        self.hub.counters_watchers(-1)
        w.compacted = True
        self._reply(WatchResponse(header=self.hub.header(0), watch_id=w.id, canceled=True,
                                  compact_revision=compact_rev))

    def fall_behind(self, w: Watcher, rev: int) -> None:
        """A live revision did not fit: ``w`` catches up from ``rev`` later."""
        self.hub.remove_synced(w)
        w.next_rev = rev
        self.unsynced[w] = None
        self.hub.victims += 1


def _watch_id_field(wid: int) -> bytes:
    """WatchResponse.watch_id (field 2, int64) on the wire; absent when 0, as proto3 encodes it.
    Protobuf parsers accept fields in any order, so it may precede the shared header and events."""
    if wid == 0:
        return b""
    v = wid & 0xFFFFFFFFFFFFFFFF  # negative int64: ten-byte two's complement varint
    out = bytearray(b"\x10")
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def as_response(payload: WatchResponse | bytes) -> WatchResponse:
    """The WatchResponse of an outbox payload (parsing it if it was sent pre-serialized)."""
    return WatchResponse.FromString(payload) if isinstance(payload, bytes) else payload


def _fragments(resp: WatchResponse, limit: int) -> Iterable[WatchResponse]:
    """etcd's sendFragments: fill each part up to ``limit`` bytes (at least one event each);
    every part but the last carries ``fragment=true``."""
    events = list(resp.events)
    i = 0
    while i < len(events):
        part = WatchResponse(header=resp.header, watch_id=resp.watch_id, fragment=True)
        while i < len(events):
            part.events.append(events[i])
            if len(part.events) > 1 and part.ByteSize() >= limit:
                del part.events[-1]
                break
            i += 1
        if i == len(events):
            part.fragment = False
        yield part


@dataclass(eq=False)
class WatchHub:
    """All watch streams of a server; fed by :meth:`publish` after every durable commit.

    ``header(rev)`` builds response headers (identity + revision); ``rev`` is the newest
    published revision.
    """

    store: Store
    header: Callable[[int], rpc_pb2.ResponseHeader]
    limits: Limits = field(default_factory=Limits)
    on_watchers: Callable[[int], None] = lambda delta: None
    buffered: dict[int, int] = field(default_factory=dict)  # per stream: events waiting to be sent
    rev: int = 0
    streams: set[WatchStream] = field(default_factory=set)
    _by_key: dict[bytes, dict[Watcher, None]] = field(default_factory=dict)
    _ranges: dict[Watcher, None] = field(default_factory=dict)
    victims: int = 0  # how often a live revision did not fit a stream's outbox
    events_sent: int = 0

    def __post_init__(self) -> None:
        if not self.rev:
            self.rev = self.store.rev

    def open_stream(self, on_ready: Callable[[], None]) -> WatchStream:
        stream = WatchStream(self, on_ready)
        self.streams.add(stream)
        return stream

    def counters_watchers(self, delta: int) -> None:
        self.on_watchers(delta)

    def add_synced(self, w: Watcher) -> None:
        w.synced = True
        if w.end is None:
            self._by_key.setdefault(w.key, {})[w] = None
        else:
            self._ranges[w] = None

    def remove_synced(self, w: Watcher) -> None:
        if not w.synced:
            return
        w.synced = False
        if w.end is None:
            group = self._by_key.get(w.key)
            if group is not None:
                group.pop(w, None)
                if not group:
                    del self._by_key[w.key]
        else:
            self._ranges.pop(w, None)

    def synced_count(self) -> int:
        return sum(len(g) for g in self._by_key.values()) + len(self._ranges)

    # ------------------------------------------------------------------ events

    def event(self, rec: Record, with_prev: bool) -> Event:
        """The watch event for one record; ``prev_kv`` is the value just before, unless compacted."""
        if rec.tombstone:
            ev = Event(type=DELETE, kv=rec.kv)
        else:
            ev = Event(type=PUT, kv=rec.kv)
        if with_prev and not (not rec.tombstone and rec.kv.create_revision == rec.kv.mod_revision):
            before = rec.main - 1
            if before >= self.store.compact_rev:
                prev = self.store.get(rec.key, before)
                if prev is not None:
                    ev.prev_kv.CopyFrom(prev)
        return ev

    def publish(self, rev: int) -> None:
        """Distribute every revision in (self.rev, rev] to the synced watchers."""
        if rev <= self.rev:
            return
        start, self.rev = self.rev + 1, rev
        if not self._by_key and not self._ranges:
            return
        for main in range(start, rev + 1):
            recs = self.store.records_at(main)
            if recs:
                self._distribute(main, recs)

    def _distribute(self, main: int, recs: list[Record]) -> None:
        found: dict[Watcher, list[Record]] = {}
        by_key = self._by_key
        for rec in recs:
            group = by_key.get(rec.key)
            if group:
                for w in group:
                    if main >= w.min_rev and w.wants(rec):
                        found.setdefault(w, []).append(rec)
        if self._ranges:
            for w in self._ranges:
                if main < w.min_rev:
                    continue
                for rec in recs:
                    if w.matches(rec.key) and w.wants(rec):
                        found.setdefault(w, []).append(rec)
        if not found:
            return
        shared: dict[tuple[int, bool], Event] = {}  # one Event per record and prev_kv choice
        encoded: dict[tuple[int, ...], bytes] = {}  # one serialized header + events per event list
        header = self.header(main)
        frag_limit = self.limits.fragment_bytes
        for w, wrecs in found.items():
            events = []
            size = 0
            for rec in wrecs:
                k = (id(rec), w.prev_kv)
                ev = shared.get(k)
                if ev is None:
                    ev = shared[k] = self.event(rec, w.prev_kv)
                events.append(ev)
                size += _event_cost(ev)
            stream = w.stream
            if stream.fits(len(events), size):
                if w.fragment and len(events) > 1 and size >= frag_limit // 2:
                    stream.send_events(w, events, size, header)  # may need splitting
                else:
                    sig = tuple(id(ev) for ev in events)
                    common = encoded.get(sig)
                    if common is None:
                        common = encoded[sig] = WatchResponse(header=header, events=events).SerializeToString()
                    stream.send_encoded(w, common, len(events), size)
                self.events_sent += len(events)
            else:
                stream.fall_behind(w, main)
                stream.on_ready()

    # ------------------------------------------------------------------ progress

    def progress_tick(self) -> None:
        """etcd's progress ticker: each synced watcher with ``progress_notify`` that sent
        nothing since the last tick gets an empty response at the published revision."""
        for stream in self.streams:
            for w in stream.watchers.values():
                if not w.progress_notify or w.compacted:
                    continue
                if w.synced and not w.sent_since_tick:
                    stream._reply(WatchResponse(header=self.header(self.rev), watch_id=w.id))
                w.sent_since_tick = False
