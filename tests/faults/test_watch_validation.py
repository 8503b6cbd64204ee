"""A randomized workload with many concurrent raw gRPC watchers on overlapping ranges, some starting in
the past, some cancelled and resumed, with compaction running and a SIGKILL + restart of the server in
the middle (every watcher resumes from its last revision + 1). The watch validator then checks every
logical watcher against the history built from the writers' acknowledged responses; violations must
be 0. The counts are printed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from helpers import ServerProcess
from helpers.watch_client import CHANNEL_OPTIONS, RawWatch, StreamEnded
from helpers.watch_validator import History, Report, WatchLog, validate

from coord._pb import rpc_pb2 as pb
from coord._pb import rpc_pb2_grpc as pbg

KEYS = [b"w/%d" % i for i in range(12)] + [b"x/%d" % i for i in range(4)]
RANGES = [(b"w/1", b""), (b"w/3", b""), (b"w/", b"w0"), (b"w/2", b"w/8"), (b"", b"\x00"), (b"x/", b"x0"),
          (b"w/5", b"\x00")]


@dataclass
class Stream:
    watch: RawWatch
    logs: dict[int, WatchLog] = field(default_factory=dict)
    created: set[int] = field(default_factory=set)
    next_id: int = 1

    def route(self, responses: list[pb.WatchResponse]) -> None:
        for r in responses:
            if r.watch_id == -1:
                for wid, log in self.logs.items():
                    if wid in self.created:
                        log.responses.append(r)
                continue
            log = self.logs[r.watch_id]
            log.responses.append(r)
            if r.created:
                self.created.add(r.watch_id)
                if not log.resolved_start:
                    log.resolved_start = log.start_revision or r.header.revision + 1
            if r.canceled:
                if r.compact_revision:
                    log.compacted_at = r.compact_revision
                del self.logs[r.watch_id]
                self.created.discard(r.watch_id)

    def start(self, log: WatchLog) -> None:
        wid = self.next_id
        self.next_id += 1
        self.logs[wid] = log
        filters = ([pb.WatchCreateRequest.NOPUT] if log.no_put else []) + (
            [pb.WatchCreateRequest.NODELETE] if log.no_delete else [])
        self.watch.create(log.key, log.range_end, start_revision=log.start_revision, filters=filters,
                          prev_kv=log.prev_kv, watch_id=wid)


class Workload:
    def __init__(self, server: ServerProcess, seed: int) -> None:
        self.server = server
        self.rnd = random.Random(seed)
        self.history = History()
        self.all_logs: list[WatchLog] = []
        self.streams: list[Stream] = []
        self._connect()

    def _connect(self) -> None:
        self.channel = grpc.insecure_channel(self.server.endpoint, options=CHANNEL_OPTIONS)
        self.kv = pbg.KVStub(self.channel)

    # -- writes (every one with prev_kv, so the history is exact)

    def write(self) -> None:
        r = self.rnd.random()
        key = self.rnd.choice(KEYS)
        if r < 0.65:
            value = b"%d" % self.rnd.randrange(10**6)
            resp = self.kv.Put(pb.PutRequest(key=key, value=value, prev_kv=True), timeout=10)
            self.history.put(resp.header.revision, key, value, resp.prev_kv if resp.HasField("prev_kv") else None)
        elif r < 0.8:
            span = self.rnd.choice(RANGES[2:]) if r < 0.7 else (key, b"")
            dresp = self.kv.DeleteRange(pb.DeleteRangeRequest(key=span[0] or b"\x00", range_end=span[1], prev_kv=True),
                                        timeout=10)
            if dresp.deleted:
                self.history.delete(dresp.header.revision, dresp.prev_kvs)
        else:
            keys = self.rnd.sample(KEYS, self.rnd.randint(2, 4))
            ops = [pb.RequestOp(request_put=pb.PutRequest(key=k, value=b"t", prev_kv=True)) for k in keys]
            tresp = self.kv.Txn(pb.TxnRequest(success=ops), timeout=10)
            for k, sub in zip(keys, tresp.responses, strict=True):
                p = sub.response_put
                self.history.put(tresp.header.revision, k, b"t", p.prev_kv if p.HasField("prev_kv") else None)

    def current(self) -> int:
        return int(self.kv.Range(pb.RangeRequest(key=b"w/0"), timeout=10).header.revision)

    def compact(self) -> None:
        rev = self.current() - self.rnd.randint(5, 40)
        if rev > max(self.history.compactions, default=1):
            self.kv.Compact(pb.CompactionRequest(revision=rev), timeout=10)
            self.history.compactions.append(rev)

    # -- watchers

    def new_stream(self) -> Stream:
        s = Stream(RawWatch(self.channel))
        self.streams.append(s)
        return s

    def new_watcher(self) -> None:
        span = self.rnd.choice(RANGES)
        kind = self.rnd.random()
        cur = self.current()
        start = 0 if kind < 0.5 else max(1, cur - self.rnd.randint(0, 60)) if kind < 0.9 else cur + 3
        log = WatchLog(key=span[0], range_end=span[1], start_revision=start, no_put=self.rnd.random() < 0.1,
                       no_delete=self.rnd.random() < 0.1, prev_kv=self.rnd.random() < 0.5)
        self.all_logs.append(log)
        self.rnd.choice(self.streams).start(log)

    def poll(self) -> None:
        for s in self.streams:
            s.route(s.watch.poll())

    def cancel_and_resume(self) -> None:
        s = self.rnd.choice(self.streams)
        ready = [wid for wid in s.logs if wid in s.created]
        if not ready:
            return
        wid = self.rnd.choice(ready)
        log = s.logs[wid]
        s.watch.cancel(wid)
        while wid in s.logs:  # everything before the cancel reply belongs to this watcher
            s.route([s.watch.recv()])
        log.start_revision = log.next_start()
        self.rnd.choice(self.streams).start(log)

    def settle(self) -> None:
        """Ask every stream for a bookmark and read up to it: all watchers are then complete to it."""
        for s in self.streams:
            s.watch.progress()
        for s in self.streams:
            while True:
                r = s.watch.recv(timeout=30)
                s.route([r])
                if r.watch_id == -1:
                    break

    def crash_and_restart(self) -> None:
        self.poll()
        self.server.kill()
        for s in self.streams:
            try:
                s.route(s.watch.poll())
                s.watch.ended(timeout=30)
            except StreamEnded:
                pass
            s.watch.close()
        self.channel.close()
        self.server.restart()
        self._connect()
        old = self.streams
        self.streams = []
        for _ in old:
            self.new_stream()
        for s in old:
            for log in s.logs.values():
                log.start_revision = log.next_start()
                self.rnd.choice(self.streams).start(log)

    def close(self) -> None:
        for s in self.streams:
            s.watch.close()
        self.channel.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_watchers_survive_compaction_cancels_and_a_crash(server_factory: Any, seed: int) -> None:
    srv = server_factory("coord").start()
    wl = Workload(srv, seed)
    try:
        for _ in range(6):
            wl.new_stream()
        for _ in range(12):
            wl.new_watcher()
        for step in range(700):
            wl.write()
            if step % 25 == 0:
                wl.new_watcher()
            if step % 40 == 20:
                wl.cancel_and_resume()
            if step % 150 == 149:
                wl.compact()
            if step % 10 == 0:
                wl.poll()
            if step == 350:
                wl.crash_and_restart()
        wl.settle()
        report = validate(wl.all_logs, wl.history, Report())
    finally:
        wl.close()
    print(f"seed {seed}: {report.summary()} compactions={len(wl.history.compactions)}")
    assert report.total == 0, "\n".join(report.examples)
    assert report.events > 1000 and report.progress_notifications >= len(wl.all_logs) // 2
