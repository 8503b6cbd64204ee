"""``/metrics`` (Prometheus text format 0.0.4) and ``/health``, as etcd 3.4 serves them on a client URL.

Metrics are collected at scrape time by :class:`NodeCollector` from what the server keeps anyway
(the node, its store, writer and :class:`~coord_server.counters.Counters`): the request path pays
nothing for them. Names are etcd's where a metric means the same thing (``etcd_server_has_leader``,
``etcd_debugging_mvcc_current_revision``, ``grpc_server_handled_total`` ...); coord's own numbers
are prefixed ``coord_``. The process collector of prometheus-client adds the ``process_*`` family.

``/health`` answers as etcd 3.4.23 does: ``{"health":"true"}`` (200) or ``{"health":"false"}`` (503)
when an alarm is active (unless named in ``?exclude=``), or when a no-op job cannot pass the write
path within a second (etcd's QGET through raft).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

import anyio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from coord._pb import rpc_pb2

from ._version import API_VERSION, SERVER_VERSION
from .errors import EtcdError
from .http import CORS_HEADERS, HttpRequest, HttpResponse, go_headers, text_response
from .rpc import Kind, Method

if TYPE_CHECKING:
    from .node import Node

__all__ = ["GRPC_CODE_NAMES", "HealthEndpoint", "MetricsEndpoint", "NodeCollector", "check_health"]

log = logging.getLogger(__name__)

HEALTH_TIMEOUT: Final = 1.0  # etcd waits this long for its QGET through raft

GRPC_CODE_NAMES: Final[dict[str, str]] = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}
"""Our :class:`~coord_server.errors.Code` names → grpc-go's ``codes.Code.String()`` (the label values)."""

_GRPC_TYPES: Final = {Kind.UNARY: "unary", Kind.SERVER_STREAM: "server_stream", Kind.BIDI_STREAM: "bidi_stream"}
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    if labels is None:
        return GaugeMetricFamily(name, doc, value=value)
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _untyped_counter(name: str, doc: str, value: float) -> Metric:
    # etcd names these counters without "_total"; prometheus-client would append it to a counter,
    # so they are exposed untyped to keep etcd's exact sample names.
    m = Metric(name, doc + " (a counter)", "unknown")
    m.add_sample(name, {}, value)
    return m


