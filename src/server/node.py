"""One member's state: config, identity, store, backend, write path, alarms.

:func:`open_node` recovers everything from the data directory; services hold a
:class:`Node` and never touch the backend directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from anyio.abc import TaskGroup

from coord._pb import rpc_pb2

from . import backend as be
from . import errors
from .config import Config
from .counters import Counters
from .lessor import LEASE_DB, IdGenerator, Lessor, decode_lease, min_lease_ttl, restart_grace
from .mvcc import Record, Store
from .wal import Wal, WalCorrupt
from .watch_hub import GRPC_OVERHEAD_BYTES, Limits, WatchHub
from .writer import Writer

log = logging.getLogger("coord_server.node")

KV_OVERHEAD = 256  # etcd's quota cost per put, on top of key and value
NOSPACE = rpc_pb2.NOSPACE


@dataclass
class Node:
    config: Config
    member_id: int
    cluster_id: int
    store: Store
    backend: be.Backend
    writer: Writer
    term: int
    counters: Counters
    lessor: Lessor
    alarms: set[tuple[int, int]] = field(default_factory=set)  # (member id, AlarmType)
    watch_hub: WatchHub = field(init=False)
    # The server's long-lived task group while it serves (per-stream helper tasks run there).
    background: TaskGroup | None = None

    def __post_init__(self) -> None:
        limits = Limits(fragment_bytes=self.config.max_request_bytes + GRPC_OVERHEAD_BYTES)
        self.watch_hub = WatchHub(self.store, self.header, limits=limits, on_watchers=self._count_watchers,
                                  buffered=self.counters.buffered_events)
        self.writer.publish_hooks.append(self.watch_hub.publish)

    def _count_watchers(self, delta: int) -> None:
        self.counters.live_watchers += delta

    @property
    def visible_rev(self) -> int:
        """The newest durable revision: everything a read may see."""
        return self.writer.visible_rev

    def header(self, revision: int | None = None) -> rpc_pb2.ResponseHeader:
        return rpc_pb2.ResponseHeader(
            cluster_id=self.cluster_id, member_id=self.member_id, raft_term=self.term,
            revision=self.visible_rev if revision is None else revision)

    def fill_header(self, h: rpc_pb2.ResponseHeader) -> None:
        """etcd's header.fill: identity always, revision only when the handler left it 0."""
        h.cluster_id = self.cluster_id
        h.member_id = self.member_id
        h.raft_term = self.term
        if h.revision == 0:
            h.revision = self.visible_rev

    # ------------------------------------------------------------------ limits

    def check_request_size(self, field_number: int, payload_size: int) -> None:
        """etcd rejects a proposal whose marshalled InternalRaftRequest exceeds max-request-bytes.

        The raft request wraps the op (field ``field_number``) with a RequestHeader{ID}
        in field 100; the size is computed the same way so the boundary matches.
        """
        header = 1 + _varint_len(self._request_id_sample())
        size = 2 + _varint_len(header) + header
        size += _tag_len(field_number) + _varint_len(payload_size) + payload_size
        if size > self.config.max_request_bytes:
            raise errors.REQUEST_TOO_LARGE

    def _request_id_sample(self) -> int:
        # etcd's request IDs: low 16 bits of the member ID in bits 48-63, then time and a counter.
        return ((self.member_id & 0xFFFF) << 48) | (1 << 47)

    def check_quota(self, cost: int) -> None:
        """etcd's quota gate for Put, Txn and LeaseGrant: raise the NOSPACE alarm when full.

        Raises NO_SPACE when the alarm is active and the request writes, or when
        it would take the database past the quota.
        """
        if cost > 0 and self.has_alarm(NOSPACE):
            raise errors.NO_SPACE
        if self.backend.size() + cost > self.config.quota():
            if not self.has_alarm(NOSPACE):
                self.activate_alarm_nowait(NOSPACE)
            raise errors.NO_SPACE

    # ------------------------------------------------------------------ alarms

    def has_alarm(self, alarm: int) -> bool:
        return any(a == alarm for _, a in self.alarms)

    def activate_alarm_nowait(self, alarm: int) -> None:
        """Raise an alarm now; it is persisted with the next commit."""
        entry = (self.member_id, alarm)
        if entry not in self.alarms:
            self.alarms.add(entry)
            log.warning("alarm raised: %s", rpc_pb2.AlarmType.Name(alarm))
            self.writer.extra_ops.append((b"alarm", _alarm_key(entry), b""))

    def apply_alarm(self, action: int, member: int, alarm: int) -> list[tuple[int, int]]:
        """Apply an AlarmRequest inside the write path; returns the alarms it affected."""
        entry = (member, alarm)
        if action == rpc_pb2.AlarmRequest.ACTIVATE:
            if alarm == rpc_pb2.NONE:
                return []
            if entry not in self.alarms:
                self.alarms.add(entry)
                self.writer.extra_ops.append((b"alarm", _alarm_key(entry), b""))
            return [entry]
        if action == rpc_pb2.AlarmRequest.DEACTIVATE:
            if entry not in self.alarms:
                return []
            self.alarms.discard(entry)
            self.writer.extra_ops.append((b"alarm", _alarm_key(entry), None))
            return [entry]
        return sorted(self.alarms) if alarm == rpc_pb2.NONE else sorted(e for e in self.alarms if e[1] == alarm)


