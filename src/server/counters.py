"""Internal counters: plain numbers the server updates and tests (and /metrics) read.

Nothing here does I/O; the metrics endpoint turns a snapshot into Prometheus text.
"""

from __future__ import annotations

from collections import Counter as _Tally
from dataclasses import dataclass, field


@dataclass
class Counters:
    """Live gauges and monotonic totals of one server."""

    pending_writes: int = 0
    live_watchers: int = 0
    watch_streams: int = 0
    buffered_events: dict[int, int] = field(default_factory=dict)  # watch stream id -> events queued
    leases: int = 0
    lease_granted: int = 0
    lease_revoked: int = 0  # by LeaseRevoke or by expiry
    lease_expired: int = 0  # revoked because they expired
    lease_renewed: int = 0
    commits: int = 0
    committed_jobs: int = 0
    committed_ops: int = 0
    commit_seconds: float = 0.0
    commit_batch_sizes: _Tally[int] = field(default_factory=_Tally)  # jobs per commit -> how many commits
    proposals_failed: int = 0
    lone_writes: int = 0  # writes applied and logged directly by the caller (no other request open)
    rpc_handled: _Tally[tuple[str, str, str]] = field(default_factory=_Tally)  # (service, method, code)
    health_success: int = 0  # GET /health answered healthy
    health_failures: int = 0  # GET /health answered unhealthy

    def observe_commit(self, jobs: int, ops: int, seconds: float) -> None:
        self.commits += 1
        self.committed_jobs += jobs
        self.committed_ops += ops
        self.commit_seconds += seconds
        self.commit_batch_sizes[jobs] += 1

    def snapshot(self) -> dict[str, object]:
        """A copy safe to hand to tests or exporters."""
        return {
            "pending_writes": self.pending_writes,
            "live_watchers": self.live_watchers,
            "watch_streams": self.watch_streams,
            "buffered_events": dict(self.buffered_events),
            "leases": self.leases,
            "lease_granted": self.lease_granted,
            "lease_revoked": self.lease_revoked,
            "lease_expired": self.lease_expired,
            "lease_renewed": self.lease_renewed,
            "commits": self.commits,
            "committed_jobs": self.committed_jobs,
            "committed_ops": self.committed_ops,
            "commit_seconds": self.commit_seconds,
            "commit_batch_sizes": dict(self.commit_batch_sizes),
            "proposals_failed": self.proposals_failed,
            "lone_writes": self.lone_writes,
            "rpc_handled": dict(self.rpc_handled),
            "health_success": self.health_success,
            "health_failures": self.health_failures,
        }