class NodeCollector(Collector):
    """Everything ``/metrics`` reports about one node, read when scraped.

    ``methods``: the registered RPCs; ``grpc_server_handled_total`` has a sample for each of them
    and every code from the start, as etcd's grpc-prometheus does.
    """

    def __init__(self, node: Node, methods: Sequence[Method]) -> None:
        self._node = node
        self._methods = [(m.service, m.name, _GRPC_TYPES[m.kind]) for m in methods]

    def collect(self) -> Iterable[Metric]:
        node = self._node
        c = node.counters
        writer = node.writer
        store = node.store
        yield from (
            _gauge("etcd_server_has_leader", "Whether a leader exists (always 1: this member leads).", 1),
            _gauge("etcd_server_is_leader", "Whether this member is the leader (always 1).", 1),
            _gauge("etcd_server_is_learner", "Whether this member is a learner (always 0).", 0),
            _counter("etcd_server_leader_changes_seen_total", "Leader changes seen by this process.", 1),
            _gauge("etcd_server_id", "Member ID in hexadecimal.", 1, {"server_id": f"{node.member_id:x}"}),
            _gauge("etcd_server_version", "The etcd version implemented.", 1, {"server_version": SERVER_VERSION}),
            _gauge("etcd_cluster_version", "The etcd cluster version.", 1, {"cluster_version": API_VERSION}),
            _gauge("etcd_server_quota_backend_bytes", "Backend quota in bytes.", node.config.quota()),
            _gauge("etcd_server_proposals_committed_total", "Write requests committed (raft index).",
                   writer.raft_index),
            _gauge("etcd_server_proposals_applied_total", "Write requests applied (raft index).", writer.raft_index),
            _gauge("etcd_server_proposals_pending", "Write requests waiting for the write path.", c.pending_writes),
            _counter("etcd_server_proposals_failed_total", "Write requests that failed in the write path.",
                     c.proposals_failed),
            _untyped_counter("etcd_server_health_success", "Successful /health checks.", c.health_success),
            _untyped_counter("etcd_server_health_failures", "Failed /health checks.", c.health_failures),
            _gauge("etcd_debugging_mvcc_current_revision", "The current revision of the store.", node.visible_rev),
            _gauge("etcd_debugging_mvcc_compact_revision", "The revision of the last compaction.", store.compact_rev),
            _gauge("etcd_debugging_mvcc_keys_total", "Number of live keys.", store.key_count()),
            _gauge("etcd_debugging_mvcc_watch_stream_total", "Open watch streams.", c.watch_streams),
            _gauge("etcd_debugging_mvcc_watcher_total", "Live watchers.", c.live_watchers),
            _gauge("etcd_debugging_mvcc_pending_events_total", "Watch events queued for slow streams.",
                   sum(c.buffered_events.values())),
            _gauge("etcd_debugging_mvcc_db_total_size_in_bytes", "Size of the backend file in bytes.",
                   node.backend.size()),
            _gauge("etcd_mvcc_db_total_size_in_bytes", "Size of the backend file in bytes.", node.backend.size()),
            _gauge("etcd_mvcc_db_total_size_in_use_in_bytes", "Bytes of the backend file in use.",
                   node.backend.size_in_use()),
            _counter("etcd_debugging_lease_granted_total", "Leases granted.", c.lease_granted),
            _counter("etcd_debugging_lease_revoked_total", "Leases revoked (by request or expiry).", c.lease_revoked),
            _counter("etcd_debugging_lease_renewed_total", "Lease keep-alives that renewed a lease.",
                     c.lease_renewed),
            _counter("etcd_debugging_server_lease_expired_total", "Leases revoked because they expired.",
                     c.lease_expired),
        )
        yield self._handled()
        yield from self._coord()

    def _handled(self) -> CounterMetricFamily:
        fam = CounterMetricFamily("grpc_server_handled_total", "RPCs completed, by method and status code.",
                                  labels=["grpc_code", "grpc_method", "grpc_service", "grpc_type"])
        handled = self._node.counters.rpc_handled
        for service, name, grpc_type in self._methods:
            for code, go_code in GRPC_CODE_NAMES.items():
                fam.add_metric([go_code, name, service, grpc_type], handled.get((service, name, code), 0))
        return fam

    def _coord(self) -> Iterator[Metric]:
        c = self._node.counters
        yield _gauge("coord_leases", "Leases alive now.", c.leases)
        yield _counter("coord_commits_total", "Write-ahead log syncs.", c.commits)
        yield _counter("coord_committed_jobs_total", "Write requests made durable.", c.committed_jobs)
        yield _counter("coord_committed_ops_total", "Backend operations made durable.", c.committed_ops)
        yield _counter("coord_commit_seconds_total", "Time spent appending and syncing the log.", c.commit_seconds)
        yield _counter("coord_lone_writes_total", "Writes applied and logged directly by their caller.",
                       c.lone_writes)
        sizes = c.commit_batch_sizes
        buckets: list[tuple[str, float]] = []
        for bound in _BATCH_BUCKETS:
            buckets.append((str(bound), sum(n for size, n in sizes.items() if size <= bound)))
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily("coord_commit_batch_jobs", "Write requests per log sync.", buckets=buckets,
                                    sum_value=sum(size * n for size, n in sizes.items()))


class MetricsEndpoint:
    """``/metrics``: any method (as etcd's promhttp handler), Prometheus text 0.0.4, CORS headers."""

    def __init__(self, node: Node, methods: Sequence[Method]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node, methods))
        ProcessCollector(registry=self.registry)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        body = generate_latest(self.registry)
        return HttpResponse(200, go_headers([*CORS_HEADERS, ("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)]), body)


def excluded_alarms(query: str) -> set[str]:
    """The alarm names given as ``?exclude=NAME`` (repeatable), as etcd 3.4.23 reads them."""
    return {value for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True) if key == "exclude"}


async def check_health(node: Node, excluded: Iterable[str] = ()) -> bool:
    """etcd's checkHealth for one member: no alarm (except ``excluded`` names) and a no-op job through
    the write path within :data:`HEALTH_TIMEOUT`. A checkpoint."""
    skip = set(excluded)
    for _, alarm in sorted(node.alarms):
        if rpc_pb2.AlarmType.Name(alarm) not in skip:
            return False
    with anyio.move_on_after(HEALTH_TIMEOUT):
        try:
            await node.writer.submit(_noop)
        except EtcdError:
            return False
        return True
    return False


def _noop() -> None:
    return None


class HealthEndpoint:
    """``GET /health`` with etcd 3.4.23's bodies and statuses (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def handle(self, request: HttpRequest) -> HttpResponse:
        if request.method != "GET":
            return text_response(HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n",
                                 [*CORS_HEADERS, ("Allow", "GET")])
        healthy = await check_health(self._node, excluded_alarms(request.query))
        counters = self._node.counters
        if healthy:
            counters.health_success += 1
            body = json.dumps({"health": "true"}, separators=(",", ":")).encode()
            return HttpResponse(200, go_headers([*CORS_HEADERS, ("Content-Type", "text/plain; charset=utf-8")]), body)
        counters.health_failures += 1
        return text_response(HTTPStatus.SERVICE_UNAVAILABLE, '{"health":"false"}\n', CORS_HEADERS)

