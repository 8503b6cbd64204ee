"""R1: durability under SIGKILL.

A writer workload (8 client threads, grpcio, put / delete / txn on 100 keys, plus reads) runs against a
real coord-server process that is SIGKILLed at a random moment after each (re)start. After every restart:

- every acknowledged write is in the history at its revision (``Range(key, revision=r)`` shows exactly
  what the write did) and the current value of each key is explained by the writes: it equals the last
  acknowledged write of this cycle, or the state before the cycle, or, only where a write whose outcome
  is unknown (an error, a timeout, a dropped connection) touched the key, that write's value;
- no value that no client ever attempted appears (phantom);
- the revision never goes backwards: the head after a restart is >= every acknowledged revision and
  every revision a read reported, and ``HashKV`` at the previous head is unchanged (history up to the
  old head is immutable: R1's "events <= the old head revision are byte-identical");
- every read is repeatable: the same range at the read's header revision returns the same key-values, so
  no read observed a write that was later lost.

SIGKILL keeps the page cache, so this cannot catch a missing fsync (test_sync.py does that); it catches
acknowledging before commit, publishing uncommitted revisions, and recovery bugs.

``COORD_CRASH_SEED`` replays a run; ``COORD_CRASH_CYCLES`` overrides the number of cycles.
Counts are printed (``-s`` shows them); the history of each run is written to ``history.jsonl`` in the
test's temp directory, which pytest keeps for the last runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from coord._pb import kv_pb2, rpc_pb2, rpc_pb2_grpc

from ._server import ServerProcess, running_server

N_KEYS = 100
N_WORKERS = 8
PREFIX = b"crash/"
PREFIX_END = b"crash0"  # prefix + 1
KEYS = [PREFIX + b"k%03d" % i for i in range(N_KEYS)]
RPC_TIMEOUT = 5.0

# Status codes a crash cannot explain: the server refused a valid request.
REJECTIONS = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED", "UNKNOWN",
              "UNIMPLEMENTED", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "DATA_LOSS"}


@dataclass
class Op:
    """One write as the client saw it. ``effects`` is what it does to each key if it takes effect
    (value, or None for a delete); a txn has two branches and takes exactly one if it takes effect."""

    id: int
    cycle: int
    worker: int
    kind: str  # "put" | "delete" | "txn"
    effects: dict[bytes, bytes | None]
    alt_effects: dict[bytes, bytes | None] | None = None  # txn failure branch
    status: str = "pending"  # "acked" | "indeterminate"
    revision: int = 0
    succeeded: bool | None = None  # txn branch taken
    deleted: int = 0  # delete: how many keys it deleted
    error: str = ""
    t_start: float = 0.0
    t_end: float = 0.0

    def applied_effects(self) -> dict[bytes, bytes | None]:
        """The effects of an acknowledged op."""
        if self.kind == "txn" and not self.succeeded:
            assert self.alt_effects is not None
            return self.alt_effects
        return self.effects

    def possible_effects(self) -> Iterable[tuple[bytes, bytes | None]]:
        """Every (key, value) the op might have produced."""
        yield from self.effects.items()
        if self.alt_effects:
            yield from self.alt_effects.items()

    def creates_revision(self) -> bool:
        """Whether an acknowledged op got a revision of its own."""
        return self.kind != "delete" or self.deleted > 0


@dataclass
class Read:
    cycle: int
    key: bytes
    range_end: bytes
    header_rev: int
    kvs: list[bytes]  # serialized KeyValues, in order


@dataclass
class History:
    seed: int
    ops: list[Op] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    attempted: dict[tuple[bytes, bytes], Op] = field(default_factory=dict)  # (key, value) -> op
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_id: int = 0

    def new_op(self, cycle: int, worker: int, kind: str, effects: dict[bytes, bytes | None],
               alt: dict[bytes, bytes | None] | None = None) -> Op:
        with self.lock:
            op = Op(self.next_id, cycle, worker, kind, effects, alt)
            self.next_id += 1
            self.ops.append(op)
            for k, v in op.possible_effects():
                if v is not None:
                    assert (k, v) not in self.attempted, "values must be unique"
                    self.attempted[(k, v)] = op
        return op

    def add_read(self, read: Read) -> None:
        with self.lock:
            self.reads.append(read)


@dataclass
class Counts:
    acked: int = 0
    acked_effects: int = 0
    indeterminate: int = 0
    indeterminate_visible: int = 0
    reads: int = 0
    lost: int = 0
    phantom: int = 0
    rev_regressions: int = 0
    history_changed: int = 0
    duplicate_revisions: int = 0

    def add(self, other: Counts) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def bad(self) -> int:
        return self.lost + self.phantom + self.rev_regressions + self.history_changed + self.duplicate_revisions


# --------------------------------------------------------------------------------------------------
# workload


def _worker(history: History, kv: rpc_pb2_grpc.KVStub, cycle: int, worker: int, rng: random.Random,
            stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        tag = f"{history.seed}:{cycle}:{worker}:{n}"
        r = rng.random()
        if r < 0.25:
            if not _read(history, kv, cycle, rng):
                return
            continue
        if r < 0.60:
            key = rng.choice(KEYS)
            value = f"{tag}:{key.decode()}".encode()
            op = history.new_op(cycle, worker, "put", {key: value})
            call = functools.partial(kv.Put, rpc_pb2.PutRequest(key=key, value=value), timeout=RPC_TIMEOUT)
        elif r < 0.72:
            key = rng.choice(KEYS)
            op = history.new_op(cycle, worker, "delete", {key: None})
            call = functools.partial(kv.DeleteRange, rpc_pb2.DeleteRangeRequest(key=key), timeout=RPC_TIMEOUT)
        else:
            k0, k1, k2 = rng.sample(KEYS, 3)
            ok = {k0: f"{tag}:{k0.decode()}:s".encode(),
                  k1: None if rng.random() < 0.3 else f"{tag}:{k1.decode()}:s".encode()}
            alt = {k0: f"{tag}:{k0.decode()}:f".encode(), k2: None}
            op = history.new_op(cycle, worker, "txn", ok, alt)
            req = rpc_pb2.TxnRequest(
                compare=[rpc_pb2.Compare(key=k0, target=rpc_pb2.Compare.VERSION,
                                         result=rpc_pb2.Compare.GREATER, version=0)],
                success=[_req_op(k, v) for k, v in ok.items()],
                failure=[_req_op(k, v) for k, v in alt.items()])
            call = functools.partial(kv.Txn, req, timeout=RPC_TIMEOUT)
        op.t_start = time.monotonic()
        try:
            resp = call()
        except grpc.RpcError as exc:
            op.t_end = time.monotonic()
            op.status = "indeterminate"
            op.error = f"{exc.code().name}: {exc.details()}"
            return  # only the kill makes calls fail: this worker's part of the cycle is over
        op.t_end = time.monotonic()
        op.revision = int(resp.header.revision)
        if op.kind == "txn":
            op.succeeded = bool(resp.succeeded)
        elif op.kind == "delete":
            op.deleted = int(resp.deleted)
        op.status = "acked"


def _req_op(key: bytes, value: bytes | None) -> rpc_pb2.RequestOp:
    if value is None:
        return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value))


def _read(history: History, kv: rpc_pb2_grpc.KVStub, cycle: int, rng: random.Random) -> bool:
    if rng.random() < 0.8:
        key, end = rng.choice(KEYS), b""
    else:
        key, end = PREFIX, PREFIX_END
    try:
        resp = kv.Range(rpc_pb2.RangeRequest(key=key, range_end=end), timeout=RPC_TIMEOUT)
    except grpc.RpcError:
        return False
    history.add_read(Read(cycle, key, end, int(resp.header.revision),
                          [kv_.SerializeToString(deterministic=True) for kv_ in resp.kvs]))
    return True


def run_cycle(history: History, srv: ServerProcess, cycle: int, rng: random.Random,
              kill_after: tuple[float, float]) -> float:
    """Run the workload against ``srv`` and SIGKILL it at a random moment; returns the delay used."""
    stop = threading.Event()
    delay = rng.uniform(*kill_after)
    with srv.channel() as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        threads = [threading.Thread(target=_worker, name=f"crash-worker-{w}",
                                    args=(history, kv, cycle, w, random.Random(rng.getrandbits(64)), stop))
                   for w in range(N_WORKERS)]
        for t in threads:
            t.start()
        try:
            time.sleep(delay)
            srv.kill()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=2 * RPC_TIMEOUT + 5)
        assert not any(t.is_alive() for t in threads), "a worker is stuck"
    for op in history.ops:
        if op.cycle == cycle and op.status == "pending":  # cannot happen: every call returns or raises
            op.status = "indeterminate"
            op.error = "never returned"
    return delay


# --------------------------------------------------------------------------------------------------
# verification


@dataclass
class Verifier:
    history: History
    problems: list[str] = field(default_factory=list)
    # the state verified at the previous restart: key -> (value, mod_revision)
    baseline: dict[bytes, tuple[bytes | None, int]] = field(
        default_factory=lambda: {k: (None, 0) for k in KEYS})
    max_seen_rev: int = 0
    prev_head: int = 0
    prev_hash: tuple[int, int] | None = None  # (revision, HashKV at it)
    revisions: dict[int, Op] = field(default_factory=dict)

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(text)

    def verify(self, kv: rpc_pb2_grpc.KVStub, maint: rpc_pb2_grpc.MaintenanceStub,
               cycles: set[int], *, pool: ThreadPoolExecutor, check_state: bool = True) -> Counts:
        """Check the restarted server against everything done in ``cycles``; returns this pass's counts.

        ``check_state`` (steps 2 and 5) compares with the state verified at the previous call, so it is
        only meaningful for the cycle(s) since then; the other checks hold for any set of cycles.
        """
        c = Counts()
        cur = kv.Range(rpc_pb2.RangeRequest(key=PREFIX, range_end=PREFIX_END), timeout=30)
        head = int(cur.header.revision)
        current = {k: (None, 0) for k in KEYS}
        for item in cur.kvs:
            current[bytes(item.key)] = (bytes(item.value), int(item.mod_revision))

        ops = [op for op in self.history.ops if op.cycle in cycles]
        reads = [r for r in self.history.reads if r.cycle in cycles]
        acked = [op for op in ops if op.status == "acked"]
        c.acked = len(acked)
        c.indeterminate = sum(op.status == "indeterminate" for op in ops)
        c.reads = len(reads)

        # 1. the revision never goes backwards
        seen = max([op.revision for op in acked] + [r.header_rev for r in reads] + [self.max_seen_rev])
        self.max_seen_rev = max(self.max_seen_rev, seen)
        if head < self.max_seen_rev or head < self.prev_head:
            c.rev_regressions += 1
            self.problem(f"head {head} after restart < max acknowledged/observed {self.max_seen_rev} "
                         f"or previous head {self.prev_head}")
        for op in acked:
            if op.creates_revision():
                other = self.revisions.setdefault(op.revision, op)
                if other is not op:
                    c.duplicate_revisions += 1
                    self.problem(f"ops {other.id} and {op.id} both acknowledged at revision {op.revision}")

        # 2. history up to the previous head is unchanged
        if check_state and self.prev_hash is not None:
            rev, h = self.prev_hash
            now = maint.HashKV(rpc_pb2.HashKVRequest(revision=rev), timeout=30).hash
            if now != h:
                c.history_changed += 1
                self.problem(f"HashKV at revision {rev} changed across restart: {h} -> {now}")

        # 3. every acknowledged write is in the history at its revision
        checks = [(op, k, v) for op in acked for k, v in op.applied_effects().items()]
        c.acked_effects = len(checks)

        def check_write(item: tuple[Op, bytes, bytes | None]) -> str | None:
            op, key, value = item
            if op.revision > head:
                return f"op {op.id} acknowledged at revision {op.revision} > head {head}"
            resp = kv.Range(rpc_pb2.RangeRequest(key=key, revision=op.revision), timeout=30)
            got = (bytes(resp.kvs[0].value), int(resp.kvs[0].mod_revision)) if resp.kvs else None
            if value is None:
                if got is not None:
                    return f"op {op.id} ({op.kind}) deleted {key!r} at {op.revision}; history has {got}"
            elif got != (value, op.revision):
                return f"op {op.id} ({op.kind}) put {key!r}={value!r} at {op.revision}; history has {got}"
            return None

        for msg in pool.map(check_write, checks):
            if msg:
                c.lost += 1
                self.problem("LOST: " + msg)

        # 4. every read is repeatable at its revision
        def check_read(r: Read) -> str | None:
            if r.header_rev > head:
                return f"read of {r.key!r} saw revision {r.header_rev} > head {head}"
            resp = kv.Range(rpc_pb2.RangeRequest(key=r.key, range_end=r.range_end, revision=r.header_rev),
                            timeout=30)
            now = [x.SerializeToString(deterministic=True) for x in resp.kvs]
            if now != r.kvs:
                return (f"read of {r.key!r}..{r.range_end!r} at {r.header_rev} saw "
                        f"{_short(r.kvs)}, now {_short(now)}")
            return None

        for msg in pool.map(check_read, reads):
            if msg:
                c.lost += 1
                self.problem("READ NOT REPEATABLE: " + msg)

        if not check_state:
            return c

        # 5. the current state is explained by the writes (only the cycles since the previous check)
        last_acked: dict[bytes, Op] = {}
        maybe: dict[bytes, dict[bytes | None, Op]] = {k: {} for k in KEYS}
        for op in sorted(acked, key=lambda o: o.revision):
            for k in op.applied_effects():
                last_acked[k] = op
        for op in ops:
            if op.status == "indeterminate":
                for k, v in op.possible_effects():
                    maybe[k][v] = op
        for key in KEYS:
            value, mod = current[key]
            if value is not None and (key, value) not in self.history.attempted:
                c.phantom += 1
                self.problem(f"PHANTOM: {key!r}={value!r} (mod {mod}) was never attempted")
                continue
            if key in last_acked:
                a = last_acked[key]
                want = a.applied_effects()[key]
                if want is None and value is None:
                    continue
                if want is not None and (value, mod) == (want, a.revision):
                    continue
                floor = a.revision
            else:
                if (value, mod) == self.baseline[key]:
                    continue
                floor = self.baseline[key][1]
            # Not the last acknowledged state: only a later write of unknown outcome may explain it.
            if value is None and None in maybe[key]:
                c.indeterminate_visible += 1
                continue
            if value is not None and value in maybe[key] and mod > floor:
                c.indeterminate_visible += 1
                continue
            c.lost += 1
            writer = self.history.attempted.get((key, value)) if value is not None else None
            self.problem(f"LOST: {key!r} is {value!r} (mod {mod}, by op {writer.id if writer else '-'}); "
                         f"expected the write of op {last_acked[key].id if key in last_acked else '-'} "
                         f"or baseline {self.baseline[key]}")

        self.baseline = current
        self.prev_head = max(self.prev_head, head)
        self.prev_hash = (head, maint.HashKV(rpc_pb2.HashKVRequest(revision=head), timeout=30).hash)
        return c


def _short(kvs: list[bytes]) -> str:
    items = [kv_pb2.KeyValue.FromString(b) for b in kvs]
    text = ", ".join(f"{x.key.decode()}={x.value.decode()}@{x.mod_revision}" for x in items[:5])
    return f"[{text}{', ...' if len(items) > 5 else ''}] ({len(items)} kvs)"


def _dump(history: History, path: Path) -> None:
    with open(path, "w") as f:
        for op in history.ops:
            d = dataclasses.asdict(op)
            d["effects"] = {k.decode(): v.decode() if v else None for k, v in op.effects.items()}
            d["alt_effects"] = ({k.decode(): v.decode() if v else None for k, v in op.alt_effects.items()}
                                if op.alt_effects else None)
            f.write(json.dumps({"op": d}) + "\n")
        for r in history.reads:
            f.write(json.dumps({"read": {"cycle": r.cycle, "key": r.key.decode(), "end": r.range_end.decode(),
                                         "rev": r.header_rev, "n": len(r.kvs)}}) + "\n")


# --------------------------------------------------------------------------------------------------
# the test


def crash_run(tmp_path: Path, *, cycles: int, kill_after: tuple[float, float], early_kill: float) -> None:
    """``cycles`` workload cycles, each ended by SIGKILL ``kill_after`` seconds after the workload started
    on a freshly (re)started server; with probability ``early_kill`` a restart is itself SIGKILLed
    0-0.8 s after spawning (during start-up and recovery) before the restart that is verified."""
    seed = int(os.environ.get("COORD_CRASH_SEED") or random.SystemRandom().getrandbits(32))
    cycles = int(os.environ.get("COORD_CRASH_CYCLES") or cycles)
    print(f"\n[crash] seed={seed} cycles={cycles} kill_after={kill_after} "
          f"(replay: COORD_CRASH_SEED={seed} COORD_CRASH_CYCLES={cycles})")
    rng = random.Random(seed)
    history = History(seed)
    verifier = Verifier(history)
    total = Counts()
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    t0 = time.monotonic()
    startup: list[float] = []
    srv: ServerProcess | None = None
    delay = 0.0
    early_kills = 0
    try:
        with ThreadPoolExecutor(8) as pool:
            srv = ServerProcess(data_dir, log).start()
            startup.append(srv.wait_ready())
            for cycle in range(cycles + 1):
                if cycle > 0:
                    # restart on the same data dir (new port) and check everything done since the last check
                    if rng.random() < early_kill:
                        # Also crash the recovery itself (log replay, backend commit) now and then.
                        srv = ServerProcess(data_dir, log).start()
                        time.sleep(rng.uniform(0.0, 0.8))
                        srv.kill()
                        early_kills += 1
                    srv = ServerProcess(data_dir, log).start()
                    startup.append(srv.wait_ready())
                    with srv.channel() as ch:
                        counts = verifier.verify(rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.MaintenanceStub(ch),
                                                 {cycle - 1}, pool=pool)
                    total.add(counts)
                    print(f"[crash] cycle {cycle - 1}: killed after {delay:.2f}s, acked={counts.acked} "
                          f"indeterminate={counts.indeterminate} (visible {counts.indeterminate_visible}) "
                          f"reads={counts.reads} lost={counts.lost} phantom={counts.phantom} "
                          f"rev_regressions={counts.rev_regressions} history_changed={counts.history_changed}"
                          f" head={verifier.prev_head}")
                    assert not verifier.problems, "\n".join(verifier.problems[:30])
                if cycle == cycles:
                    break
                delay = run_cycle(history, srv, cycle, rng, kill_after)
            # A final full pass: nothing acknowledged or read in any cycle was lost later.
            with srv.channel() as ch:
                final = Verifier(history, max_seen_rev=verifier.max_seen_rev, prev_head=verifier.prev_head)
                final_counts = final.verify(rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.MaintenanceStub(ch),
                                            set(range(cycles)), pool=pool, check_state=False)
            srv.kill()
    finally:
        if srv is not None:
            srv.kill()
        _dump(history, tmp_path / "history.jsonl")
    elapsed = time.monotonic() - t0
    errors = Counter(op.error.split(":")[0] for op in history.ops if op.status == "indeterminate")
    print(f"[crash] seed={seed} cycles={cycles} early_kills={early_kills} elapsed={elapsed:.1f}s "
          f"startup avg={sum(startup) / len(startup):.2f}s max={max(startup):.2f}s")
    print(f"[crash] TOTAL acked={total.acked} (key effects {total.acked_effects}) "
          f"indeterminate={total.indeterminate} (visible after restart {total.indeterminate_visible}; "
          f"errors {dict(errors)}) reads={total.reads} lost={total.lost} phantom={total.phantom} "
          f"rev_regressions={total.rev_regressions} history_changed={total.history_changed} "
          f"duplicate_revisions={total.duplicate_revisions} final_head={verifier.prev_head}")
    print(f"[crash] final re-check of all cycles: lost={final_counts.lost} phantom={final_counts.phantom} "
          f"rev_regressions={final_counts.rev_regressions}; history in {tmp_path / 'history.jsonl'}")
    rejected = {c: n for c, n in errors.items() if c in REJECTIONS}
    assert not rejected, f"the server rejected valid requests (not a crash effect): {rejected}"
    assert not final.problems, "\n".join(final.problems[:30])
    assert total.bad() == 0, "\n".join(verifier.problems[:30])
    assert total.acked >= cycles, f"workload made too little progress: {total.acked} acknowledged writes"
    assert total.acked_effects > 0 and total.reads > 0


@pytest.mark.timeout(120)
def test_sigkill_durability(tmp_path: Path) -> None:
    """CI variant: 12 cycles, SIGKILL 0.2-1.5 s after each (re)start (plus ~20% kills during recovery)."""
    crash_run(tmp_path, cycles=12, kill_after=(0.2, 1.5), early_kill=0.2)


@pytest.mark.soak
@pytest.mark.timeout(4 * 3600)
def test_sigkill_durability_soak(tmp_path: Path) -> None:
    """Soak: 500 cycles (R1's soak size), SIGKILL 0.2-3 s after each restart."""
    crash_run(tmp_path, cycles=500, kill_after=(0.2, 3.0), early_kill=0.2)


@pytest.mark.timeout(60)
def test_checker_detects_violations(tmp_path: Path) -> None:
    """The verifier is not vacuous: each kind of violation planted in a real history is reported."""
    k0, k1, k2, k3, k4, k5, k6 = KEYS[:7]
    with (running_server(tmp_path / "data", tmp_path / "server.log") as srv, srv.channel() as ch,
          ThreadPoolExecutor(4) as pool):
        kv, maint = rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.MaintenanceStub(ch)
        r_a = kv.Put(rpc_pb2.PutRequest(key=k0, value=b"a"), timeout=10).header.revision
        r_b = kv.Put(rpc_pb2.PutRequest(key=k1, value=b"b"), timeout=10).header.revision
        r_del = kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=k1), timeout=10).header.revision
        r_c = kv.Put(rpc_pb2.PutRequest(key=k2, value=b"c"), timeout=10).header.revision
        rd = kv.Range(rpc_pb2.RangeRequest(key=k0), timeout=10)
        read = Read(0, k0, b"", rd.header.revision, [x.SerializeToString(deterministic=True) for x in rd.kvs])

        def acked(h: History, kind: str, effects: dict[bytes, bytes | None], rev: int, deleted: int = 0) -> Op:
            op = h.new_op(0, 0, kind, effects)
            op.status, op.revision, op.deleted = "acked", rev, deleted
            return op

        def base() -> History:
            h = History(seed=0)
            acked(h, "put", {k0: b"a"}, r_a)
            acked(h, "put", {k1: b"b"}, r_b)
            acked(h, "delete", {k1: None}, r_del, deleted=1)
            h.new_op(0, 0, "put", {k2: b"c"}).status = "indeterminate"  # sent and applied, reply "lost"
            h.new_op(0, 0, "put", {k3: b"d"}).status = "indeterminate"  # never applied
            h.reads.append(read)
            return h

        def run(h: History, **kw: object) -> Counts:
            v = Verifier(h, **kw)  # type: ignore[arg-type]
            return v.verify(kv, maint, {0}, pool=pool)

        ok = run(base())
        assert ok.bad() == 0 and ok.indeterminate_visible == 1, ok

        h = base()  # an acknowledged write the server does not have
        acked(h, "put", {k4: b"ghost"}, r_c)
        assert run(h).lost >= 1

        h = base()  # an acknowledged delete of a key that is still there
        acked(h, "delete", {k2: None}, r_c, deleted=1)
        assert run(h).lost >= 1

        h = base()  # a read that saw something the server no longer has
        other = kv_pb2.KeyValue.FromString(read.kvs[0])
        other.value = b"a-lost"
        h.reads[0] = dataclasses.replace(read, kvs=[other.SerializeToString(deterministic=True)])
        assert run(h).lost == 1

        h = base()  # two acknowledged writes with one revision
        acked(h, "put", {k5: b"twin"}, r_a)
        assert run(h).duplicate_revisions == 1

        h = base()  # an acknowledged revision above the head after restart
        acked(h, "put", {k5: b"future"}, r_c + 10)
        assert run(h).rev_regressions == 1

        # history at an old revision changed
        assert run(base(), prev_hash=(r_a, 12345)).history_changed == 1

        kv.Put(rpc_pb2.PutRequest(key=k6, value=b"intruder"), timeout=10)  # never attempted by a client
        assert run(base()).phantom == 1
