"""Watch on the wire, differential: the same raw gRPC watch scenarios against a real etcd 3.4.23 and
coord-server, every response compared (headers reduced to their revision: IDs and terms differ).

One etcd and one coord-server serve the whole module (both with --max-request-bytes=20000, so that
fragmentation is reachable, and a 1 s progress-notify interval); every scenario runs against both in
the same order, so revisions line up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from helpers import CoordServerProcess, EtcdProcess, ServerProcess, start_all
from helpers.watch_client import CHANNEL_OPTIONS, RawWatch, StreamEnded

from coord._pb import rpc_pb2 as pb
from coord._pb import rpc_pb2_grpc as pbg

FLAGS = ["--max-request-bytes=20000", "--experimental-watch-progress-notify-interval=1s"]
NOPUT = pb.WatchCreateRequest.NOPUT
NODELETE = pb.WatchCreateRequest.NODELETE


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, etcd_binary: str) -> Iterator[tuple[ServerProcess, ...]]:
    base = Path(tmp_path_factory.mktemp("watch-wire"))
    servers = (EtcdProcess(base / "etcd", binary=etcd_binary, extra_args=FLAGS),
               CoordServerProcess(base / "coord", extra_args=FLAGS))
    start_all(servers)
    try:
        yield servers
    finally:
        for srv in servers:
            srv.stop()


def show(resp: pb.WatchResponse) -> str:
    """A response without what must differ between servers (cluster/member IDs, raft term)."""
    flags = [name for name in ("created", "canceled", "fragment") if getattr(resp, name)]
    parts = [f"id={resp.watch_id}", f"rev={resp.header.revision}", *flags]
    if resp.compact_revision:
        parts.append(f"compact={resp.compact_revision}")
    if resp.cancel_reason:
        parts.append(f"reason={resp.cancel_reason!r}")
    for ev in resp.events:
        kv = ev.kv
        text = (f"{'PUT' if ev.type == 0 else 'DELETE'} {kv.key!r}={kv.value[:20]!r}"
                f"(c{kv.create_revision} m{kv.mod_revision} v{kv.version} l{kv.lease})")
        if ev.HasField("prev_kv"):
            text += f" prev={ev.prev_kv.value[:20]!r}@{ev.prev_kv.mod_revision}"
        parts.append(text)
    return " ".join(parts)


class Ctx:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(server.endpoint, options=CHANNEL_OPTIONS)
        self.kv = pbg.KVStub(self.channel)
        self.out: list[str] = []

    def put(self, key: bytes, value: bytes = b"v") -> int:
        return int(self.kv.Put(pb.PutRequest(key=key, value=value), timeout=10).header.revision)

    def delete(self, key: bytes, end: bytes = b"") -> int:
        return int(self.kv.DeleteRange(pb.DeleteRangeRequest(key=key, range_end=end), timeout=10).header.revision)

    def txn(self, *ops: pb.RequestOp) -> int:
        return int(self.kv.Txn(pb.TxnRequest(success=list(ops)), timeout=10).header.revision)

    def compact(self, rev: int) -> None:
        self.kv.Compact(pb.CompactionRequest(revision=rev, physical=True), timeout=10)

    def rev(self) -> int:
        return int(self.kv.Range(pb.RangeRequest(key=b"x"), timeout=10).header.revision)

    def watch(self) -> RawWatch:
        return RawWatch(self.channel)

    def note(self, *resps: pb.WatchResponse) -> None:
        self.out.extend(show(r) for r in resps)

    def note_unordered(self, *resps: pb.WatchResponse) -> None:
        """Responses of several watchers: etcd orders them per watcher only, so group them by watcher."""
        self.out.extend(show(r) for r in sorted(resps, key=lambda r: r.watch_id))


def put_op(key: bytes, value: bytes = b"v") -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value))


def del_op(key: bytes, end: bytes = b"") -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=end))


# ---------------------------------------------------------------------------------------------------
# scenarios: each drives one server and records what it saw


def ids_and_duplicates(c: Ctx) -> None:
    with c.watch() as w:
        for kw in ({}, {}, {"watch_id": 7}, {}, {"watch_id": 2}, {}, {"watch_id": 7}, {"watch_id": -3}):
            w.create(b"ids/a", **kw)
            c.note(w.recv())


def empty_ranges_and_key_forms(c: Ctx) -> None:
    with c.watch() as w:
        w.create(b"b", b"a")
        w.create(b"b", b"b")
        w.create(b"", b"\x00")  # everything
        w.create(b"form/", b"form0")  # a prefix
        w.create(b"form/k", b"\x00")  # from a key on
        c.note(*(w.recv() for _ in range(5)))
        c.put(b"form/k1")
        c.put(b"zzz-form")
        # form/k1: all, prefix and from-key; zzz-form: all and from-key
        c.note_unordered(*(w.recv() for _ in range(5)))
        w.progress()
        c.note(w.recv())  # nothing else came


def live_events_txn_and_deletes(c: Ctx) -> None:
    with c.watch() as w:
        w.create(b"live/", b"live0", prev_kv=True)
        c.note(w.recv())
        c.put(b"live/a", b"1")
        c.txn(put_op(b"live/b", b"2"), put_op(b"live/c", b"3"), put_op(b"other", b"x"))
        c.put(b"live/a", b"4")
        c.delete(b"live/", b"live0")
        c.delete(b"live/none")  # no-op: no revision, no event
        c.put(b"live/z")
        c.note(*(w.recv() for _ in range(5)))


def filters(c: Ctx) -> None:
    with c.watch() as w:
        w.create(b"flt/", b"flt0", filters=[NOPUT], watch_id=1)
        w.create(b"flt/", b"flt0", filters=[NODELETE], watch_id=2)
        w.create(b"flt/", b"flt0", filters=[NOPUT, NODELETE], watch_id=3)
        c.note(*(w.recv() for _ in range(3)))
        c.put(b"flt/a")
        c.delete(b"flt/a")
        c.txn(put_op(b"flt/b"), del_op(b"flt/c"))
        c.note_unordered(*(w.recv() for _ in range(3)))
        w.progress()
        c.note(w.recv())  # nothing for watcher 3, then the bookmark


def past_start_and_future_start(c: Ctx) -> None:
    first = c.put(b"past/k", b"1")
    c.put(b"past/k", b"2")
    c.delete(b"past/k")
    c.put(b"past/k", b"3")
    with c.watch() as w:
        w.create(b"past/k", start_revision=first, prev_kv=True)
        c.note(w.recv(), w.recv())  # created, then the replay in one response (header = current)
        w.create(b"past/k", start_revision=c.rev() + 2, watch_id=9)
        c.note(w.recv())
        c.put(b"past/k", b"4")  # below the future start: only watcher 0
        c.put(b"past/k", b"5")
        c.note_unordered(*(w.recv() for _ in range(3)))


def cancel_known_unknown_and_progress(c: Ctx) -> None:
    with c.watch() as w:
        w.create(b"cx/a")
        c.note(w.recv())
        w.cancel(42)  # unknown: no reply at all
        w.progress()
        c.note(w.recv())
        w.cancel(0)
        c.note(w.recv())
        w.send(pb.WatchRequest())  # empty request: ignored
        c.put(b"cx/a")  # cancelled: nothing
        w.progress()
        c.note(w.recv())


def compacted_start(c: Ctx) -> None:
    for i in range(3):
        c.put(b"cmp/k", b"%d" % i)
    at = c.put(b"cmp/k", b"x")
    c.compact(at)
    with c.watch() as w:
        w.create(b"cmp/k", start_revision=at - 2)
        c.note(w.recv(), w.recv())  # created, then the compaction cancel (header revision 0)
        w.create(b"cmp/k")
        c.note(w.recv())  # id 0 is still taken by the compacted watcher
        w.cancel(0)
        w.progress()
        c.note(*w.recv_until(lambda r: r.watch_id == -1))
        w.create(b"cmp/k", start_revision=at + 1)
        c.note(w.recv())


def fragments(c: Ctx) -> None:
    # 40 values of 15 kB: a catch-up response of 600 kB, above max-request-bytes + 512 KiB
    first = 0
    for i in range(40):
        rev = c.put(b"frag/%02d" % i, bytes([65 + i % 26]) * 15000)
        first = first or rev
    with c.watch() as w:
        w.create(b"frag/", b"frag0", start_revision=first, fragment=True)
        w.create(b"frag/", b"frag0", start_revision=first, watch_id=5)
        done: set[int] = set()
        got = []
        while done != {0, 5}:
            r = w.recv()
            got.append(r)
            if not r.fragment and not r.created:
                done.add(r.watch_id)
        c.note_unordered(*got)


def progress_notify(c: Ctx) -> None:
    with c.watch() as w:
        w.create(b"pn/a", progress_notify=True)
        c.note(w.recv())
        c.note(w.recv(timeout=15))  # within an interval (1 s + jitter): empty, header = current
        c.put(b"pn/a")
        resp = w.recv(timeout=15)
        c.note(resp)


def half_close_keeps_the_stream(c: Ctx) -> None:
    with c.watch() as w:
        w.create(b"hc/a")
        c.note(w.recv())
        w.half_close()
        time.sleep(0.2)
        c.put(b"hc/a")
        c.note(w.recv())


SCENARIOS: list[Callable[[Ctx], None]] = [
    ids_and_duplicates,
    empty_ranges_and_key_forms,
    live_events_txn_and_deletes,
    filters,
    past_start_and_future_start,
    cancel_known_unknown_and_progress,
    compacted_start,
    fragments,
    progress_notify,
    half_close_keeps_the_stream,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_watch_wire_matches_etcd(pair: tuple[ServerProcess, ...], scenario: Callable[[Ctx], None]) -> None:
    transcripts = []
    for srv in pair:
        ctx = Ctx(srv)
        try:
            scenario(ctx)
        except StreamEnded as exc:
            pytest.fail(f"{srv.kind}: stream ended: {exc}")
        finally:
            ctx.channel.close()
        transcripts.append(ctx.out)
    etcd_out, coord_out = transcripts
    assert coord_out == etcd_out


def test_oversized_watch_request_ends_the_stream(pair: tuple[ServerProcess, ...]) -> None:
    for srv in pair:
        with RawWatch(srv.endpoint) as w:
            w.create(b"big", b"\xff" * (3 * 1024 * 1024))
            err = w.ended().error
            assert err is not None
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, srv.kind
            assert "grpc: received message larger than max" in (err.details() or ""), srv.kind