def alarm_member(member: int, alarm: int) -> rpc_pb2.AlarmMember:
    return rpc_pb2.AlarmMember(memberID=member, alarm=cast(rpc_pb2.AlarmType, alarm))


def _alarm_key(entry: tuple[int, int]) -> bytes:
    return alarm_member(*entry).SerializeToString()


def _varint_len(v: int) -> int:
    n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


def _tag_len(field_number: int) -> int:
    return _varint_len(field_number << 3)


def open_node(config: Config, *, on_fatal: Callable[[BaseException], None]) -> Node:
    """Open (or create) the data directory and recover the whole state.

    Raises ConfigError for bad flags and BackendError for an unreadable store.
    Blocking I/O: call before serving.
    """
    mid, cid = config.ids()
    quota = config.quota()
    backend = be.Backend(config.resolved_data_dir(), map_size=max(2 * quota, quota + (1 << 30)))
    wal = Wal(backend.dir / "wal")
    try:
        meta = backend.meta()
        applied = be.unpack_i64(meta[be.WAL_INDEX]) if be.WAL_INDEX in meta else 0
        replay = wal.open(applied)
        if replay:
            # Acknowledged batches the backend had not received yet: apply them, in order, in one commit.
            ops: list[be.Op] = []
            for entry in replay:
                ops.extend(be.decode_ops(entry.payload))
            ops.append((b"meta", be.WAL_INDEX, be.pack_i64(replay[-1].index)))
            backend.commit(ops)
            log.info("replayed %d log records (indexes %d-%d)", len(replay), replay[0].index, replay[-1].index)
            wal.release(replay[-1].index)
            meta = backend.meta()
    except ValueError as exc:
        raise WalCorrupt(f"undecodable log record: {exc}") from exc
    rev = be.unpack_i64(meta[be.CONSISTENT_REV]) if be.CONSISTENT_REV in meta else 1
    scheduled = be.unpack_i64(meta[be.SCHEDULED_COMPACT]) if be.SCHEDULED_COMPACT in meta else -1
    finished = be.unpack_i64(meta[be.FINISHED_COMPACT]) if be.FINISHED_COMPACT in meta else -1
    term = (be.unpack_i64(meta[be.TERM]) if be.TERM in meta else 1) + 1
    index = be.unpack_i64(meta[be.CONSISTENT_INDEX]) if be.CONSISTENT_INDEX in meta else 3
    lessor = _load_leases(config, backend, mid)
    store = Store.restore((Record.from_backend(k, v) for k, v in backend.items(b"key")), rev=rev,
                          compact_rev=scheduled, lease_exists=lessor.exists)
    alarms = set()
    for k, _ in backend.items(b"alarm"):
        am = rpc_pb2.AlarmMember.FromString(k)
        alarms.add((am.memberID, int(am.alarm)))
    # A new term per start, as a restarted etcd member campaigns again.
    index += 1
    backend.commit([(b"meta", be.TERM, be.pack_i64(term)), (b"meta", be.CONSISTENT_INDEX, be.pack_i64(index))])
    counters = Counters()
    writer = Writer(store, backend, wal, counters, raft_index=index, on_fatal=on_fatal)
    if scheduled > finished:
        log.info("resuming compaction at revision %d", scheduled)
        writer.schedule_compaction(scheduled)
    orphans = {lease for _, lease in store.keys_with_lease() if not lessor.exists(lease)}
    if orphans:
        log.warning("keys attached to %d unknown leases (they will not expire): %s",
                    len(orphans), ", ".join(f"{lease:016x}" for lease in sorted(orphans)[:10]))
    # As etcd's leader does on election: every lease gets its full TTL plus an election timeout,
    # because how much of its TTL had passed before the restart is not recorded.
    lessor.promote(restart_grace(config.election_timeout_ms, config.heartbeat_interval_ms))
    counters.leases = len(lessor)
    node = Node(config=config, member_id=mid, cluster_id=cid, store=store, backend=backend, writer=writer,
                term=term, counters=counters, lessor=lessor, alarms=alarms)
    log.debug("recovered revision %d (compacted at %d, term %d)", rev, scheduled, term)
    return node


def _load_leases(config: Config, backend: be.Backend, member_id: int) -> Lessor:
    """The lessor with every persisted lease (no deadlines yet: see ``Lessor.promote``).

    Raises BackendError for an undecodable lease record.
    """
    lessor = Lessor(clock=time.monotonic,
                    min_ttl=min_lease_ttl(config.election_timeout_ms, config.heartbeat_interval_ms),
                    ids=IdGenerator(member_id, time.time_ns() // 1_000_000))
    for key, value in backend.items(LEASE_DB):
        try:
            lease_id, ttl = decode_lease(value)
        except ValueError as exc:
            raise be.BackendError(f"corrupt lease record {key.hex()}: {exc}") from exc
        lessor.restore(lease_id, ttl)
    return lessor
